"""Dead-letter queue tools: peek, replay and purge, over AMQP.

Used by the admin API (`/admin/dlq/...`) and by `formcraftd dlq`, which works
even while no daemon runs. Peeking takes messages without acking them and
returns them to the queue; replaying republishes each to its main queue with
the tries reset (publisher confirm first, then the ack), and never more
messages than the DLQ held when it started, so a job that dead-letters again
at once cannot make it loop. A :class:`ReplayFilter` selects what is replayed
(failed since / until, error code, destination host, form id); the dead
letters it leaves are held unacked while the scan goes on, then returned to
the DLQ in their order. A dry run moves nothing and describes what would move.
It keeps the job id (the AMQP `message_id`), so a webhook keeps its `webhook-id`.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from formcraftd.amqp.republisher import encodable_headers
from formcraftd.amqp.topology import dead_letter_queue_name, queue_depth
from formcraftd.core.redaction import is_sensitive_key, mask_json, redact

# The trace header stays: the replayed attempt links to the one that was dead-lettered.
_DROPPED_ON_REPLAY = re.compile(
    r"^(x-formcraft-(?!trace-previous$)|x-death$|x-first-death-|x-last-death-)"
)
_MAX_BODY_CHARS = 65_536


def describe(message: AbstractIncomingMessage) -> dict[str, Any]:
    """A dead letter as JSON-ready data: id, headers and the body with secrets masked."""
    try:
        body: Any = mask_json(orjson.loads(message.body))
    except orjson.JSONDecodeError:
        body = redact(message.body.decode("utf-8", "replace"))[:_MAX_BODY_CHARS]
    headers = {
        str(key): value if isinstance(value, int | float | bool) else redact(str(value))
        for key, value in (message.headers or {}).items()
        if not is_sensitive_key(str(key))
    }
    return {"job_id": message.message_id, "headers": headers, "body": body}


async def peek(channel: AbstractChannel, queue: str, limit: int) -> list[dict[str, Any]]:
    """Up to `limit` dead letters of `queue`, left in the DLQ."""
    dlq = await channel.declare_queue(dead_letter_queue_name(queue), passive=True)
    taken: list[AbstractIncomingMessage] = []
    try:
        while len(taken) < limit:
            message = await dlq.get(no_ack=False, fail=False)
            if message is None:
                break
            taken.append(message)
        return [describe(message) for message in taken]
    finally:
        for message in taken:
            await message.nack(requeue=True)


_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_when(text: str, *, now: dt.datetime | None = None) -> dt.datetime:
    """An RFC 3339 time (`2026-12-01T10:00:00Z`, a date alone is midnight UTC), or an age
    such as `30m`, `2h` or `7d` before now; ValueError otherwise."""
    now = now or dt.datetime.now(dt.UTC)
    relative = _RELATIVE.match(text.strip())
    if relative:
        return now - dt.timedelta(seconds=float(relative[1]) * _UNITS[relative[2]])
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text[:40]!r} is not a time: give RFC 3339 (2026-12-01T10:00:00Z) "
            "or an age such as 30m, 2h, 7d"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


@dataclass(frozen=True, slots=True)
class ReplayFilter:
    """Which dead letters to replay; every given criterion must hold."""

    since: dt.datetime | None = None  # failed at or after
    until: dt.datetime | None = None  # failed before
    error_code: str | None = None  # x-formcraft-error-code
    host: str | None = None  # the webhook URL's host (case-insensitive)
    form_id: str | None = None  # metadata.formId

    def __bool__(self) -> bool:
        return any(getattr(self, name) is not None for name in self.__slots__)

    def matches(self, message: AbstractIncomingMessage) -> bool:
        headers = message.headers or {}
        if self.error_code is not None and headers.get("x-formcraft-error-code") != self.error_code:
            return False
        if self.since is not None or self.until is not None:
            failed_at = _failed_at(headers.get("x-formcraft-failed-at"))
            if failed_at is None:
                return False
            if self.since is not None and failed_at < self.since:
                return False
            if self.until is not None and failed_at >= self.until:
                return False
        if self.host is None and self.form_id is None:
            return True
        job = _job_fields(message.body)
        if self.form_id is not None and job.get("form_id") != self.form_id:
            return False
        return self.host is None or job.get("host") == self.host.lower()


def _failed_at(value: object) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _job_fields(body: bytes) -> dict[str, str]:
    """The form id and the webhook URL's host of a dead letter's body, where it has them."""
    try:
        job = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    if not isinstance(job, dict):
        return {}
    fields: dict[str, str] = {}
    metadata, payload = job.get("metadata"), job.get("payload")
    if isinstance(metadata, dict) and isinstance(metadata.get("formId"), str):
        fields["form_id"] = metadata["formId"]
    if isinstance(payload, dict) and isinstance(payload.get("url"), str):
        try:
            host = urlsplit(payload["url"]).hostname
        except ValueError:
            host = None
        if host:
            fields["host"] = host
    return fields


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """What a replay moved (or, dry, would move), and how many dead letters it looked at."""

    replayed: int
    scanned: int
    dry_run: bool
    would_replay: list[dict[str, Any]]  # dry run only: each as `describe` shows it

    def as_json(self, queue: str) -> dict[str, Any]:
        result: dict[str, Any] = {
            "queue": queue,
            "replayed": self.replayed,
            "scanned": self.scanned,
            "dry_run": self.dry_run,
        }
        if self.dry_run:
            result["would_replay"] = self.would_replay
        return result


async def replay(
    channel: AbstractChannel,
    queue: str,
    limit: int | None = None,
    *,
    only: ReplayFilter | None = None,
    dry_run: bool = False,
) -> ReplayResult:
    """Move the dead letters `only` selects back to `queue`, tries reset (at most `limit`).

    `channel` must have publisher confirms on, so each ack follows a confirmed publish.
    The dead letters left behind, and every one in a dry run, go back to the DLQ at
    the end; never more than the DLQ held at the start are looked at.
    """
    dlq = await channel.declare_queue(dead_letter_queue_name(queue), passive=True)
    available = await queue_depth(channel, dead_letter_queue_name(queue))
    wanted = available if limit is None else min(limit, available)
    moved = scanned = 0
    held: list[AbstractIncomingMessage] = []
    described: list[dict[str, Any]] = []
    try:
        while moved < wanted and scanned < available:
            message = await dlq.get(no_ack=False, fail=False)
            if message is None:
                break
            scanned += 1
            if only and not only.matches(message):
                held.append(message)
                continue
            if dry_run:
                described.append(describe(message))
                held.append(message)
                moved += 1
                continue
            await _republish(channel, queue, message)
            moved += 1
    finally:
        for message in held:
            await message.nack(requeue=True)
    return ReplayResult(
        replayed=0 if dry_run else moved,
        scanned=scanned,
        dry_run=dry_run,
        would_replay=described,
    )


async def _republish(
    channel: AbstractChannel, queue: str, message: AbstractIncomingMessage
) -> None:
    """One dead letter back to `queue` with our headers dropped, confirmed, then acked."""
    headers = encodable_headers(
        {
            key: value
            for key, value in (message.headers or {}).items()
            if not _DROPPED_ON_REPLAY.match(key)
        }
    )
    await channel.default_exchange.publish(
        aio_pika.Message(
            message.body,
            headers=headers,
            content_type=message.content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            priority=message.priority,
            message_id=message.message_id,
            timestamp=message.timestamp,
            correlation_id=message.correlation_id,
        ),
        routing_key=queue,
        mandatory=True,
    )
    await message.ack()


async def purge(channel: AbstractChannel, queue: str) -> int:
    """Delete every dead letter of `queue`; how many were deleted."""
    dlq = await channel.declare_queue(dead_letter_queue_name(queue), passive=True)
    result = await dlq.purge()
    return int(result.message_count or 0)
