"""The monitoring loop: queue depths, and the four alerts of the seed.

Every `DEPTH_INTERVAL_S` (or `monitoring.interval_ms`, when shorter) it polls
each main queue and DLQ with a passive declare, so the depths on `/metrics` and
the status page are never older than a Prometheus scrape interval, while a
scrape itself never touches the broker. Every `monitoring.interval_ms` it
computes the rates and raises or clears these alerts:

- `queue_size:<queue>` — ready messages over `queue_size_threshold`;
- `error_rate:<queue>` — (retries + dead letters) / finished jobs over the last
  interval above `error_rate_threshold` (with at least `MIN_SAMPLE` jobs);
- `processing_delay:<queue>` — the oldest in-flight job older than
  `processing_delay_threshold_ms`;
- `broker_disconnected` — raised and cleared as soon as the connection drops
  or returns, not only on the interval.

Each change is one WARNING log line, the `formcraftd_alert_active{alert}` gauge,
and a JSON POST to `alert_webhook_url` when set (bounded by its own timeout; a
failing sink is logged and never affects the workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from aio_pika.abc import AbstractChannel

from formcraftd import __version__
from formcraftd.amqp.topology import dead_letter_queue_name, queue_depth
from formcraftd.core.config import MonitoringConfig
from formcraftd.ops.metrics import Metrics

log = logging.getLogger("formcraftd.monitor")

MIN_SAMPLE = 10
ALERT_TIMEOUT_S = 5.0
DEPTH_INTERVAL_S = 15.0  # Prometheus' usual scrape interval


@dataclass
class QueueSample:
    """What the monitor reads from one consumer."""

    queue: str
    finished: int  # success + retry + dead_letter so far
    failed: int  # retry + dead_letter so far
    oldest_in_flight_s: float


@dataclass
class QueueReading:
    """The monitor's latest view of one queue, for status output."""

    depth: int | None = None
    dead_letter_depth: int | None = None
    depth_at: float | None = None  # time.time() of the depth reading
    rate_per_s: float = 0.0
    error_rate: float = 0.0
    last_finished: int = 0
    last_failed: int = 0


class MonitorSource(Protocol):
    """What the monitor asks the daemon."""

    def samples(self) -> Sequence[QueueSample]: ...

    @property
    def broker_connected(self) -> bool: ...

    async def monitor_channel(self) -> AbstractChannel: ...


@dataclass
class Alert:
    name: str
    detail: str
    since: float = field(default_factory=time.time)


