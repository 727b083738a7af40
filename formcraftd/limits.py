"""Concurrency limits that can change while jobs run (a SIGHUP may resize them)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from types import TracebackType


class ResizableLimiter:
    """A semaphore whose limit can change while jobs hold it.

    Use it as ``async with limiter:``. Waiters are served first in, first out. A
    freed slot is handed straight to the next waiter (counted as in use before the
    waiter resumes), so a newcomer can never overtake someone already waiting, and a
    waiter cancelled after being handed a slot passes it on instead of losing it.
    """

    def __init__(self, limit: int) -> None:
        _check_limit(limit)
        self._limit = limit
        self._in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def __repr__(self) -> str:
        return (
            f"ResizableLimiter(limit={self._limit}, in_use={self._in_use}, waiting={self.waiting})"
        )

    @property
    def limit(self) -> int:
        """How many holders are allowed at once."""
        return self._limit

    @property
    def in_use(self) -> int:
        """How many hold a slot now (may exceed `limit` for a while after shrinking)."""
        return self._in_use

    @property
    def waiting(self) -> int:
        """How many are waiting for a slot."""
        return sum(1 for waiter in self._waiters if not waiter.done())

    async def __aenter__(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._wake()  # grants the slot at once when one is free and nobody is ahead
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed over but we will not use it: pass it on.
                self._release()
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):  # already skipped by _wake
                    self._waiters.remove(waiter)
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._release()

    def resize(self, limit: int) -> None:
        """Change the limit now.

        Growing lets waiters in at once. Shrinking never interrupts holders: newcomers
        wait until fewer than the new limit hold a slot.
        """
        _check_limit(limit)
        self._limit = limit
        self._wake()

    def _release(self) -> None:
        if self._in_use <= 0:
            raise RuntimeError("ResizableLimiter released more often than acquired")
        self._in_use -= 1
        self._wake()

    def _wake(self) -> None:
        """Hand free slots to the waiters at the front of the queue."""
        while self._waiters and self._in_use < self._limit:
            waiter = self._waiters.popleft()
            if waiter.done():  # cancelled while waiting
                continue
            self._in_use += 1
            waiter.set_result(None)


def _check_limit(limit: int) -> None:
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
