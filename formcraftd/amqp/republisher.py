"""Where a failed job goes next, on the wire: wait queues, the dead-letter exchange, the tail.

Every publish here waits for the broker's confirm and is mandatory (an
unroutable message raises), so the consumer acks the original only once its
next home is safe. The `x-formcraft-*` headers live here too.
"""

from __future__ import annotations

import datetime as dt
import logging
import struct
from collections.abc import Mapping
from typing import Any

import aio_pika
import pamqp.encode
from aio_pika.abc import AbstractChannel, AbstractExchange

from formcraftd.amqp.acks import Delivery
from formcraftd.amqp.topology import retry_queue_name
from formcraftd.core.errors import PermanentFailure
from formcraftd.core.jobs import job_id_for
from formcraftd.core.redaction import redact
from formcraftd.core.text import one_line
from formcraftd.core.tracing import NO_TRACE, AttemptTrace

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


ALTERED_HEADER = "x-formcraft-altered-headers"  # headers escaped or dropped to republish


def carried_headers(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """The message's headers minus RabbitMQ's dead-lettering history, all encodable."""
    carried = dict(headers or {})
    for name in _DROPPED_HEADERS:
        carried.pop(name, None)
    return encodable_headers(carried)


def encodable_headers(headers: dict[str, Any]) -> dict[str, Any]:
    """`headers` as AMQP can send them again.

    What a publisher sent is not always what can be republished: a long string
    that is not UTF-8 arrives as bytes, which AMQP field tables cannot carry
    back. Such a value is escaped (``\\xff``); any other value that cannot be
    encoded is dropped. The names of both go in `x-formcraft-altered-headers`.
    """
    altered: list[str] = []
    for name, value in list(headers.items()):
        if _encodes(name, value):
            continue
        altered.append(name)
        escaped = _escaped(value)
        if _encodes(name, escaped):
            headers[name] = escaped
        else:
            del headers[name]
    if altered:
        headers[ALTERED_HEADER] = one_line(", ".join(altered), 1000)
    return headers


def _encodes(name: str, value: Any) -> bool:
    try:
        pamqp.encode.field_table({name: value})
    except (TypeError, ValueError, OverflowError, struct.error):
        return False
    return True


def _escaped(value: Any) -> Any:
    """`value` with bytes, nested ones too, as text with undecodable bytes escaped."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {key: _escaped(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_escaped(item) for item in value]
    return value


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
        *,
        trace: AttemptTrace = NO_TRACE,
    ) -> None:
        """Park the job in the wait queue of `tier` ms; it comes back to the queue after.

        `trace` (the attempt that failed) writes the trace context the job keeps.
        """
        trace.carry(headers)
        await _publish(
            self._channel.default_exchange,
            retry_queue_name(self._queue, tier),
            message=message,
            job_id=job_id,
            body=body,
            headers=headers,
        )

    async def to_queue_tail(self, message: Delivery, job_id: str, headers: dict[str, Any]) -> None:
        """Publish the job again at the tail of its own queue."""
        await _publish(
            self._channel.default_exchange,
            self._queue,
            message=message,
            job_id=job_id,
            body=message.body,
            headers=headers,
        )

    async def set_aside(self, body: bytes, reason: str) -> None:
        """Dead-letter, as VALIDATION_ERROR, a message whose properties could not be decoded."""
        await _publish_set_aside(self._dead_letter_exchange, self._queue, body, reason)

    async def dead_letter(
        self,
        message: Delivery,
        job_id: str,
        failure: PermanentFailure,
        attempts: int,
        *,
        trace: AttemptTrace = NO_TRACE,
    ) -> None:
        """The original body to the dead-letter exchange, with the `x-formcraft-*` headers.

        `x-formcraft-attempts` (every try, the last one included) replaces the
        retry path's `x-formcraft-attempt` (tries before this one): one count,
        not two that differ by one.
        """
        headers = carried_headers(message.headers)
        headers.pop(ATTEMPT_HEADER, None)
        headers.update(
            {
                "x-formcraft-error-code": failure.code,
                "x-formcraft-error": one_line(redact(failure.reason), 500),
                "x-formcraft-attempts": attempts,
                "x-formcraft-queue": self._queue,
                "x-formcraft-failed-at": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            }
        )
        if failure.status is not None:
            headers["x-formcraft-last-status"] = failure.status
        trace.carry(headers)  # a replay continues the job's trace
        await _publish(
            self._dead_letter_exchange,
            self._queue,
            message=message,
            job_id=job_id,
            body=message.body,
            headers=headers,
        )


async def _publish_set_aside(
    exchange: AbstractExchange, queue: str, body: bytes, reason: str
) -> None:
    """A message whose AMQP properties could not be read, to the DLX: its body, our headers."""
    failed_at = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
    headers: dict[str, Any] = {
        "x-formcraft-error-code": "VALIDATION_ERROR",
        "x-formcraft-error": one_line(
            redact(f"its AMQP properties cannot be decoded, so they are dropped: {reason}"), 500
        ),
        "x-formcraft-attempts": 0,
        "x-formcraft-queue": queue,
        "x-formcraft-failed-at": failed_at,
        ALTERED_HEADER: "*",
    }
    message = aio_pika.Message(
        body,
        headers=headers,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=job_id_for(None, body),
    )
    await exchange.publish(message, routing_key=queue, mandatory=True)


async def _publish(
    exchange: AbstractExchange,
    routing_key: str,
    *,
    message: Delivery,
    job_id: str,
    body: bytes,
    headers: dict[str, Any],
) -> None:
    """Publish, mandatory and confirmed; a message AMQP cannot carry goes out stripped.

    When the properties or headers the job came with cannot be encoded again,
    the job is published with only formcraftd's own headers (and the altered-
    headers mark), so that its outcome is never lost to what a publisher sent.
    """
    try:
        outgoing = _outgoing(message, job_id, body, headers)
        await exchange.publish(outgoing, routing_key=routing_key, mandatory=True)
        return
    except (TypeError, ValueError, OverflowError, struct.error) as exc:
        log.warning(
            "job %s: its AMQP properties cannot be sent again (%s); republished without them",
            job_id,
            one_line(exc),
        )
    kept = {name: value for name, value in headers.items() if name.startswith("x-formcraft-")}
    kept[ALTERED_HEADER] = "*"
    stripped = aio_pika.Message(
        body,
        headers=kept,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=message.priority,
        message_id=job_id[:200],
    )
    await exchange.publish(stripped, routing_key=routing_key, mandatory=True)


def _outgoing(
    message: Delivery, job_id: str, body: bytes, headers: dict[str, Any]
) -> aio_pika.Message:
    return aio_pika.Message(
        body,
        headers=headers,
        content_type=message.content_type or "application/json",
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=message.priority,  # kept on every hop: wait queue, main queue, dead letters
        message_id=job_id,
        correlation_id=message.correlation_id,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
    )
