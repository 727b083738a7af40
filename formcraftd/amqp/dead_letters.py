"""Dead-letter queue tools: peek, replay and purge, over AMQP.

Used by the admin API (`/admin/dlq/...`) and by `formcraftd dlq`, which works
even while no daemon runs. Peeking takes messages without acking them and
returns them to the queue; replaying republishes each to its main queue with
the tries reset (publisher confirm first, then the ack), and never more
messages than the DLQ held when it started, so a job that dead-letters again
at once cannot make it loop.
"""

from __future__ import annotations

import re
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from formcraftd.amqp.republisher import encodable_headers
from formcraftd.amqp.topology import dead_letter_queue_name, queue_depth
from formcraftd.core.redaction import is_sensitive_key, mask_json, redact

_DROPPED_ON_REPLAY = re.compile(r"^(x-formcraft-|x-death$|x-first-death-|x-last-death-)")
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


async def replay(channel: AbstractChannel, queue: str, limit: int | None = None) -> int:
    """Move dead letters back to `queue` with their tries reset; how many moved.

    `channel` must have publisher confirms on, so each ack follows a confirmed publish.
    """
    dlq = await channel.declare_queue(dead_letter_queue_name(queue), passive=True)
    available = await queue_depth(channel, dead_letter_queue_name(queue))
    budget = available if limit is None else min(limit, available)
    moved = 0
    while moved < budget:
        message = await dlq.get(no_ack=False, fail=False)
        if message is None:
            break
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
                message_id=message.message_id,
                timestamp=message.timestamp,
                correlation_id=message.correlation_id,
            ),
            routing_key=queue,
            mandatory=True,
        )
        await message.ack()
        moved += 1
    return moved


async def purge(channel: AbstractChannel, queue: str) -> int:
    """Delete every dead letter of `queue`; how many were deleted."""
    dlq = await channel.declare_queue(dead_letter_queue_name(queue), passive=True)
    result = await dlq.purge()
    return int(result.message_count or 0)
