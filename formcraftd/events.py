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
import contextlib
import datetime as dt
import logging
from typing import Literal

import aio_pika
import msgspec
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection
from prometheus_client import Counter

from formcraftd.config import BrokerConfig, EventsConfig, WorkerKind
from formcraftd.logs import redact

log = logging.getLogger("formcraftd.events")

Outcome = Literal["succeeded", "retrying", "dead_lettered", "delayed"]
BUFFER_SIZE = 10_000
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


class EventPublisher:
    """Publishes events in the background from a bounded buffer; never blocks a job."""

    def __init__(self, config: EventsConfig, broker: BrokerConfig, dropped: Counter) -> None:
        self._config = config
        self._broker = broker
        self._dropped = dropped
        self._buffer: asyncio.Queue[Event] = asyncio.Queue(maxsize=BUFFER_SIZE)
        self._connection: AbstractRobustConnection | None = None
        self._exchange: AbstractExchange | None = None
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

    async def run(self) -> None:
        """Publish until cancelled; reconnects by itself; failures drop single events."""
        if not self._config.enabled:
            return
        try:
            while True:
                event = await self._buffer.get()
                await self._publish(event)
        finally:
            if self._connection is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._connection.close(), 5)

    async def _publish(self, event: Event) -> None:
        try:
            exchange = await self._ensure_exchange()
            await asyncio.wait_for(
                exchange.publish(
                    aio_pika.Message(
                        _encoder.encode(event),
                        content_type="application/json",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        type=routing_key(event),
                    ),
                    routing_key=routing_key(event),
                ),
                timeout=10,
            )
            self.published += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._dropped.inc()
            self._exchange = None  # re-declare (or wait for the broker) next time
            log.warning("dropped a %s event: %s", routing_key(event), type(exc).__name__)

    async def _ensure_exchange(self) -> AbstractExchange:
        if self._exchange is not None:
            return self._exchange
        if self._connection is None:
            url = self._broker.url.split(",")[0].strip()
            self._connection = await aio_pika.connect_robust(
                url, client_properties={"connection_name": "formcraftd events"}
            )
        channel: AbstractChannel = await self._connection.channel(publisher_confirms=True)
        self._exchange = await channel.declare_exchange(
            self._config.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        return self._exchange
