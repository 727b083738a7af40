"""The one generic consumer: one queue, its own channel, its own concurrency limit.

It subscribes on the AMQP channel itself (aiormq's ``basic_consume``), hands
each delivery to the queue's :class:`~formcraftd.amqp.pipeline.JobPipeline` in a
task of its own task group, and keeps consuming through whatever happens to
the channel: after a reconnection (the broker calls it with the new
connection), after a channel error, or when the broker cancels the consumer
(its queue was deleted), it opens a channel again, declares the queue and
consumes, unless it is paused or stopping. Stopping unsubscribes, returns the
deliveries still waiting for a slot, lets the rest finish until the deadline,
and sends the last acks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from typing import Any, Literal

from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq.abc import AbstractChannel as AmqpChannel
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from formcraftd.amqp.acks import Acks, Delivery
from formcraftd.amqp.connection import Broker
from formcraftd.amqp.pipeline import JobPipeline
from formcraftd.amqp.quarantine import set_aside_undecodable
from formcraftd.amqp.republisher import Republisher
from formcraftd.amqp.topology import WorkerTopology, declare_consumer_queue
from formcraftd.core.attempts import AttemptReporter
from formcraftd.core.breakers import BreakerRegistry
from formcraftd.core.config import AnyWorkerConfig, BreakerConfig, DaemonConfig, WorkerKind
from formcraftd.core.handler import Handler
from formcraftd.core.limits import ResizableLimiter
from formcraftd.core.stats import QueueStats
from formcraftd.core.text import one_line
from formcraftd.core.tracing import NO_TRACER, Tracer

log = logging.getLogger("formcraftd.consumer")

ConsumerState = Literal["starting", "consuming", "paused", "stopping", "stopped"]

RESUBSCRIBE_DELAYS_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # between attempts to consume again


class Consumer:
    """Consumes one queue on its own channel, within its own concurrency limit."""

    def __init__(
        self,
        *,
        kind: WorkerKind,
        worker: AnyWorkerConfig,
        topology: WorkerTopology,
        handler: Handler[Any],
        broker: Broker,
        breakers: BreakerRegistry,
        breaker_config: BreakerConfig,
        daemon_config: DaemonConfig,
        stats: QueueStats,
        reporter: AttemptReporter,
        prefetch: int,
        tracer: Tracer = NO_TRACER,
    ) -> None:
        self.queue_name = worker.queue
        self.kind = kind
        self.prefetch = prefetch  # what the channel's QoS is set to
        self.handler = handler
        self.stats = stats
        self.state: ConsumerState = "starting"
        self.subscribed = asyncio.Event()
        self._topology = topology
        self._broker = broker
        self._acks = Acks(batch=_ack_batch(prefetch), on_lost=self._acks_lost)
        self._pipeline = JobPipeline(
            kind=kind,
            worker=worker,
            handler=handler,
            acks=self._acks,
            breakers=breakers,
            breaker_config=breaker_config,
            daemon_config=daemon_config,
            stats=stats,
            reporter=reporter,
            count_redeliveries=topology.main.arguments.get("x-queue-type") == "classic",
            tracer=tracer,
        )
        self._channel: AbstractChannel | None = None
        self._underlay: AmqpChannel | None = None  # the AMQP channel we consume on
        self._tag: str | None = None
        self._restoring = asyncio.Lock()
        self._scanned_loss: BaseException | None = None  # the loss already scanned for
        self._resubscribing: asyncio.Task[None] | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._stop = asyncio.Event()
        self._deadline = 0.0
        self._tasks: set[asyncio.Task[None]] = set()  # every message not yet settled

    # --- what the daemon reads --------------------------------------------------------

    @property
    def consuming(self) -> bool:
        channel = self._channel
        return (
            self.state == "consuming"
            and self._tag is not None
            and channel is not None
            and not channel.is_closed
        )

    @property
    def limiter(self) -> ResizableLimiter:
        return self._pipeline.limiter

    @property
    def in_flight(self) -> int:
        return self._pipeline.in_flight

    def oldest_in_flight_s(self) -> float:
        """Age in seconds of the oldest job a handler is working on (0 when idle)."""
        return self._pipeline.oldest_in_flight_s()

    # --- lifecycle --------------------------------------------------------------------

    async def run(self) -> None:
        """Consume until :meth:`stop`, then drain in-flight jobs by the deadline."""
        self._broker.add_listener(self._on_reconnected)
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                await self._open_channel()
                flusher = tg.create_task(self._acks.run())
                await self._subscribe()
                self.subscribed.set()
                await self._stop.wait()
                self.state = "stopping"
                if self._resubscribing is not None:
                    self._resubscribing.cancel()
                await self._unsubscribe()
                self._requeue_waiting()
                await self._drain()
                await self._acks.flush(everything=True)
                flusher.cancel()
        finally:
            self._broker.remove_listener(self._on_reconnected)
            self._tg = None
            self.state = "stopped"
            channel = self._channel
            if channel is not None and not channel.is_closed:
                await channel.close()

    def stop(self, deadline: float) -> None:
        """Ask the consumer to stop; in-flight jobs may run until monotonic `deadline`."""
        self._deadline = deadline
        self._stop.set()

    async def set_prefetch(self, prefetch: int) -> None:
        """Change the channel's prefetch; a live consumer is re-subscribed to pick it up.

        Messages already delivered stay with this channel and are settled as
        usual, so nothing is lost or delivered twice.
        """
        if prefetch == self.prefetch:
            return
        self.prefetch = prefetch
        self._acks.set_batch(_ack_batch(prefetch))
        channel = self._channel
        if channel is None or channel.is_closed:
            return  # the next channel is opened with the new prefetch
        if self.state != "consuming":
            await channel.set_qos(prefetch_count=prefetch)
            return
        await self._unsubscribe()
        await channel.set_qos(prefetch_count=prefetch)
        await self._subscribe()

    async def pause(self) -> None:
        if self.state == "consuming":
            await self._unsubscribe()
            self.state = "paused"

    async def resume(self) -> None:
        if self.state == "paused":
            await self._subscribe()

    def reconfigure(
        self, worker: AnyWorkerConfig, breaker_config: BreakerConfig, daemon_config: DaemonConfig
    ) -> None:
        """Apply live settings: concurrency, retry schedule, breaker and size limits."""
        self._pipeline.reconfigure(worker, breaker_config, daemon_config)

    # --- the channel and the subscription ---------------------------------------------

    async def _open_channel(self) -> None:
        """A channel of our own, the queue declared on it, and the republisher for it."""
        channel = await self._broker.channel(prefetch=self.prefetch)
        try:
            await declare_consumer_queue(channel, self._topology.main)
            republisher = await Republisher.open(
                channel, self.queue_name, self._topology.dead_letter_exchange
            )
        except BaseException:
            if not channel.is_closed:
                await channel.close()
            raise
        channel.close_callbacks.add(self._on_channel_closed)
        self._channel, self._tag = channel, None
        self._pipeline.republisher = republisher

    async def _subscribe(self) -> None:
        if self._channel is None:
            raise RuntimeError("the consumer has no channel")
        underlay = await self._channel.get_underlay_channel()
        if underlay is not self._underlay:
            underlay.on_consumer_cancel_callbacks.add(self._on_cancelled)
        ok = await underlay.basic_consume(self.queue_name, self._on_delivery, no_ack=False)
        self._underlay, self._tag = underlay, ok.consumer_tag
        self.state = "consuming"

    async def _unsubscribe(self) -> None:
        underlay, tag = self._underlay, self._tag
        self._tag = None
        if underlay is None or tag is None or underlay.is_closed:
            return
        try:
            await underlay.basic_cancel(tag)
        except Exception as exc:  # the channel may be closing under us
            log.warning("cancelling consumer of %s failed: %s", self.queue_name, exc)

    async def _restore(self) -> None:
        """A channel again if ours is closed, the queue declared, and consuming unless paused."""
        async with self._restoring:
            if self._stop.is_set():
                return
            channel = self._channel
            if channel is None or channel.is_closed:
                await self._open_channel()
                channel = self._channel
            await self._set_aside_undecodable()
            if self.state == "consuming" and self._tag is None:
                assert channel is not None
                await declare_consumer_queue(channel, self._topology.main)
                await self._subscribe()

    async def _set_aside_undecodable(self) -> None:
        """After a loss to an undecodable frame: take such messages off the queue, once."""
        loss = self._broker.last_loss
        if loss is self._scanned_loss or not self._broker.lost_to_an_undecodable_frame():
            return
        republisher = self._pipeline.republisher
        assert republisher is not None, "opened with the channel"

        async def set_aside(body: bytes, reason: str) -> None:
            await republisher.set_aside(body, reason)
            self.stats.dead_letter += 1
            self.stats.count_error("VALIDATION_ERROR")

        scan = max(2 * self.prefetch, 50)
        await set_aside_undecodable(self._broker.node_url, self.queue_name, scan, set_aside)
        self._scanned_loss = loss

    async def _on_reconnected(self, _connection: AbstractConnection) -> None:
        """The broker reconnected: our channel went with the old connection."""
        try:
            await self._restore()
        except Exception as exc:
            log.error(
                "%s: could not consume again after reconnecting: %s", self.queue_name, one_line(exc)
            )
            self._start_resubscribing()

    def _on_channel_closed(self, channel: object, exc: BaseException | None = None) -> None:
        if channel is not self._channel or self._stop.is_set():
            return
        self._tag = None
        if self._broker.connected:  # a channel error; a lost connection is the broker's
            log.warning("%s: channel closed (%s); opening another", self.queue_name, exc)
            self._start_resubscribing()

    def _on_cancelled(self, frame: Basic.Cancel) -> None:
        """The broker cancelled our consumer (e.g. the queue was deleted): subscribe again."""
        if frame.consumer_tag != self._tag:
            return
        self._tag = None
        log.warning("%s: the broker cancelled our consumer; subscribing again", self.queue_name)
        self._start_resubscribing()

    def _start_resubscribing(self) -> None:
        if self._tg is None or self._stop.is_set() or self._resubscribing is not None:
            return
        self._resubscribing = self._tg.create_task(self._resubscribe())

    async def _resubscribe(self) -> None:
        """Try :meth:`_restore` with growing pauses until it works or we stop."""
        try:
            for attempt in itertools.count():
                delay = RESUBSCRIBE_DELAYS_S[min(attempt, len(RESUBSCRIBE_DELAYS_S) - 1)]
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stop.wait()
                if self._stop.is_set():
                    return
                try:
                    await self._restore()
                except Exception as exc:
                    log.warning("%s: subscribing again failed: %s", self.queue_name, one_line(exc))
                    continue
                log.info("%s: consuming again", self.queue_name)
                return
        finally:
            self._resubscribing = None

    # --- deliveries ---------------------------------------------------------------------

    async def _on_delivery(self, raw: DeliveredMessage) -> None:
        # The channel calls this in a task of its own, which a closing channel
        # cancels; the work goes to a task owned by this consumer's task group,
        # so a job in flight finishes (and is remembered as settled) even then.
        if self._tg is None:
            return  # the consumer has finished: closing its channel returns the message
        message = Delivery(raw)
        self._acks.track(message)
        if self._stop.is_set():
            self._tg.create_task(self._acks.nack(message))
            return
        task = self._tg.create_task(self._pipeline.process(message))
        self._tasks.add(task)
        self._pipeline.waiting[message] = task
        task.add_done_callback(self._tasks.discard)

    def _acks_lost(self, count: int) -> None:
        log.warning(
            "%s: %d acks lost with their channel; the broker will redeliver those jobs, "
            "which are recognised as settled and not run again",
            self.queue_name,
            count,
        )

    def _requeue_waiting(self) -> None:
        """Jobs that never got a concurrency slot go back to the queue at once."""
        for task in list(self._pipeline.waiting.values()):
            task.cancel()

    async def _drain(self) -> None:
        """Wait for unsettled jobs until the deadline (which a forced stop moves to now)."""
        if self._tasks:
            log.info(
                "%s: waiting up to %.1f s for %d in-flight jobs",
                self.queue_name,
                max(0.0, self._deadline - time.monotonic()),
                len(self._tasks),
            )
        while self._tasks and (remaining := self._deadline - time.monotonic()) > 0:
            await asyncio.wait(list(self._tasks), timeout=min(remaining, 0.1))
        if self._tasks:
            log.warning(
                "%s: %d jobs still running at the deadline; returning them to the queue",
                self.queue_name,
                len(self._tasks),
            )
            for task in self._tasks:
                task.cancel()


def _ack_batch(prefetch: int) -> int:
    """Due acks that are flushed without waiting: a quarter of the prefetch window."""
    return max(1, prefetch // 4)
