"""The delivery-events publisher: a bounded buffer, published in the background.

Publishing never slows or fails a job: :meth:`EventPublisher.emit` only puts the
event in a bounded buffer; a background task publishes it, with publisher
confirms, on a connection of its own (a broker that blocks publishers blocks
only that connection). When the buffer is full or the broker refuses, the
event is dropped and counted (`formcraftd_events_dropped_total`). The events
themselves are in :mod:`formcraftd.core.events`.
"""

from __future__ import annotations

import asyncio
import binascii
import collections
import contextlib
import logging
import os
import time

import aio_pika
import msgspec
from aio_pika.abc import AbstractChannel
from aiormq.abc import AbstractChannel as AmqpChannel
from pamqp.commands import Basic
from prometheus_client import Counter

from formcraftd.amqp.connection import Broker
from formcraftd.core.config import BrokerConfig, EventsConfig
from formcraftd.core.events import Event, routing_key

log = logging.getLogger("formcraftd.events")

BUFFER_SIZE = 10_000
BATCH_SIZE = 500  # events published before their confirms are awaited together
# A batch smaller than BATCH_SIZE waits this long for more events first: a batch costs
# a socket write and a confirm frame to read, so at a few events a millisecond one
# event per batch would cost several times what it costs in a batch of dozens.
GATHER_S = 0.005
PUBLISH_TIMEOUT_S = 10.0  # per batch: connecting, sending and every confirm
CLOSE_TIMEOUT_S = 5.0
DROP_WARNING_INTERVAL_S = 60.0
_MESSAGE_ID_BYTES = 16  # random bytes per message id, sent as 32 hex digits
_MESSAGE_ID_CHARS = 2 * _MESSAGE_ID_BYTES
_encoder = msgspec.json.Encoder()


class EventPublisher:
    """Publishes events in the background from a bounded buffer; never blocks a job."""

    def __init__(self, config: EventsConfig, broker: BrokerConfig, dropped: Counter) -> None:
        self._config = config
        self._dropped = dropped
        # at most BUFFER_SIZE events wait; a deque, as `emit()` runs once per attempt and
        # an asyncio.Queue would wake its getter (and count unfinished tasks) every time
        self._buffer: collections.deque[Event] = collections.deque()
        self._wakeup: asyncio.Future[None] | None = None  # what `run()` awaits while parked
        self._parked = True  # `run()` waits for an event (or has not started)
        self._broker = Broker(broker, name="formcraftd events")
        self._channel: AbstractChannel | None = None  # the exchange is declared on it
        self._last_warning = -DROP_WARNING_INTERVAL_S
        self._dropped_since_warning = 0
        self._idle = asyncio.Event()  # set while nothing waits to be published
        self._idle.set()
        self.published = 0

    @property
    def enabled(self) -> bool:
        return self._config.enabled

    def emit(self, event: Event) -> None:
        """Queue `event` for publishing; drop (and count) it when the buffer is full."""
        if not self._config.enabled:
            return
        if len(self._buffer) >= BUFFER_SIZE:
            self._dropped.inc()
            return
        self._buffer.append(event)
        if self._parked:  # otherwise `run()` is busy and looks at the buffer once done
            self._parked = False
            self._idle.clear()
            if self._wakeup is not None and not self._wakeup.done():
                self._wakeup.set_result(None)

    async def run(self) -> None:
        """Publish until cancelled, in batches whose confirms are awaited together."""
        if not self._config.enabled:
            return
        buffer = self._buffer
        try:
            while True:
                if not buffer:
                    self._parked = True
                    self._idle.set()
                    self._wakeup = asyncio.get_running_loop().create_future()
                    try:
                        await self._wakeup
                    finally:
                        self._wakeup = None
                self._parked = False
                if len(buffer) < BATCH_SIZE:
                    await asyncio.sleep(GATHER_S)
                if len(buffer) <= BATCH_SIZE:
                    batch = list(buffer)
                    buffer.clear()
                else:
                    batch = [buffer.popleft() for _ in range(BATCH_SIZE)]
                await self._publish(batch)
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await self._broker.aclose()

    async def drained(self) -> None:
        """Return once every buffered event has been published (or dropped)."""
        await self._idle.wait()

    async def _publish(self, batch: list[Event]) -> None:
        """Publish `batch`; what the broker does not confirm in time is dropped and counted.

        Every event is published at once and their confirms are awaited together:
        an event counts as published only once the broker acked it; a nack, a
        channel or connection lost before the ack, or the batch timing out drops it.
        """
        published = 0
        error: BaseException | None = None
        sends: list[asyncio.Task[object]] = []
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                channel = await self._ensure_channel()
                exchange = self._config.exchange
                bodies = _encoder.encode_lines(batch).split(b"\n")
                ids = binascii.hexlify(os.urandom(_MESSAGE_ID_BYTES * len(batch))).decode()
                for index, event in enumerate(batch):
                    key = routing_key(event)
                    message_id = ids[index * _MESSAGE_ID_CHARS : (index + 1) * _MESSAGE_ID_CHARS]
                    properties = Basic.Properties(
                        content_type="application/json",
                        delivery_mode=2,
                        message_id=message_id,
                        message_type=key,
                    )
                    sends.append(
                        asyncio.ensure_future(
                            channel.basic_publish(
                                bodies[index],
                                exchange=exchange,
                                routing_key=key,
                                properties=properties,
                            )
                        )
                    )
                # asyncio.wait, not gather: a failure must not cancel the other publishes
                await asyncio.wait(sends)
        except Exception as exc:  # a timeout, no connection, or no usable exchange
            error = exc
        for send in sends:
            if not send.done():
                send.cancel()
            elif not send.cancelled() and send.exception() is None:
                if isinstance(send.result(), Basic.Ack):
                    published += 1
            elif error is None and not send.cancelled():
                error = send.exception()
        self.published += published
        if failures := len(batch) - published:
            self._dropped.inc(failures)
            self._warn_dropped(failures, error)
            if self._channel is not None and self._channel.is_closed:
                await self._forget_channel()  # open one and re-declare next time

    def _warn_dropped(self, count: int, example: BaseException | None) -> None:
        """One warning per outage, then at most one a minute (not one per event)."""
        now = time.monotonic()
        self._dropped_since_warning += count
        if now - self._last_warning < DROP_WARNING_INTERVAL_S:
            return
        log.warning(
            "dropped %d delivery events (%s); formcraftd_events_dropped_total counts them",
            self._dropped_since_warning,
            "unconfirmed" if example is None else type(example).__name__,
        )
        self._dropped_since_warning = 0
        self._last_warning = now

    async def _ensure_channel(self) -> AmqpChannel:
        """The confirming channel to publish on, connecting and declaring the exchange first.

        The connection is the publisher's own :class:`Broker`, which reconnects by
        itself, round the node list; this waits for it (within the batch's timeout)
        and opens a channel again when the one it had is gone.
        """
        self._broker.start()
        connection = await self._broker.ready()
        if self._channel is None or self._channel.is_closed:
            channel = await connection.channel(publisher_confirms=True)
            try:
                await channel.declare_exchange(
                    self._config.exchange, aio_pika.ExchangeType.TOPIC, durable=True
                )
            except Exception:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(CLOSE_TIMEOUT_S):
                        await channel.close()
                raise
            self._channel = channel
        return await self._channel.get_underlay_channel()

    async def _forget_channel(self) -> None:
        """Close a channel the broker closed (e.g. the exchange was deleted under it)."""
        channel, self._channel = self._channel, None
        if channel is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await channel.close()
