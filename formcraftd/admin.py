"""What the HTTP server asks of the daemon (:class:`formcraftd.ops.http.Control`).

Health and readiness, the status snapshot and the metrics, then the admin
operations: pausing and resuming a queue, peeking at and replaying dead
letters, closing a breaker, and the suppression list (a reload is the daemon's
own: it is part of its life cycle). :class:`AdminOperations` is a part of
:class:`formcraftd.daemon.Daemon` (which provides the attributes declared
below); it is a module of its own so that the daemon's file holds the daemon's
life cycle, and this one what an operator asks of it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

from aio_pika.abc import AbstractChannel

from formcraftd import __version__
from formcraftd.amqp import dead_letters
from formcraftd.amqp.connection import Broker
from formcraftd.amqp.consumer import Consumer
from formcraftd.amqp.topology import main_queue_hint
from formcraftd.core.bounces import BounceIntake
from formcraftd.core.breakers import BreakerRegistry
from formcraftd.core.config import Config, WorkerKind
from formcraftd.core.text import utc_timestamp
from formcraftd.ops.endpoints import EndpointHealth
from formcraftd.ops.http import Unavailable, UnknownQueue
from formcraftd.ops.metrics import Metrics
from formcraftd.ops.monitor import Monitor
from formcraftd.ops.reload import Reloader

if TYPE_CHECKING:
    from formcraftd.workers.email.suppression import SuppressionList

log = logging.getLogger("formcraftd.daemon")


def _timestamp(instant: float | None) -> str | None:
    return utc_timestamp(instant) if instant is not None else None


class AdminOperations:
    """Health, status, metrics and the admin operations, over the daemon's parts."""

    config: Config
    consumers: dict[str, Consumer]
    breakers: BreakerRegistry
    _bounces: BounceIntake | None
    _suppression: SuppressionList | None
    broker: Broker
    kinds: dict[str, WorkerKind]
    metrics: Metrics
    monitor: Monitor
    endpoints: EndpointHealth
    reloader: Reloader
    started: asyncio.Event
    started_at: float
    _should_exit: asyncio.Event

    # --- health, status, metrics --------------------------------------------------------

    def _queue_states(self) -> dict[str, dict[str, Any]]:
        connected = self.broker.connected
        return {
            name: {
                "state": consumer.state if connected else "disconnected",
                "consuming": connected and consumer.consuming,
                "in_flight": consumer.in_flight,
                "concurrency": consumer.limiter.limit,
            }
            for name, consumer in self.consumers.items()
        }

    def health(self) -> tuple[bool, dict[str, Any]]:
        queues = self._queue_states()
        healthy = (
            self.started.is_set()
            and self.broker.connected
            and all(q["consuming"] or q["state"] == "paused" for q in queues.values())
        )
        return healthy, {
            "status": "ok" if healthy else "unavailable",
            "version": __version__,
            "broker": {"connected": self.broker.connected, "reconnects": self.broker.reconnects},
            "queues": queues,
            "last_reload": self.reloader.last,
        }

    def ready(self) -> tuple[bool, dict[str, Any]]:
        healthy, body = self.health()
        ready = healthy and not self._should_exit.is_set()
        body["status"] = (
            "ok" if ready else ("draining" if self._should_exit.is_set() else "unavailable")
        )
        return ready, body

    def render_metrics(self) -> bytes:
        return self.metrics.render()

    def admin_token(self) -> str:
        return self.config.http.admin_token

    def status(self) -> dict[str, Any]:
        """The snapshot behind /admin/status and the status page (no secrets)."""
        queues = self._queue_states()
        for name, entry in queues.items():
            reading = self.monitor.readings.get(name)
            consumer = self.consumers[name]
            entry |= {
                "kind": self.kinds[name],
                "depth": reading.depth if reading else None,
                "dead_letter_depth": reading.dead_letter_depth if reading else None,
                "depth_at": _timestamp(reading.depth_at if reading else None),
                "rate_per_s": round(reading.rate_per_s, 3) if reading else 0.0,
                "error_rate": round(reading.error_rate, 3) if reading else 0.0,
                "finished": consumer.stats.finished,
                "failed": consumer.stats.failed,
            }
        return {
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 1),
            "config_source": self.config.source,
            "broker": {"connected": self.broker.connected, "reconnects": self.broker.reconnects},
            "queues": queues,
            "breakers": self.breakers.snapshot(),
            "endpoints": self.endpoints.snapshot(),
            "bounce_mailbox": self._mailbox_status(),
            "alerts": self.monitor.snapshot(),
            "monitoring": self.monitor.describe(),
            "last_reload": self.reloader.last,
        }

    # --- admin operations ---------------------------------------------------------------

    async def monitor_channel(self) -> AbstractChannel:
        """A channel for passive declares and DLQ tools (the daemon's)."""
        raise NotImplementedError

    def _consumer(self, queue: str) -> Consumer:
        consumer = self.consumers.get(queue)
        if consumer is None:
            hint = main_queue_hint(queue, self.consumers)
            raise UnknownQueue(f"no consumer for queue {queue!r}{hint}")
        return consumer

    async def pause(self, queue: str) -> dict[str, Any]:
        consumer = self._consumer(queue)
        await consumer.pause()
        log.info("paused %s", queue)
        return {"queue": queue, "state": consumer.state}

    async def resume(self, queue: str) -> dict[str, Any]:
        consumer = self._consumer(queue)
        await consumer.resume()
        log.info("resumed %s", queue)
        return {"queue": queue, "state": consumer.state}

    async def dlq_peek(self, queue: str, limit: int) -> list[dict[str, Any]]:
        self._consumer(queue)
        return await dead_letters.peek(await self.monitor_channel(), queue, limit)

    async def dlq_replay(
        self,
        queue: str,
        limit: int | None,
        *,
        only: dead_letters.ReplayFilter | None = None,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        self._consumer(queue)
        result = await dead_letters.replay(
            await self.monitor_channel(), queue, limit, only=only, dry_run=dry_run
        )
        if not dry_run:
            log.info("replayed %d dead letters of %s", result.replayed, queue)
        return result.as_json(queue)

    def breaker_reset(self, key: str) -> bool:
        reset = self.breakers.reset(key)
        if reset:
            log.info("breaker %s reset by the admin API", key)
        return reset

    # --- bounces and the suppression list ---------------------------------------------

    def bounce_intake(self) -> BounceIntake | None:
        """The email worker's bounce intake with the running config's settings."""
        if self._bounces is None:
            return None
        return dataclasses.replace(self._bounces, config=self.config.workers.email.bounces)

    def _mailbox_status(self) -> dict[str, Any] | None:
        mailbox = self._bounces.mailbox if self._bounces is not None else None
        if mailbox is None:
            return None
        return {"connected": mailbox.connected, "last_error": mailbox.last_error}

    def _suppression_list(self) -> SuppressionList:
        if self._suppression is None:
            raise Unavailable("the email worker is not running here; see `formcraftd suppression`")
        return self._suppression

    async def suppression_entries(self, reason: str | None) -> list[dict[str, Any]]:
        entries = await self._suppression_list().entries(reason)
        return [dataclasses.asdict(entry) for entry in entries]

    async def suppression_remove(self, address: str) -> bool:
        removed = await self._suppression_list().remove(address)
        if removed:
            log.info("%s taken off the suppression list by the admin API", address.casefold())
        return removed
