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
import contextlib
import datetime as dt
import logging
import os
import struct
import time
from typing import Any, Literal

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
from formcraftd.logs import redact

log = logging.getLogger("formcraftd.events")

Outcome = Literal["succeeded", "retrying", "dead_lettered", "delayed"]
BUFFER_SIZE = 10_000
BATCH_SIZE = 500  # events published before their confirms are awaited together
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
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


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
# A content header frame: type (1 byte), channel (2), size (4), class id (2), weight (2),
# then the 8-byte body size, the property flags and the properties.
_BODY_SIZE_AT = 11
_BODY_SIZE = struct.Struct(">Q")
_FRAME_SIZE = struct.Struct(">I")


class _Wire:
    """The AMQP frames of event messages for one channel, from bytes built once per routing key.

    Each event is a Basic.Publish to the events exchange (not mandatory: an event no
    queue wants is simply not kept), a content header (content type application/json,
    persistent, a random message id, type = the routing key) and the JSON body. Only the
    body, its size and the message id differ between two events of one routing key, so
    pamqp marshals the rest once and each event costs a few byte joins, not a message
    object, a properties object and three marshalled frames.
    """

    def __init__(self, exchange: str, channel_number: int, max_body_frame: int) -> None:
        self.exchange = exchange
        self.channel_number = channel_number
        self.max_body_frame = max_body_frame  # body bytes a frame holds (frame_max less 8)
        self._body_frame_start = struct.pack(">BH", FRAME_BODY, channel_number)
        self._templates: dict[str, tuple[bytes, bytes, bytes]] = {}

    def fits(self, channel: aiormq.Channel) -> bool:
        """Whether these bytes suit `channel` (a reconnect may change its number or frame_max)."""
        return (self.channel_number, self.max_body_frame) == (
            channel.number,
            channel.max_content_size,
        )

    def _template(self, key: str) -> tuple[bytes, bytes, bytes]:
        """The bytes before the body size, between it and the message id, and after the id."""
        placeholder = "-" * (2 * _MESSAGE_ID_BYTES)
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
        template = (
            pamqp.frame.marshal(publish, self.channel_number) + header[:_BODY_SIZE_AT],
            before_id,
            after_id + self._body_frame_start,
        )
        self._templates[key] = template
        return template

    def encode(self, batch: list[Event]) -> bytes:
        """The frames publishing every event of `batch`, in order, as one write."""
        message_ids = binascii.hexlify(os.urandom(_MESSAGE_ID_BYTES * len(batch)))
        id_chars = 2 * _MESSAGE_ID_BYTES
        parts: list[bytes] = []
        for i, event in enumerate(batch):
            body = _encoder.encode(event)
            key = routing_key(event)
            head, before_id, after_id = self._templates.get(key) or self._template(key)
            parts += (
                head,
                _BODY_SIZE.pack(len(body)),
                before_id,
                message_ids[i * id_chars : (i + 1) * id_chars],
                after_id,
            )
            # `after_id` opened the first body frame; a body over frame_max takes several
            for start in range(0, len(body), self.max_body_frame):
                chunk = body[start : start + self.max_body_frame]
                if start:
                    parts.append(self._body_frame_start)
                parts += (_FRAME_SIZE.pack(len(chunk)), chunk, FRAME_END_CHAR)
        return b"".join(parts)


class EventPublisher:
    """Publishes events in the background from a bounded buffer; never blocks a job."""

    def __init__(self, config: EventsConfig, broker: BrokerConfig, dropped: Counter) -> None:
        self._config = config
        self._broker = broker
        self._dropped = dropped
        self._buffer: asyncio.Queue[Event] = asyncio.Queue(maxsize=BUFFER_SIZE)
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
        try:
            self._buffer.put_nowait(event)
        except asyncio.QueueFull:
            self._dropped.inc()
            return
        self._idle.clear()

    async def run(self) -> None:
        """Publish until cancelled, in batches whose confirms are awaited together."""
        if not self._config.enabled:
            return
        try:
            while True:
                batch = [await self._buffer.get()]
                while len(batch) < BATCH_SIZE and not self._buffer.empty():
                    batch.append(self._buffer.get_nowait())
                await self._publish(batch)
                if self._buffer.empty():
                    self._idle.set()
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
        confirms: list[asyncio.Future[Any]] = []
        error: BaseException | None = None
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                confirms = await self._send(await self._ensure_channel(), batch)
                await asyncio.wait(confirms)  # raises none of their errors: counted below
        except Exception as exc:  # a timeout, no connection, or no usable exchange
            error = exc
        published = 0
        for confirm in confirms:
            if not confirm.done():
                confirm.cancel()  # timed out: an ack arriving later no longer counts
            elif confirm.cancelled():
                continue
            elif (failure := confirm.exception()) is None:
                published += 1
            else:
                error = error or failure
        self.published += published
        if failures := len(batch) - published:
            self._dropped.inc(failures)
            self._warn_dropped(failures, error)
            if self._channel is not None and self._channel.is_closed:
                await self._forget_channel()  # open one and re-declare next time

    async def _send(self, channel: aiormq.Channel, batch: list[Event]) -> list[asyncio.Future[Any]]:
        """Write `batch` to `channel` at once; return the futures of the broker's confirms.

        This is aiormq's `basic_publish` for many messages: under the channel lock, the
        messages take the next delivery tags, a confirm future each goes into
        `channel.confirmations` (aiormq resolves it on the broker's Basic.Ack or Nack,
        and fails it when the channel or connection closes) and the frames go to the
        connection's writer in one piece. One publish per event would cost a task, three
        marshalled frames and a socket write each.
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
            confirms = [channel.create_future() for _ in tags]
            channel.confirmations.update(zip(tags, confirms, strict=True))
            channel.delivery_tag = tags[-1]
            try:
                await channel.write_queue.put(payload)
            except BaseException:
                # never sent: the broker will not confirm these tags, the next publish reuses them
                channel.delivery_tag = first - 1
                for tag, confirm in zip(tags, confirms, strict=True):
                    channel.confirmations.pop(tag, None)
                    confirm.cancel()
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
