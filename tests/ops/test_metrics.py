"""The per-job metrics: plain numbers, exported at scrape time like prometheus_client's own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from formcraftd.core.stats import DURATION_BUCKETS, QueueStats
from formcraftd.ops.metrics import Metrics


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def watched(metrics: Metrics, queue: str, in_flight: int = 0, limit: int = 5) -> QueueStats:
    """A queue's stats, watched by `metrics` with a fixed in-flight count and limit."""
    stats = QueueStats()
    metrics.watch_queue(queue, stats, in_flight=lambda: in_flight, concurrency=lambda: limit)
    return stats


def test_job_counters_are_exported_by_queue_and_outcome() -> None:
    metrics = Metrics("1.0")
    webhook, email = watched(metrics, "webhook_tasks"), watched(metrics, "email_tasks")
    webhook.success += 3
    webhook.retry += 1
    email.dead_letter += 1
    email.delayed += 2
    webhook.duplicates += 1
    webhook.count_error("TIMEOUT")
    webhook.count_error("TIMEOUT")
    email.count_error("SMTP_TEMPORARY")
    got = samples(metrics.render())

    def jobs(queue: str, outcome: str) -> float:
        return got[("formcraftd_jobs_total", (("outcome", outcome), ("queue", queue)))]

    assert jobs("webhook_tasks", "success") == 3
    assert jobs("webhook_tasks", "retry") == 1
    assert jobs("email_tasks", "dead_letter") == 1
    assert jobs("email_tasks", "delayed") == 2
    assert jobs("email_tasks", "success") == 0
    assert got[("formcraftd_duplicates_skipped_total", (("queue", "webhook_tasks"),))] == 1
    assert not [name for name, _ in got if name.endswith("_created")]
    errors = "formcraftd_job_errors_total"
    assert got[(errors, (("code", "TIMEOUT"), ("queue", "webhook_tasks")))] == 2
    assert got[(errors, (("code", "SMTP_TEMPORARY"), ("queue", "email_tasks")))] == 1


def test_durations_match_a_prometheus_client_histogram() -> None:
    """Same buckets (bounds inclusive), count and sum as the library's Histogram."""
    metrics = Metrics("1.0")
    ours = watched(metrics, "webhook_tasks").durations
    reference_registry = CollectorRegistry()
    reference = Histogram(
        "formcraftd_job_duration_seconds",
        "Time a handler spent on one try of a job.",
        ["queue"],
        buckets=DURATION_BUCKETS,
        registry=reference_registry,
    ).labels("webhook_tasks")
    values = [0.0, 0.004, 0.005, 0.0051, 0.01, 0.3, 2.5, 59.9, 60.0, 61.0, 1e6]
    for value in values:
        ours.observe(value)
        reference.observe(value)
    got = samples(metrics.render())
    want = samples(generate_latest(reference_registry))
    assert got.keys() >= want.keys()
    for key, value in want.items():
        assert got[key] == value, key


def test_in_flight_and_the_limit_are_read_at_scrape_time() -> None:
    """The gauges show what the consumer says when /metrics is scraped."""
    metrics = Metrics("1.0")
    watched(metrics, "webhook_tasks", in_flight=3, limit=8)
    got = samples(metrics.render())
    assert got[("formcraftd_jobs_in_flight", (("queue", "webhook_tasks"),))] == 3
    assert got[("formcraftd_concurrency_limit", (("queue", "webhook_tasks"),))] == 8
