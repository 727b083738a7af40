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
import time
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
BATCH_SIZE = 500  # events published before their confirms are awaited together
PUBLISH_TIMEOUT_S = 10.0
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


def _message(event: Event) -> aio_pika.Message:
    return aio_pika.Message(
        _encoder.encode(event),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        type=routing_key(event),
    )


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
                    async with asyncio.timeout(5):
                        await self._connection.close()

    async def drained(self) -> None:
        """Return once every buffered event has been published (or dropped)."""
        await self._idle.wait()

    async def _publish(self, batch: list[Event]) -> None:
        """Publish `batch`; what the broker does not confirm in time is dropped and counted."""
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                exchange = await self._ensure_exchange()
                results = await asyncio.gather(
                    *(
                        exchange.publish(_message(event), routing_key=routing_key(event))
                        for event in batch
                    ),
                    return_exceptions=True,
                )
        except TimeoutError as exc:
            results = [exc] * len(batch)
        except Exception as exc:  # no connection, or the exchange cannot be declared
            results = [exc] * len(batch)
        failures = [result for result in results if isinstance(result, BaseException)]
        self.published += len(batch) - len(failures)
        if failures:
            self._exchange = None  # re-declare (or wait for the broker) next time
            self._dropped.inc(len(failures))
            self._warn_dropped(len(failures), failures[0])

    def _warn_dropped(self, count: int, example: BaseException) -> None:
        """One warning per outage, then at most one a minute (not one per event)."""
        now = time.monotonic()
        self._dropped_since_warning += count
        if now - self._last_warning < DROP_WARNING_INTERVAL_S:
            return
        log.warning(
            "dropped %d delivery events (%s); formcraftd_events_dropped_total counts them",
            self._dropped_since_warning,
            type(example).__name__,
        )
        self._dropped_since_warning = 0
        self._last_warning = now

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
