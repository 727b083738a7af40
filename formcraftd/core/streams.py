"""Reading a byte stream to its end or to a limit, whichever comes first."""

from __future__ import annotations

from typing import Protocol

__all__ = ["Readable", "read_at_most"]


class Readable(Protocol):
    """A stream of bytes such as aiohttp's `StreamReader` (a request's or a response's body)."""

    async def read(self, n: int = -1) -> bytes: ...


async def read_at_most(stream: Readable, limit: int) -> bytes:
    """The stream's bytes up to `limit` (all of them if it ends first).

    One `read(n)` returns what has arrived, which may be less than `n` long
    before the stream ends: a body sent in several pieces needs several reads.
    """
    body = bytearray()
    while len(body) < limit:
        chunk = await stream.read(limit - len(body))
        if not chunk:
            break
        body += chunk
    return bytes(body)
