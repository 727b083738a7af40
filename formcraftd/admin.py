"""The daemon's admin operations: what `/admin/*` does beyond reading state.

Pausing and resuming a queue, peeking at and replaying dead letters, closing a
breaker, and the suppression list. :class:`AdminOperations` is a part of
:class:`formcraftd.daemon.Daemon` (which provides the attributes declared
below); it is a module of its own so that the daemon's file holds the
daemon's life cycle, and this one what an operator asks of it.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from aio_pika.abc import AbstractChannel

from formcraftd.amqp import dead_letters
from formcraftd.amqp.consumer import Consumer
from formcraftd.amqp.topology import main_queue_hint
from formcraftd.core.bounces import BounceIntake
from formcraftd.core.breakers import BreakerRegistry
from formcraftd.core.config import Config
from formcraftd.ops.http import Unavailable, UnknownQueue

if TYPE_CHECKING:
    from formcraftd.workers.email.suppression import SuppressionList

log = logging.getLogger("formcraftd.daemon")


class AdminOperations:
    """The admin API's operations, over the daemon's consumers, breakers and email worker."""

    config: Config
    consumers: dict[str, Consumer]
    breakers: BreakerRegistry
    _bounces: BounceIntake | None
    _suppression: SuppressionList | None

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
