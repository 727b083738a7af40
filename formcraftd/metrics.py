"""Every Prometheus metric formcraftd exports, in one place.

Each daemon owns its own :class:`CollectorRegistry`, so several daemons can run
in one test process. The per-queue children are looked up once per queue and
kept (`QueueMetrics`): the hot path never formats label strings.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from formcraftd.breakers import STATE_VALUES, BreakerState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True, slots=True)
class QueueMetrics:
    """The children of the per-queue metrics for one queue."""

    success: Counter
    retry: Counter
    dead_letter: Counter
    delayed: Counter
    duplicates: Counter
    in_flight: Gauge
    concurrency_limit: Gauge
    duration: Histogram


class Metrics:
    """The metric families of one daemon."""

    def __init__(self, version: str) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        r = self.registry
        self.jobs = Counter(
            "formcraftd_jobs", "Jobs finished, by outcome.", ["queue", "outcome"], registry=r
        )
        self.in_flight = Gauge(
            "formcraftd_jobs_in_flight", "Jobs being handled now.", ["queue"], registry=r
        )
        self.concurrency_limit = Gauge(
            "formcraftd_concurrency_limit",
            "Concurrency limit of each queue.",
            ["queue"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "formcraftd_queue_depth", "Messages ready in the main queue.", ["queue"], registry=r
        )
        self.dead_letter_depth = Gauge(
            "formcraftd_dead_letter_depth",
            "Messages in the dead-letter queue.",
            ["queue"],
            registry=r,
        )
        self.job_duration = Histogram(
            "formcraftd_job_duration_seconds",
            "Time a handler spent on one try of a job.",
            ["queue"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.duplicates_skipped = Counter(
            "formcraftd_duplicates_skipped",
            "Redelivered jobs this process had already settled, acked without running again.",
            ["queue"],
            registry=r,
        )
        self.events_dropped = Counter(
            "formcraftd_events_dropped",
            "Delivery events dropped (buffer full, or the broker refused them).",
            registry=r,
        )
        self.breaker_state = Gauge(
            "formcraftd_breaker_state", "0 closed, 1 half-open, 2 open.", ["key"], registry=r
        )
        self.broker_connected = Gauge(
            "formcraftd_broker_connected", "1 while the AMQP connection is up.", registry=r
        )
        self.reconnects = Counter(
            "formcraftd_reconnects", "Reconnections to the broker.", registry=r
        )
        self.config_reloads = Counter(
            "formcraftd_config_reloads", "Config reloads, by result.", ["result"], registry=r
        )
        self.alert_active = Gauge(
            "formcraftd_alert_active", "1 while an alert is raised.", ["alert"], registry=r
        )
        self.build_info = Gauge(
            "formcraftd_build_info", "The running version.", ["version"], registry=r
        )
        self.build_info.labels(version=version).set(1)
        self._queues: dict[str, QueueMetrics] = {}

    def queue(self, queue: str) -> QueueMetrics:
        """The per-queue children for `queue` (created once)."""
        found = self._queues.get(queue)
        if found is None:
            found = self._queues[queue] = QueueMetrics(
                success=self.jobs.labels(queue, "success"),
                retry=self.jobs.labels(queue, "retry"),
                dead_letter=self.jobs.labels(queue, "dead_letter"),
                delayed=self.jobs.labels(queue, "delayed"),
                duplicates=self.duplicates_skipped.labels(queue),
                in_flight=self.in_flight.labels(queue),
                concurrency_limit=self.concurrency_limit.labels(queue),
                duration=self.job_duration.labels(queue),
            )
        return found

    def breaker_changed(self, key: str, state: BreakerState) -> None:
        self.breaker_state.labels(key).set(STATE_VALUES[state])

    def breaker_evicted(self, key: str) -> None:
        """Forget a breaker the registry dropped, so the label set stays bounded."""
        with contextlib.suppress(KeyError):
            self.breaker_state.remove(key)

    def render(self) -> bytes:
        return generate_latest(self.registry)
