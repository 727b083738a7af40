"""Deliveries as the consumer takes them off the channel, and their acks, sent in batches.

The consumer subscribes on the AMQP channel itself (aiormq) rather than
through aio-pika's `Queue.consume`: a :class:`Delivery` is a thin view of the
frame that arrived, built without copying properties the consumer never
reads, and aio-pika's extra task per message is not spawned.

Acks are batched. A delivery whose outcome is settled is not acked on its
own: :class:`Acks` waits up to 10 ms for its neighbours and then sends
one ``basic.ack`` with ``multiple`` set for the highest delivery tag below
which every delivery is settled (sooner when a quarter of the prefetch
window is waiting). What settles out of order behind a slow job
is acked on its own at the next flush but one, so a slow job never holds the
rest of the prefetch window. The delay only postpones the ack: the outcome
(the webhook sent, the retry or dead letter confirmed) is already done, and a
delivery whose ack is lost with its channel is recognised as settled when it
comes back (:mod:`formcraftd.amqp.settled`). A ``basic.ack`` with ``multiple``
must name a tag the broker still holds, and must never cover a delivery that
is not settled; both are kept below.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from aiormq.abc import AbstractChannel, DeliveredMessage
from pamqp.commands import Basic

log = logging.getLogger("formcraftd.consumer")

FLUSH_DELAY_S = 0.01  # how long a settled delivery may wait for its neighbours


class Settled(enum.Enum):
    """Where a settled delivery's ack stands."""

    DUE = "due"  # settled, ack not sent yet
    SENT = "sent"  # the ack or nack is on the wire (or its channel is gone)


class Delivery:
    """One message as delivered to this consumer: what the consumer reads of it."""

    __slots__ = ("body", "channel", "properties", "redelivered", "tag")

    def __init__(self, message: DeliveredMessage) -> None:
        deliver = message.delivery
        assert isinstance(deliver, Basic.Deliver)
        self.body: bytes = message.body
        self.channel: AbstractChannel = message.channel
        self.tag: int = deliver.delivery_tag or 0
        self.redelivered: bool = bool(deliver.redelivered)
        self.properties: Basic.Properties = message.header.properties

    @property
    def headers(self) -> dict[str, Any] | None:
        return self.properties.headers

    @property
    def message_id(self) -> str | None:
        return self.properties.message_id

    @property
    def timestamp(self) -> dt.datetime | None:
        return self.properties.timestamp

    @property
    def content_type(self) -> str | None:
        return self.properties.content_type

    @property
    def content_encoding(self) -> str | None:
        return self.properties.content_encoding

    @property
    def correlation_id(self) -> str | None:
        return self.properties.correlation_id

    @property
    def priority(self) -> int | None:
        return self.properties.priority

    @property
    def type(self) -> str | None:
        return self.properties.message_type

    @property
    def app_id(self) -> str | None:
        return self.properties.app_id


class _Window:
    """The unacked deliveries of one channel, in delivery order (tags only grow)."""

    __slots__ = ("channel", "due", "held", "outstanding", "state")

    def __init__(self, channel: AbstractChannel) -> None:
        self.channel = channel
        self.outstanding: deque[int] = deque()  # tracked tags, oldest first
        self.state: dict[int, Settled] = {}  # settled tags still in `outstanding`
        self.due = 0  # how many of them are DUE
        self.held: set[int] = set()  # DUE tags a flush already had to leave behind

    def track(self, tag: int) -> None:
        outstanding = self.outstanding
        if not outstanding or tag > outstanding[-1]:
            outstanding.append(tag)
        else:  # never seen in practice (deliveries arrive in tag order); kept correct anyway
            outstanding.insert(sum(1 for t in outstanding if t < tag), tag)

    def advance(self) -> int:
        """Drop the settled prefix; the highest tag in it that still needs an ack (0: none)."""
        outstanding, state = self.outstanding, self.state
        upto = 0
        while outstanding and outstanding[0] in state:
            tag = outstanding.popleft()
            if state.pop(tag) is Settled.DUE:
                upto = tag
                self.due -= 1
        return upto


