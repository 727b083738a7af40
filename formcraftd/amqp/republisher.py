"""Where a failed job goes next, on the wire: wait queues, the dead-letter exchange, the tail.

Every publish here waits for the broker's confirm and is mandatory (an
unroutable message raises), so the consumer acks the original only once its
next home is safe. The `x-formcraft-*` headers live here too.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange

from formcraftd.amqp.acks import Delivery
from formcraftd.amqp.topology import retry_queue_name
from formcraftd.core.errors import PermanentFailure
from formcraftd.core.text import one_line

log = logging.getLogger("formcraftd.consumer")

ATTEMPT_HEADER = "x-formcraft-attempt"  # tries used so far
FIRST_SEEN_HEADER = "x-formcraft-first-seen"  # ms epoch: when a breaker first delayed the job
REDELIVERIES_HEADER = "x-formcraft-redeliveries"  # classic queues: redeliveries counted so far
_DROPPED_HEADERS = (
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
)
_MAX_COUNT = 1_000_000


def count_header(headers: Mapping[str, Any] | None, name: str) -> int:
    """A non-negative count from a header; a missing or hostile value counts as 0."""
    value = (headers or {}).get(name)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _MAX_COUNT:
        return value
    return 0


def first_seen_ms(message: Delivery, now_ms: float) -> float:
    """When the job was first seen: our header, else the AMQP timestamp, else now."""
    value = (message.headers or {}).get(FIRST_SEEN_HEADER)
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= now_ms:
        return float(value)
    if message.timestamp is not None:
        stamp = message.timestamp
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=dt.UTC)
        return min(stamp.timestamp() * 1000, now_ms)
    return now_ms


def carried_headers(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """The message's headers minus RabbitMQ's dead-lettering history."""
    carried = dict(headers or {})
    for name in _DROPPED_HEADERS:
        carried.pop(name, None)
    return carried


class Republisher:
    """Confirmed, mandatory publishes for one queue's consumer."""

    def __init__(
        self, channel: AbstractChannel, queue: str, dead_letter_exchange: AbstractExchange
    ) -> None:
        self._channel = channel
        self._queue = queue
        self._dead_letter_exchange = dead_letter_exchange

    @classmethod
    async def open(
        cls, channel: AbstractChannel, queue: str, dead_letter_exchange: str
    ) -> Republisher:
        """A republisher on `channel` (which has publisher confirms and mandatory returns)."""
        exchange = await channel.declare_exchange(
            dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        return cls(channel, queue, exchange)

    async def to_tier(
        self,
        message: Delivery,
        job_id: str,
        body: bytes,
        headers: dict[str, Any],
        tier: int,
    ) -> None:
        """Park the job in the wait queue of `tier` ms; it comes back to the queue after."""
        await self._channel.default_exchange.publish(
            _outgoing(message, job_id, body, headers),
            routing_key=retry_queue_name(self._queue, tier),
            mandatory=True,
        )

    async def to_queue_tail(self, message: Delivery, job_id: str, headers: dict[str, Any]) -> None:
        """Publish the job again at the tail of its own queue."""
        await self._channel.default_exchange.publish(
            _outgoing(message, job_id, message.body, headers),
            routing_key=self._queue,
            mandatory=True,
        )

    async def dead_letter(
        self,
        message: Delivery,
        job_id: str,
        failure: PermanentFailure,
        attempts: int,
    ) -> None:
        """The original body to the dead-letter exchange, with the `x-formcraft-*` headers."""
        headers = carried_headers(message.headers)
        headers.update(
            {
                "x-formcraft-error-code": failure.code,
                "x-formcraft-error": one_line(failure.reason, 500),
                "x-formcraft-attempts": attempts,
                "x-formcraft-queue": self._queue,
                "x-formcraft-failed-at": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            }
        )
        if failure.status is not None:
            headers["x-formcraft-last-status"] = failure.status
        await self._dead_letter_exchange.publish(
            _outgoing(message, job_id, message.body, headers),
            routing_key=self._queue,
            mandatory=True,
        )


def _outgoing(
    message: Delivery, job_id: str, body: bytes, headers: dict[str, Any]
) -> aio_pika.Message:
    return aio_pika.Message(
        body,
        headers=headers,
        content_type=message.content_type or "application/json",
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=job_id,
        correlation_id=message.correlation_id,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
    )
