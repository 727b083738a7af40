"""Delivery events: one small JSON message per attempt, for the app to show form owners.

With `[events] enabled`, every attempt of every job is published to a durable
topic exchange with routing key `<kind>.<outcome>` (`webhook.succeeded`,
`email.retrying`, `sheets.dead_lettered`, `webhook.delayed`, ...). Publishing
never slows or fails a job: `emit()` only puts the event in a bounded buffer; a
background task publishes it, with confirms, on a connection of its own (a
broker that blocks publishers blocks only that connection). When the buffer is
full or the broker refuses, the event is dropped and counted
(`formcraftd_events_dropped_total`). Events never carry a secret; the one
exception is `sheets.token_refreshed`, whose whole point is to hand the app the
new access token — it goes to the exchange only and is never logged.
"""

from __future__ import annotations

import asyncio
import binascii
import collections
import contextlib
import logging
import os
import struct
import time
from typing import Literal, cast

import aio_pika
import aiormq
import msgspec
import pamqp.frame
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aiormq.abc import ChannelFrame
from pamqp.commands import Basic
from pamqp.constants import FRAME_BODY, FRAME_END_CHAR
from pamqp.header import ContentHeader
from prometheus_client import Counter

from formcraftd.config import BrokerConfig, EventsConfig, WorkerKind
from formcraftd.logs import redact, utc_timestamp

log = logging.getLogger("formcraftd.events")

Outcome = Literal["succeeded", "retrying", "dead_lettered", "delayed"]
BUFFER_SIZE = 10_000
BATCH_SIZE = 500  # events published before their confirms are awaited together
# A batch smaller than BATCH_SIZE waits this long for more events first: a batch costs
# a socket write and a confirm frame to read, so at a few events a millisecond one
# event per batch would cost several times what it costs in a batch of dozens.
GATHER_S = 0.005
PUBLISH_TIMEOUT_S = 10.0  # per batch: connecting, sending and every confirm
CLOSE_TIMEOUT_S = 5.0
DROP_WARNING_INTERVAL_S = 60.0
SNIPPET_CHARS = 300


class DeliveryEvent(msgspec.Struct, frozen=True, kw_only=True, tag_field="event", tag="delivery"):
    """One attempt of one job (routing key `<kind>.<outcome>`)."""

    kind: WorkerKind
    outcome: Outcome
    job_id: str
    queue: str
    form_id: str | None
    submission_id: str | None
    attempt: int
    status_code: int | None = None
    duration_ms: float = 0.0
    error_code: str | None = None
    error: str | None = None
    response_snippet: str | None = None
    at: str


class TokenRefreshedEvent(
    msgspec.Struct, frozen=True, kw_only=True, tag_field="event", tag="token_refreshed"
):
    """A refreshed Google access token for the app to store (`sheets.token_refreshed`)."""

    kind: Literal["sheets"] = "sheets"
    form_id: str
    access_token: str
    expiry_date: int  # ms since the epoch
    at: str


Event = DeliveryEvent | TokenRefreshedEvent
_encoder = msgspec.json.Encoder()


def now() -> str:
    """Now in UTC as ``datetime.isoformat(timespec="milliseconds")`` writes it.

    The date and time of day come from a per-second cache (one event per attempt
    would otherwise build and format a datetime each).
    """
    instant = time.time()
    second = int(instant)
    return utc_timestamp(second, int((instant - second) * 1000), "+00:00")


def snippet(text: str | None) -> str | None:
    """A one-line, redacted, truncated excerpt (None stays None)."""
    if not text:
        return None
    return redact(" ".join(text.split()))[:SNIPPET_CHARS]


def routing_key(event: Event) -> str:
    if isinstance(event, TokenRefreshedEvent):
        return "sheets.token_refreshed"
    return f"{event.kind}.{event.outcome}"


