"""Concurrency limits and rate limits that can change while jobs run (a SIGHUP may resize them)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
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
        if not self._waiters and self._in_use < self._limit:
            self._in_use += 1  # the common case: a free slot and nobody ahead, no future needed
            return
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


class TokenBucket:
    """A rate limit: `rate_per_minute` tokens a minute, at most `capacity` saved up.

    ``await bucket.acquire()`` takes one token, waiting for it when none is left.
    Waiters are served first in, first out: only the one at the front sleeps,
    for exactly as long as its token needs. :meth:`pause` stops handing out
    tokens for a while (a server's ``Retry-After``); after a pause one token is
    available at once and the rest come back at the normal rate, so a paused
    bucket does not answer a 429 with a burst. :meth:`reconfigure` changes the
    rate live; a waiter already asleep wakes at its old time and re-checks.

    `clock` and `sleep` are injectable so tests can run on a virtual clock.
    """

    def __init__(
        self,
        rate_per_minute: float,
        *,
        capacity: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        _check_rate(rate_per_minute, capacity)
        self._clock = clock
        self._sleep = sleep
        self._per_second = rate_per_minute / 60
        self._fixed_capacity = capacity
        self._capacity = _capacity_for(rate_per_minute, capacity)
        self._tokens = self._capacity
        self._updated = clock()
        self._paused_until = -math.inf
        self._front = asyncio.Lock()  # held by the waiter at the front of the line

    def __repr__(self) -> str:
        return (
            f"TokenBucket(rate_per_minute={self.rate_per_minute:g}, "
            f"capacity={self._capacity:g}, available={self.available:.2f})"
        )

    @property
    def rate_per_minute(self) -> float:
        """Tokens added per minute."""
        return self._per_second * 60

    @property
    def capacity(self) -> float:
        """The most tokens that can be saved up (the largest burst)."""
        return self._capacity

    @property
    def available(self) -> float:
        """Tokens that could be taken right now (0 while paused)."""
        now = self._clock()
        self._refill(now)
        return 0.0 if now < self._paused_until else self._tokens

    @property
    def busy(self) -> bool:
        """Whether someone is waiting for a token."""
        return self._front.locked()

    async def acquire(self) -> None:
        """Take one token, waiting first in, first out until there is one."""
        async with self._front:
            while (wait := self._take(self._clock())) > 0:
                await self._sleep(wait)

    def pause(self, seconds: float) -> None:
        """Hand out no token for `seconds` (an earlier, longer pause is kept)."""
        if seconds <= 0:
            return
        now = self._clock()
        self._refill(now)
        self._paused_until = max(self._paused_until, now + seconds)
        self._tokens = min(self._tokens, 1.0)

    def reconfigure(self, rate_per_minute: float, *, capacity: float | None = None) -> None:
        """Change the rate (and capacity) from now on; tokens saved so far are kept up to it."""
        _check_rate(rate_per_minute, capacity)
        self._refill(self._clock())
        self._per_second = rate_per_minute / 60
        self._fixed_capacity = capacity
        self._capacity = _capacity_for(rate_per_minute, capacity)
        self._tokens = min(self._tokens, self._capacity)

    def _refill(self, now: float) -> None:
        start = max(self._updated, self._paused_until)
        if now > start:
            self._tokens = min(self._capacity, self._tokens + (now - start) * self._per_second)
        self._updated = max(self._updated, now)

    def _take(self, now: float) -> float:
        """Take a token and return 0, or return the seconds until one is due."""
        self._refill(now)
        if now < self._paused_until:
            return self._paused_until - now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self._per_second


def _capacity_for(rate_per_minute: float, capacity: float | None) -> float:
    """The given capacity, else one second's worth of tokens (at least one)."""
    return capacity if capacity is not None else max(1.0, rate_per_minute / 60)


def _check_rate(rate_per_minute: float, capacity: float | None) -> None:
    if not rate_per_minute > 0 or math.isinf(rate_per_minute):
        raise ValueError(f"rate_per_minute must be > 0, got {rate_per_minute}")
    if capacity is not None and not capacity >= 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