class Acks:
    """Acks (and nacks) one consumer's deliveries; acks go out in batches.

    `track` each delivery when it arrives, then settle it exactly once with
    `ack` (batched) or `nack` (sent at once). `run` is the background flusher;
    `flush(everything=True)` sends whatever is still due, before the channel closes.
    """

    def __init__(self, *, batch: int, on_lost: Callable[[int], None]) -> None:
        self._batch = max(1, batch)  # due acks that trigger a flush without waiting
        self._on_lost = on_lost  # called with how many acks were lost with a channel
        self._windows: dict[AbstractChannel, _Window] = {}
        self._window: _Window | None = None  # the current channel's (most deliveries)
        self._due = 0
        self._wanted = asyncio.Event()
        self._sending = asyncio.Lock()  # held while frames are queued, see nack()
        # the flusher's wait, cut short by a full batch
        self._wake: asyncio.Future[None] | None = None

    def set_batch(self, batch: int) -> None:
        self._batch = max(1, batch)

    @property
    def due(self) -> int:
        """Settled deliveries whose ack has not been sent yet."""
        return self._due

    def track(self, delivery: Delivery) -> None:
        """Note a delivery as unsettled; call it in delivery order, before anything else."""
        self._window_of(delivery.channel).track(delivery.tag)

    def ack(self, delivery: Delivery) -> None:
        """Settle `delivery` with an ack, sent by the next flush."""
        window = self._window_of(delivery.channel)
        window.state[delivery.tag] = Settled.DUE
        window.due += 1
        self._due += 1
        self._wanted.set()
        if self._due >= self._batch and self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def nack(self, delivery: Delivery, *, requeue: bool = True) -> bool:
        """Settle `delivery` with a nack, now; False when its channel is gone.

        The tag counts as settled only once its nack frame is queued, and frames
        are queued under the lock flushes hold too: the connection's frame queue is
        bounded, so a put can wait, and a multiple ack that overtook the nack would
        ack the delivery instead of returning it to the queue.
        """
        window = self._window_of(delivery.channel)
        async with self._sending:
            try:
                await delivery.channel.basic_nack(delivery.tag, requeue=requeue, wait=False)
            except Exception as exc:
                log.debug("nack of delivery %d failed: %s", delivery.tag, exc)
                return False
            finally:
                window.state[delivery.tag] = Settled.SENT
        return True

    async def run(self) -> None:
        """Flush due acks a few milliseconds after the first of them, until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            await self._wanted.wait()
            if self._due < self._batch:
                self._wake = wake = loop.create_future()
                timer = loop.call_later(FLUSH_DELAY_S, _wake_up, wake)
                try:
                    await wake
                finally:
                    timer.cancel()
                    self._wake = None
            else:
                await asyncio.sleep(0)  # a full batch goes now, but the loop still yields
            await self.flush()

    async def flush(self, *, everything: bool = False) -> None:
        """Send the due acks: one multiple ack per channel, plus stragglers held before.

        With `everything`, stragglers are acked now instead of at the next flush.
        """
        async with self._sending:  # one flush or nack at a time: frames keep their order
            await self._flush(everything=everything)

    async def _flush(self, *, everything: bool) -> None:
        self._wanted.clear()
        for channel, window in list(self._windows.items()):
            if channel.is_closed:
                self._drop(channel, window)
                continue
            sends: list[tuple[int, bool]] = []
            upto = window.advance()
            if upto:
                sends.append((upto, True))
            held = window.held
            window.held = set()
            for tag, state in window.state.items():
                if state is Settled.DUE:
                    if everything or tag in held:
                        sends.append((tag, False))
                        window.state[tag] = Settled.SENT
                        window.due -= 1
                    else:
                        window.held.add(tag)
            try:
                for tag, multiple in sends:
                    await channel.basic_ack(tag, multiple=multiple, wait=False)
            except Exception:  # the channel closed under us
                self._drop(channel, window)
                continue
            if not window.outstanding and window is not self._window:
                del self._windows[channel]
        self._due = sum(window.due for window in self._windows.values())
        if self._due:
            self._wanted.set()  # stragglers: look again at the next flush

    def _window_of(self, channel: AbstractChannel) -> _Window:
        window = self._window
        if window is not None and window.channel is channel:
            return window
        window = self._windows.get(channel)
        if window is None:
            window = self._windows[channel] = _Window(channel)
        if not channel.is_closed:
            self._window = window  # a reconnect's new channel becomes the current one
        return window

    def _drop(self, channel: AbstractChannel, window: _Window) -> None:
        """Forget a closed channel's window; its due acks are lost (the broker redelivers)."""
        del self._windows[channel]
        if window is self._window:
            self._window = None
        if window.due:
            self._on_lost(window.due)


def _wake_up(wake: asyncio.Future[None]) -> None:
    if not wake.done():
        wake.set_result(None)