def schema() -> dict[str, object]:
    """The JSON Schema of the events (for `formcraftd schema events`)."""
    result: dict[str, object] = msgspec.json.schema(Event)
    return result


_MESSAGE_ID_BYTES = 16  # random bytes per message id, sent as 32 hex digits
_MESSAGE_ID_CHARS = 2 * _MESSAGE_ID_BYTES
# A content header frame: type (1 byte), channel (2), size (4), class id (2), weight (2),
# then the 8-byte body size, the property flags and the properties.
_BODY_SIZE_AT = 11
_BODY_SIZE = struct.Struct(">Q")
_FRAME_SIZE = struct.Struct(">I")


class _Template:
    """The prebuilt bytes of one routing key's messages (see `_Wire`)."""

    __slots__ = ("after_id", "before_id", "head", "pack")

    def __init__(self, head: bytes, before_id: bytes, after_id: bytes) -> None:
        self.head = head  # Basic.Publish and the content header up to the body size
        self.before_id = before_id  # from the property flags to the message id
        self.after_id = after_id  # the rest of the header, then the first body frame's start
        # body size, the header's middle, the message id, its end and the body frame's size
        # in one call: the one-frame body (nearly every event) costs one pack, not five parts
        self.pack = struct.Struct(f">Q{len(before_id)}s{_MESSAGE_ID_CHARS}s{len(after_id)}sI").pack


class _Wire:
    """The AMQP frames of event messages for one channel, from bytes built once per routing key.

    Each event is a Basic.Publish to the events exchange (not mandatory: an event no
    queue wants is simply not kept), a content header (content type application/json,
    persistent, a random message id, type = the routing key) and the JSON body. Only the
    body, its size and the message id differ between two events of one routing key, so
    pamqp marshals the rest once and each event costs a struct pack and a few parts of
    one join, not a message object, a properties object and three marshalled frames.
    """

    def __init__(self, exchange: str, channel_number: int, max_body_frame: int) -> None:
        self.exchange = exchange
        self.channel_number = channel_number
        self.max_body_frame = max_body_frame  # body bytes a frame holds (frame_max less 8)
        self._body_frame_start = struct.pack(">BH", FRAME_BODY, channel_number)
        self._templates: dict[str, _Template] = {}

    def fits(self, channel: aiormq.Channel) -> bool:
        """Whether these bytes suit `channel` (a reconnect may change its number or frame_max)."""
        return (self.channel_number, self.max_body_frame) == (
            channel.number,
            channel.max_content_size,
        )

    def _template(self, key: str) -> _Template:
        """Marshal the frames of routing key `key` around a placeholder id and body size."""
        placeholder = "-" * _MESSAGE_ID_CHARS
        publish = Basic.Publish(exchange=self.exchange, routing_key=key, mandatory=False)
        properties = Basic.Properties(
            content_type="application/json",
            delivery_mode=2,
            message_id=placeholder,
            message_type=key,
        )
        header = pamqp.frame.marshal(ContentHeader(properties=properties), self.channel_number)
        before_id, _, after_id = header[_BODY_SIZE_AT + _BODY_SIZE.size :].partition(
            placeholder.encode()
        )
        template = _Template(
            pamqp.frame.marshal(publish, self.channel_number) + header[:_BODY_SIZE_AT],
            before_id,
            after_id + self._body_frame_start,
        )
        self._templates[key] = template
        return template

    def encode(self, batch: list[Event]) -> bytes:
        """The frames publishing every event of `batch`, in order, as one write."""
        message_ids = binascii.hexlify(os.urandom(_MESSAGE_ID_BYTES * len(batch)))
        # One encoder call for the batch: JSON lines, split apart again. A JSON text never
        # holds a raw newline (msgspec escapes it inside strings), so the split is exact.
        bodies = _encoder.encode_lines(batch).split(b"\n")
        bodies.pop()  # the empty line after the last newline
        templates = self._templates
        max_body_frame = self.max_body_frame
        parts: list[bytes] = []
        start_id = 0
        for event, body in zip(batch, bodies, strict=True):
            key = routing_key(event)
            template = templates.get(key) or self._template(key)
            size = len(body)
            message_id = message_ids[start_id : start_id + _MESSAGE_ID_CHARS]
            start_id += _MESSAGE_ID_CHARS
            first = body if size <= max_body_frame else body[:max_body_frame]
            parts += (
                template.head,
                template.pack(size, template.before_id, message_id, template.after_id, len(first)),
                first,
                FRAME_END_CHAR,
            )
            # `after_id` opened the first body frame; a body over frame_max takes more
            for start in range(max_body_frame, size, max_body_frame):
                chunk = body[start : start + max_body_frame]
                parts += (
                    self._body_frame_start,
                    _FRAME_SIZE.pack(len(chunk)),
                    chunk,
                    FRAME_END_CHAR,
                )
        return b"".join(parts)


