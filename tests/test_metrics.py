"""The per-job metrics: plain numbers, exported at scrape time like prometheus_client's own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from formcraftd.metrics import _DURATION_BUCKETS, Metrics


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def test_job_counters_are_exported_by_queue_and_outcome() -> None:
    metrics = Metrics("1.0")
    webhook, email = metrics.queue("webhook_tasks"), metrics.queue("email_tasks")
    for _ in range(3):
        webhook.success.inc()
    webhook.retry.inc()
    email.dead_letter.inc()
    email.delayed.inc(2)
    webhook.duplicates.inc()
    got = samples(metrics.render())

    def jobs(queue: str, outcome: str) -> float:
        return got[("formcraftd_jobs_total", (("outcome", outcome), ("queue", queue)))]

    assert jobs("webhook_tasks", "success") == 3
    assert jobs("webhook_tasks", "retry") == 1
    assert jobs("email_tasks", "dead_letter") == 1
    assert jobs("email_tasks", "delayed") == 2
    assert jobs("email_tasks", "success") == 0
    assert got[("formcraftd_duplicates_skipped_total", (("queue", "webhook_tasks"),))] == 1
    assert ("formcraftd_jobs_created", (("outcome", "success"), ("queue", "webhook_tasks"))) in got


def test_durations_match_a_prometheus_client_histogram() -> None:
    """Same buckets (bounds inclusive), count, sum and _created as the library's Histogram."""
    metrics = Metrics("1.0")
    ours = metrics.queue("webhook_tasks").duration
    reference_registry = CollectorRegistry()
    reference = Histogram(
        "formcraftd_job_duration_seconds",
        "Time a handler spent on one try of a job.",
        ["queue"],
        buckets=_DURATION_BUCKETS,
        registry=reference_registry,
    ).labels("webhook_tasks")
    values = [0.0, 0.004, 0.005, 0.0051, 0.01, 0.3, 2.5, 59.9, 60.0, 61.0, 1e6]
    for value in values:
        ours.observe(value)
        reference.observe(value)
    got = samples(metrics.render())
    want = samples(generate_latest(reference_registry))
    for key, value in want.items():
        if key[0].endswith("_created"):
            assert key in got
        else:
            assert got[key] == value, key
