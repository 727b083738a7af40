"""Every Prometheus metric formcraftd exports, in one place.

Each daemon owns its own :class:`CollectorRegistry`, so several daemons can run
in one test process. No ``*_created`` series are exported: they double the
counters' series and no dashboard reads them. What a consumer counts for every job
(:class:`~formcraftd.core.stats.QueueStats`), its in-flight jobs and its
concurrency limit are read by a collector when `/metrics` is scraped, so the
hot path never touches a metric object.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from formcraftd.core.bounces import BounceCounts
from formcraftd.core.breakers import STATE_VALUES, BreakerState
from formcraftd.core.ratelimits import DestinationLimits
from formcraftd.core.stats import QueueStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True)
class _WatchedQueue:
    """What the metrics read of one queue's consumer when `/metrics` is scraped."""

    stats: QueueStats
    in_flight: Callable[[], int]
    concurrency: Callable[[], int]
    rate_limits: DestinationLimits | None = None


_OUTCOMES = ("success", "retry", "dead_letter", "delayed")


class _QueueCollector(Collector):
    """Exports every watched queue's counts, durations, in-flight jobs and limit."""

    def __init__(self, queues: dict[str, _WatchedQueue]) -> None:
        self._queues = queues

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        jobs, errors, duplicates, durations, in_flight, limit, throttled, rate = self._families()
        for queue, watched in list(self._queues.items()):
            stats = watched.stats
            for outcome in _OUTCOMES:
                jobs.add_metric([queue, outcome], getattr(stats, outcome))
            for code, count in sorted(stats.errors.items()):
                errors.add_metric([queue, code], count)
            duplicates.add_metric([queue], stats.duplicates)
            durations.add_metric([queue], stats.durations.cumulative(), stats.durations.sum)
            in_flight.add_metric([queue], watched.in_flight())
            limit.add_metric([queue], watched.concurrency())
            if watched.rate_limits is not None:
                for destination in watched.rate_limits.report():
                    throttled.add_metric([queue, destination.key], destination.throttled)
                    if destination.rate is not None:
                        rate.add_metric([queue, destination.key], destination.rate)
        yield from (jobs, errors, duplicates, durations, in_flight, limit, throttled, rate)

    @staticmethod
    def _families() -> tuple[
        CounterMetricFamily,
        CounterMetricFamily,
        CounterMetricFamily,
        HistogramMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
        CounterMetricFamily,
        GaugeMetricFamily,
    ]:
        return (
            CounterMetricFamily(
                "formcraftd_jobs", "Jobs finished, by outcome.", labels=["queue", "outcome"]
            ),
            CounterMetricFamily(
                "formcraftd_job_errors",
                "Attempts that did not succeed, by error code (retried, delayed or dead-lettered).",
                labels=["queue", "code"],
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
            GaugeMetricFamily(
                "formcraftd_jobs_in_flight", "Jobs being handled now.", labels=["queue"]
            ),
            GaugeMetricFamily(
                "formcraftd_concurrency_limit",
                "Concurrency limit of each queue.",
                labels=["queue"],
            ),
            CounterMetricFamily(
                "formcraftd_jobs_throttled",
                "Jobs that waited for their destination's rate limit or were delayed by it.",
                labels=["queue", "destination"],
            ),
            GaugeMetricFamily(
                "formcraftd_destination_rate_limit",
                "Requests per second allowed to a destination slowed down by 429/503 "
                "(0 while paused).",
                labels=["queue", "destination"],
            ),
        )


class _BounceCollector(Collector):
    """Bounces and complaints applied, reports left alone, webhook requests refused."""

    def __init__(self, counts: BounceCounts) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        taken = CounterMetricFamily(
            "formcraftd_bounces",
            "Bounces and complaints applied to the suppression policy, by source and type.",
            labels=["source", "type"],
        )
        for (source, kind), count in sorted(self._counts.taken.items()):
            taken.add_metric([source, kind], count)
        skipped = CounterMetricFamily(
            "formcraftd_bounce_messages_skipped",
            "Messages in the bounce mailbox left alone: unparsed (not a report) or unmatched.",
            labels=["reason"],
        )
        for reason in ("unparsed", "unmatched"):
            skipped.add_metric([reason], self._counts.skipped.get(reason, 0))
        refused = CounterMetricFamily(
            "formcraftd_bounce_webhooks_refused",
            "Provider webhook requests refused (bad signature, stale or replayed, credentials).",
            labels=["provider"],
        )
        for provider in ("mailgun", "postmark"):
            refused.add_metric([provider], self._counts.refused.get(provider, 0))
        yield from (taken, skipped, refused)


class Metrics:
    """The metric families of one daemon."""

    def __init__(self, version: str) -> None:
        # Process-wide in prometheus_client; formcraftd's process exports one registry.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        r = self.registry
        self._queues: dict[str, _WatchedQueue] = {}
        r.register(_QueueCollector(self._queues))
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

    def watch_queue(
        self,
        queue: str,
        stats: QueueStats,
        *,
        in_flight: Callable[[], int],
        concurrency: Callable[[], int],
        rate_limits: DestinationLimits | None = None,
    ) -> None:
        """Export `queue`'s counts, and its in-flight jobs, limit and throttled
        destinations read at scrape time."""
        self._queues[queue] = _WatchedQueue(stats, in_flight, concurrency, rate_limits)

    def watch_bounces(self, counts: BounceCounts) -> None:
        """Export what the bounce intake counted, read when `/metrics` is scraped."""
        self.registry.register(_BounceCollector(counts))

    def breaker_changed(self, key: str, state: BreakerState) -> None:
        self.breaker_state.labels(key).set(STATE_VALUES[state])

    def breaker_evicted(self, key: str) -> None:
        """Forget a breaker the registry dropped, so the label set stays bounded."""
        with contextlib.suppress(KeyError):
            self.breaker_state.remove(key)

    def render(self) -> bytes:
        return generate_latest(self.registry)