class _BatchConfirms:
    """The broker's confirms of one batch, counted as aiormq resolves them.

    aiormq keeps a confirmation per delivery tag in `channel.confirmations` and, on the
    broker's Basic.Ack or Basic.Nack for a tag, pops it and calls its `done()`, then
    `set_result(frame)` or `set_exception(DeliveryError)` (and `cancelled()` when it was
    already done, to choose the level of its log line). This object stands for every tag
    of a batch at once: it counts the acks and keeps the first nack, where a future per
    event would cost an entry in aiormq's future store and its parent's, and four done
    callbacks, each run on its own when the future resolves.

    `future` comes from the channel's own future store, so aiormq fails it, as it would
    fail a publish's confirmation, when the channel or its connection closes; it resolves
    once every tag is confirmed. After `settle()` the count is final and any confirm
    arriving later is ignored by aiormq, as one arriving for a cancelled future would be.
    """

    __slots__ = ("acked", "failure", "future", "pending", "settled")

    def __init__(self, future: asyncio.Future[None], count: int) -> None:
        self.future = future
        self.pending = count
        self.acked = 0
        self.failure: BaseException | None = None  # the first nack's error
        self.settled = False

    def done(self) -> bool:
        return self.settled or self.future.done()

    def cancelled(self) -> bool:
        return self.future.cancelled()

    def set_result(self, _frame: object) -> None:
        self.acked += 1
        self._confirmed()

    def set_exception(self, exception: BaseException) -> None:
        self.failure = self.failure or exception
        self._confirmed()

    def _confirmed(self) -> None:
        self.pending -= 1
        if not self.pending and not self.future.done():
            self.future.set_result(None)

    def settle(self) -> int:
        """Stop counting (a later confirm no longer counts); return the events acked."""
        self.settled = True
        if not self.future.done():
            self.future.cancel()  # timed out: aiormq's store lets go of it
        return self.acked


