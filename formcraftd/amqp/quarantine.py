"""Setting aside the messages whose AMQP content header cannot be decoded.

When the connection went because a frame could not be decoded (see
:mod:`formcraftd.amqp.raw`), each consumer, before it consumes again, takes
the head of its queue with a raw connection: every message whose properties
do not decode is dead-lettered as VALIDATION_ERROR with its body as sent and
formcraftd's headers, then acked; the others go back to the queue in their
order. The message that took the connection down was delivered to this
consumer, so it is among the first `prefetch` of its queue again.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from formcraftd.amqp.raw import RawConnection

log = logging.getLogger("formcraftd.consumer")

SetAside = Callable[[bytes, str], Awaitable[None]]
"""Dead-letters one body with the reason its properties did not decode (confirmed)."""


async def set_aside_undecodable(url: str, queue: str, scan: int, set_aside: SetAside) -> int:
    """Look at up to `scan` messages at the head of `queue`; how many were set aside."""
    raw = await RawConnection.open(url)
    found = 0
    try:
        for _ in range(scan):
            message = await raw.get(queue)
            if message is None:
                break
            if message.undecodable:
                await set_aside(message.body, message.undecodable)
                raw.ack(message.delivery_tag)
                found += 1
                log.warning(
                    "%s: set aside a message whose AMQP properties cannot be decoded "
                    "(dead-lettered as VALIDATION_ERROR): %s",
                    queue,
                    message.undecodable,
                    extra={"queue": queue, "error_code": "VALIDATION_ERROR"},
                )
        raw.nack_all()
        await raw.drain()
    finally:
        await raw.close()
    return found
