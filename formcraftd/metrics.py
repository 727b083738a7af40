"""Every Prometheus metric formcraftd exports, in one place.

Each daemon owns its own :class:`CollectorRegistry`, so several daemons can run
in one test process. The per-queue children are looked up once per queue and
kept (`QueueMetrics`): the hot path never formats label strings. The metrics a
consumer updates for every job (jobs by outcome, duplicates, durations) are
plain numbers, exported by a collector when `/metrics` is scraped: a
prometheus_client child takes a lock on every update.
"""

from __future__ import annotations

import bisect
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from formcraftd.breakers import STATE_VALUES, BreakerState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class JobCounter:
    """A counter the consumer bumps once per job; read when /metrics is scraped.

    The event loop's thread is the only writer, so a plain number suffices.
    """

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class JobDurations:
    """A histogram of job durations with the buckets of `formcraftd_job_duration_seconds`."""

    __slots__ = ("counts", "created", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(_DURATION_BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.created = time.time()

    def observe(self, seconds: float) -> None:
        # Bucket `le` bounds are inclusive: the first bound >= seconds.
        self.counts[bisect.bisect_left(_DURATION_BUCKETS, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        """(`le`, count) pairs as Prometheus wants them: each bucket holds those below it."""
        bounds = [str(float(bound)) for bound in _DURATION_BUCKETS] + ["+Inf"]
        total, buckets = 0, []
        for bound, count in zip(bounds, self.counts, strict=True):
            total += count
            buckets.append((bound, float(total)))
        return buckets


@dataclass(frozen=True, slots=True)
class QueueMetrics:
    """The per-queue metrics for one queue."""

    success: JobCounter
    retry: JobCounter
    dead_letter: JobCounter
    delayed: JobCounter
    duplicates: JobCounter
    in_flight: Gauge
    concurrency_limit: Gauge
    duration: JobDurations


_OUTCOMES = ("success", "retry", "dead_letter", "delayed")


class _JobCollector(Collector):
    """Exports every queue's JobCounters and JobDurations at scrape time."""

    def __init__(self, queues: dict[str, QueueMetrics]) -> None:
        self._queues = queues

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        jobs, duplicates, durations = self._families()
        for queue, metrics in list(self._queues.items()):
            for outcome in _OUTCOMES:
                counter: JobCounter = getattr(metrics, outcome)
                jobs.add_metric([queue, outcome], counter.value, created=counter.created)
            duplicates.add_metric(
                [queue], metrics.duplicates.value, created=metrics.duplicates.created
            )
            histogram = metrics.duration
            durations.add_metric([queue], histogram.cumulative(), histogram.sum)
            durations.samples.append(
                Sample(f"{durations.name}_created", {"queue": queue}, histogram.created)
            )
        yield from (jobs, duplicates, durations)

    @staticmethod
    def _families() -> tuple[CounterMetricFamily, CounterMetricFamily, HistogramMetricFamily]:
        return (
            CounterMetricFamily(
                "formcraftd_jobs", "Jobs finished, by outcome.", labels=["queue", "outcome"]
            ),
            CounterMetricFamily(
                "formcraftd_duplicates_skipped",
                "Redelivered jobs this process had already settled, acked without running again.",
                labels=["queue"],
            ),
            HistogramMetricFamily(
                "formcraftd_job_duration_seconds",
                "Time a handler spent on one try of a job.",
                labels=["queue"],
            ),
        )


class Metrics:
    """The metric families of one daemon."""

    def __init__(self, version: str) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        r = self.registry
        self._queues: dict[str, QueueMetrics] = {}
        r.register(_JobCollector(self._queues))
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

    def queue(self, queue: str) -> QueueMetrics:
        """The per-queue children for `queue` (created once)."""
        found = self._queues.get(queue)
        if found is None:
            found = self._queues[queue] = QueueMetrics(
                success=JobCounter(),
                retry=JobCounter(),
                dead_letter=JobCounter(),
                delayed=JobCounter(),
                duplicates=JobCounter(),
                in_flight=self.in_flight.labels(queue),
                concurrency_limit=self.concurrency_limit.labels(queue),
                duration=JobDurations(),
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