class EventPublisher:
    """Publishes events in the background from a bounded buffer; never blocks a job."""

    def __init__(self, config: EventsConfig, broker: BrokerConfig, dropped: Counter) -> None:
        self._config = config
        self._broker = broker
        self._dropped = dropped
        # at most BUFFER_SIZE events wait; a deque, as `emit()` runs once per attempt and
        # an asyncio.Queue would wake its getter (and count unfinished tasks) every time
        self._buffer: collections.deque[Event] = collections.deque()
        self._wakeup: asyncio.Future[None] | None = None  # what `run()` awaits while parked
        self._parked = True  # `run()` waits for an event (or has not started)
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None  # the exchange is declared on it
        self._wire: _Wire | None = None
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
            if self._connection is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(CLOSE_TIMEOUT_S):
                        await self._connection.close()

    async def drained(self) -> None:
        """Return once every buffered event has been published (or dropped)."""
        await self._idle.wait()

    async def _publish(self, batch: list[Event]) -> None:
        """Publish `batch`; what the broker does not confirm in time is dropped and counted.

        An event counts as published only once the broker acked it: a nack, a channel
        or connection lost before the ack, or the batch timing out drops it.
        """
        confirms: _BatchConfirms | None = None
        error: BaseException | None = None
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                confirms = await self._send(await self._ensure_channel(), batch)
                # asyncio.wait, not await: the failure aiormq sets on a close may be any
                # exception, CancelledError included, and must not end this task
                await asyncio.wait((confirms.future,))
        except Exception as exc:  # a timeout, no connection, or no usable exchange
            error = exc
        published = 0
        if confirms is not None:
            published = confirms.settle()
            if not confirms.future.cancelled():
                error = error or confirms.future.exception() or confirms.failure
        self.published += published
        if failures := len(batch) - published:
            self._dropped.inc(failures)
            self._warn_dropped(failures, error)
            if self._channel is not None and self._channel.is_closed:
                await self._forget_channel()  # open one and re-declare next time

    async def _send(self, channel: aiormq.Channel, batch: list[Event]) -> _BatchConfirms:
        """Write `batch` to `channel` at once; return what counts the broker's confirms.

        This is aiormq's `basic_publish` for many messages: under the channel lock, the
        messages take the next delivery tags, each tag goes into `channel.confirmations`
        (aiormq hands it the broker's Basic.Ack or Nack) with the batch's one confirms
        object, whose future aiormq fails when the channel or connection closes, and the
        frames go to the connection's writer in one piece. One publish per event would
        cost a task, three marshalled frames and a socket write each.
        """
        wire = self._wire
        if wire is None or not wire.fits(channel):
            wire = self._wire = _Wire(
                self._config.exchange, channel.number, channel.max_content_size
            )
        payload = ChannelFrame(payload=wire.encode(batch), should_close=False)
        async with channel.lock:
            first = channel.delivery_tag + 1
            tags = range(first, first + len(batch))
            confirms = _BatchConfirms(channel.create_future(), len(batch))
            # aiormq types its confirmations as futures; it uses only the methods above
            channel.confirmations.update(dict.fromkeys(tags, cast(asyncio.Future[None], confirms)))
            channel.delivery_tag = tags[-1]
            try:
                await channel.write_queue.put(payload)
            except BaseException:
                # never sent: the broker will not confirm these tags, the next publish reuses them
                channel.delivery_tag = first - 1
                for tag in tags:
                    channel.confirmations.pop(tag, None)
                confirms.settle()
                raise
        return confirms

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

    async def _ensure_channel(self) -> aiormq.Channel:
        """The confirming channel to publish on, connecting and declaring the exchange first.

        The connection is robust: after a loss it reconnects by itself and restores the
        channel and the exchange on it, which this waits for (within the batch's timeout).
        """
        if self._connection is None:
            url = self._broker.url.split(",")[0].strip()
            self._connection = await aio_pika.connect_robust(
                url, client_properties={"connection_name": "formcraftd events"}
            )
        await self._connection.ready()
        if self._channel is None:
            channel = await self._connection.channel(publisher_confirms=True)
            try:
                await channel.declare_exchange(
                    self._config.exchange, aio_pika.ExchangeType.TOPIC, durable=True
                )
            except Exception:
                # the broker closed it (a robust channel would reopen it): close it for good
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(CLOSE_TIMEOUT_S):
                        await channel.close()
                raise
            self._channel = channel
        # after a reconnect the connection is ready before its channels are restored
        await self._channel.ready()
        underlay = await self._channel.get_underlay_channel()
        if not isinstance(underlay, aiormq.Channel):  # aio-pika hands out aiormq channels
            raise TypeError(f"unexpected AMQP channel {type(underlay).__name__}")
        return underlay

    async def _forget_channel(self) -> None:
        """Close a channel the broker closed (e.g. the exchange was deleted under it)."""
        channel, self._channel = self._channel, None
        if channel is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await channel.close()
