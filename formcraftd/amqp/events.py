"""The delivery-events publisher: a bounded buffer, published in the background.

Publishing never slows or fails a job: :meth:`EventPublisher.emit` only puts the
event in a bounded buffer; a background task publishes it, with publisher
confirms, on a connection of its own (:mod:`formcraftd.amqp.confirms`: a
batch is one write; a broker that blocks publishers blocks only that
connection). When the buffer is full or the broker refuses, the
event is dropped and counted (`formcraftd_events_dropped_total`). The events
themselves are in :mod:`formcraftd.core.events`.

With `[events] events_per_message` above 1 a batch goes out as fewer, larger
messages: its events grouped by routing key, each group in arrays of up to that
many (header `x-formcraft-events`). Each message costs the broker about what a
job costs it, so that saves most of what events cost; a message the broker
does not confirm drops every event in it.
"""

from __future__ import annotations

import asyncio
import binascii
import collections
import contextlib
import logging
import os
import time

import msgspec
from prometheus_client import Counter

from formcraftd.amqp.confirms import ConfirmingPublisher, Outgoing
from formcraftd.core.config import BrokerConfig, EventsConfig
from formcraftd.core.events import BATCH_HEADER, Event, routing_key

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
        self._nodes = [url.strip() for url in broker.url.split(",") if url.strip()]
        self._next_node = 0
        self._publisher: ConfirmingPublisher | None = None
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
            await self._forget_publisher()

    async def drained(self) -> None:
        """Return once every buffered event has been published (or dropped)."""
        await self._idle.wait()

    async def _publish(self, batch: list[Event]) -> None:
        """Publish `batch`; what the broker does not confirm in time is dropped and counted.

        An event counts as published only once the broker acked it: a nack, the
        connection lost before the ack, or the batch timing out drops it.
        """
        published = 0
        error: BaseException | None = None
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                publisher = await self._ensure_publisher()
            per_message = self._config.events_per_message
            if per_message == 1:
                published = await publisher.publish(_one_per_message(batch), PUBLISH_TIMEOUT_S)
            else:
                messages, weights = _arrays(batch, per_message)
                published = await publisher.publish(messages, PUBLISH_TIMEOUT_S, weights)
            error = publisher.closed
        except Exception as exc:  # a timeout, no connection, or no usable exchange
            error = exc
        self.published += published
        if failures := len(batch) - published:
            self._dropped.inc(failures)
            self._warn_dropped(failures, error)
        if error is not None:
            await self._forget_publisher()  # connect (and declare) again next time

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

    async def _ensure_publisher(self) -> ConfirmingPublisher:
        """The events connection, opened (and the exchange declared) when there is none.

        Each opening tries the next node of `broker.url`, so a node that is gone
        costs one failed batch, not every batch.
        """
        if self._publisher is not None and self._publisher.closed is not None:
            await self._forget_publisher()  # the broker closed it meanwhile
        if self._publisher is None:
            url = self._nodes[self._next_node % len(self._nodes)]
            self._next_node += 1
            self._publisher = await ConfirmingPublisher.open(url, self._config.exchange)
        return self._publisher

    async def _forget_publisher(self) -> None:
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await publisher.close()


def _one_per_message(batch: list[Event]) -> list[Outgoing]:
    """One message per event, its body the event's JSON object."""
    bodies = _encoder.encode_lines(batch).split(b"\n")
    ids = _message_ids(len(batch))
    return [
        (routing_key(event), bodies[n], ids[n * _MESSAGE_ID_CHARS : (n + 1) * _MESSAGE_ID_CHARS])
        for n, event in enumerate(batch)
    ]


def _arrays(batch: list[Event], per_message: int) -> tuple[list[Outgoing], list[int]]:
    """The events grouped by routing key, as JSON arrays of up to `per_message`; and
    how many events each message carries.

    Groups go out in the order of their first event, and each keeps the order
    in which its events were emitted.
    """
    groups: dict[str, list[Event]] = {}
    for event in batch:
        groups.setdefault(routing_key(event), []).append(event)
    chunks = [
        (key, events[start : start + per_message])
        for key, events in groups.items()
        for start in range(0, len(events), per_message)
    ]
    ids = _message_ids(len(chunks))
    messages: list[Outgoing] = [
        (
            key,
            _encoder.encode(chunk),
            ids[n * _MESSAGE_ID_CHARS : (n + 1) * _MESSAGE_ID_CHARS],
            {BATCH_HEADER: len(chunk)},
        )
        for n, (key, chunk) in enumerate(chunks)
    ]
    return messages, [len(chunk) for _, chunk in chunks]


def _message_ids(count: int) -> str:
    """`count` random message ids, concatenated (each _MESSAGE_ID_CHARS hex digits)."""
    return binascii.hexlify(os.urandom(_MESSAGE_ID_BYTES * count)).decode()