class Monitor:
    """Runs the checks and owns the alert state."""

    def __init__(
        self, config: MonitoringConfig, *, source: MonitorSource, metrics: Metrics
    ) -> None:
        self.config = config
        self._source = source
        self._metrics = metrics
        self.readings: dict[str, QueueReading] = {}
        self.active: dict[str, Alert] = {}
        self._last_check = time.monotonic()
        self._next_check = 0.0  # monotonic time of the next alert check; 0: at once
        self._wake = asyncio.Event()
        self._posts: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None

    def reconfigure(self, config: MonitoringConfig) -> None:
        self.config = config
        self._next_check = 0.0
        self._wake.set()

    async def run(self) -> None:
        """Poll and check until cancelled; waits for pending alert POSTs on exit.

        The depths are polled on every round, whether or not alerts are enabled;
        the alert check runs when its interval has passed (and at once after a
        reload). A failed round is one WARNING line and never stops the daemon.
        """
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=ALERT_TIMEOUT_S))
        try:
            while True:
                try:
                    await self.poll_depths()
                except Exception as exc:
                    log.warning("reading the queue depths failed: %s", exc)
                if self.config.enabled and time.monotonic() >= self._next_check:
                    self._next_check = time.monotonic() + self.config.interval_ms / 1000
                    try:
                        self.check()
                    except Exception as exc:
                        log.warning("monitoring check failed: %s", exc)
                self._wake.clear()
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
                # cancellation that lands as the wait completes (a reload's wake-up
                # just before SIGTERM), and the daemon would never finish stopping.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._sleep_s()):
                        await self._wake.wait()
        finally:
            if self._posts:
                await asyncio.wait(self._posts, timeout=ALERT_TIMEOUT_S)
            await self._session.close()

    def _sleep_s(self) -> float:
        depths = min(DEPTH_INTERVAL_S, self.config.interval_ms / 1000)
        if not self.config.enabled:
            return depths
        return max(0.0, min(depths, self._next_check - time.monotonic()))

    def check(self) -> None:
        """One alert round over the latest depths: compute rates, raise or clear alerts."""
        now = time.monotonic()
        elapsed = max(now - self._last_check, 1e-6)
        self._last_check = now
        self.broker_state_changed(self._source.broker_connected)
        for sample in self._source.samples():
            reading = self.readings.setdefault(sample.queue, QueueReading())
            self._rates(reading, sample, elapsed)
            self._evaluate(sample, reading)

    def broker_state_changed(self, connected: bool) -> None:
        if not self.config.enabled:
            return
        self._set("broker_disconnected", not connected, "the AMQP connection to RabbitMQ is down")

    async def poll_depths(self) -> None:
        """Read every queue's and DLQ's depth into the readings and the gauges."""
        if not self._source.broker_connected:
            return
        channel = await self._source.monitor_channel()
        for sample in self._source.samples():
            depth = await queue_depth(channel, sample.queue)
            dead = await queue_depth(channel, dead_letter_queue_name(sample.queue))
            reading = self.readings.setdefault(sample.queue, QueueReading())
            reading.depth, reading.dead_letter_depth = depth, dead
            reading.depth_at = time.time()
            self._metrics.queue_depth.labels(sample.queue).set(depth)
            self._metrics.dead_letter_depth.labels(sample.queue).set(dead)

    @staticmethod
    def _rates(reading: QueueReading, sample: QueueSample, elapsed: float) -> None:
        finished = sample.finished - reading.last_finished
        failed = sample.failed - reading.last_failed
        reading.last_finished, reading.last_failed = sample.finished, sample.failed
        reading.rate_per_s = finished / elapsed
        reading.error_rate = failed / finished if finished >= MIN_SAMPLE else 0.0

    def _evaluate(self, sample: QueueSample, reading: QueueReading) -> None:
        cfg = self.config
        queue = sample.queue
        depth = reading.depth or 0
        self._set(
            f"queue_size:{queue}",
            depth > cfg.queue_size_threshold,
            f"{queue} holds {depth} ready messages (threshold {cfg.queue_size_threshold})",
        )
        self._set(
            f"error_rate:{queue}",
            reading.error_rate > cfg.error_rate_threshold,
            f"{queue} failed {reading.error_rate:.0%} of its jobs in the last interval "
            f"(threshold {cfg.error_rate_threshold:.0%})",
        )
        delay_ms = sample.oldest_in_flight_s * 1000
        self._set(
            f"processing_delay:{queue}",
            delay_ms > cfg.processing_delay_threshold_ms,
            f"the oldest job in flight on {queue} started {delay_ms:.0f} ms ago "
            f"(threshold {cfg.processing_delay_threshold_ms} ms)",
        )

    def _set(self, name: str, active: bool, detail: str) -> None:
        if active == (name in self.active):
            return
        gauge = self._metrics.alert_active.labels(name)
        if active:
            self.active[name] = Alert(name, detail)
            gauge.set(1)
            log.warning("alert raised: %s: %s", name, detail, extra={"alert": name})
        else:
            del self.active[name]
            gauge.set(0)
            log.warning("alert cleared: %s", name, extra={"alert": name})
        if self.config.alert_webhook_url and self._session and not self._session.closed:
            self._post(
                {"alert": name, "state": "raised" if active else "cleared", "detail": detail}
            )

    def _post(self, event: dict[str, Any]) -> None:
        event |= {
            "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "host": socket.gethostname(),
            "service": "formcraftd",
            "version": __version__,
        }
        task = asyncio.get_running_loop().create_task(self._send(event))
        self._posts.add(task)
        task.add_done_callback(self._posts.discard)

    async def _send(self, event: dict[str, Any]) -> None:
        url = self.config.alert_webhook_url
        if self._session is None or not url:
            return
        try:
            async with self._session.post(url, json=event) as response:
                if response.status >= 300:
                    log.warning("alert sink answered %d for %s", response.status, event["alert"])
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning("alert sink unreachable for %s: %s", event["alert"], type(exc).__name__)

    def describe(self) -> dict[str, Any]:
        """What the rates and depths of the status output cover, for its readers."""
        interval_s = self.config.interval_ms / 1000
        return {
            "alerts_enabled": self.config.enabled,
            "rates_over_s": interval_s,
            "error_rate_min_jobs": MIN_SAMPLE,
            "depths_every_s": min(DEPTH_INTERVAL_S, interval_s),
        }

    def snapshot(self) -> list[dict[str, Any]]:
        return [
            {
                "alert": alert.name,
                "detail": alert.detail,
                "since": dt.datetime.fromtimestamp(alert.since, dt.UTC).isoformat(
                    timespec="seconds"
                ),
            }
            for alert in self.active.values()
        ]
