"""Per-destination rate limits that slow down when a destination answers 429 or 503.

A worker whose jobs go to many remote services (the webhook worker) owns one
:class:`DestinationLimits`. The consumer asks it for each job's turn *before*
the job takes a concurrency slot: :meth:`DestinationLimits.admit` returns at
once when the destination may be called now, gives an awaitable when the turn
is near (at most `max_wait_s` away, and fewer than `max_waiting` jobs of the
process already wait), and raises :class:`~formcraftd.core.errors.Throttled`
otherwise, which the consumer turns into a delay through the wait queues
without using a try. So a throttled destination never holds a slot, and never
holds more than `max_waiting` of the prefetched messages the others need.

Each rate is a GCRA (a token bucket kept as one timestamp): `burst` calls may
go at once after a quiet spell, then one every ``1 / requests_per_second``.
:meth:`DestinationLimits.slow_down` is told of every 429 and 503: it pauses
the destination for its `Retry-After` (1 s for a 429 without one), halves its
rate (at most once a second, down to a sixteenth of the configured rate) and
lets it climb back linearly over `recovery_s` once the pause is over. A
destination with no configured rate is only paused.

`max_in_flight` (0 = off) caps the jobs of one destination admitted and not
yet :meth:`~DestinationLimits.done`: a slow destination then never holds
every concurrency slot; a job over the cap is delayed like one over its rate.

Everything runs on one event loop; no method but the returned waits awaits.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from formcraftd.core.errors import Throttled

__all__ = ["DestinationLimits", "DestinationReport", "Rate", "RateOf"]

_MAX_PAUSE_S = 3600.0  # a Retry-After longer than this is taken as this
_DEFAULT_PAUSE_429_S = 1.0  # a 429 without a usable Retry-After
_CUT_FACTOR = 0.5
_FLOOR_FACTOR = 1 / 16  # the lowest a rate is cut to, as a share of the configured one
_MIN_CUT_INTERVAL_S = 1.0  # answers to requests sent together cut the rate once
_BUSY_DELAY_S = 1.0  # a job over its destination's max_in_flight comes back after about this


@dataclass(frozen=True, slots=True)
class Rate:
    """`per_second` calls a second, `burst` of them at once after a quiet spell."""

    per_second: float
    burst: int

    def __post_init__(self) -> None:
        if not self.per_second > 0 or math.isinf(self.per_second):
            raise ValueError(f"per_second must be > 0, got {self.per_second}")
        if self.burst < 1:
            raise ValueError(f"burst must be >= 1, got {self.burst}")


RateOf = Callable[[str], Rate | None]
"""The configured rate of a destination key; None = no limit."""


@dataclass(frozen=True, slots=True)
class DestinationReport:
    """What `/metrics` shows of one destination."""

    key: str
    throttled: int  # jobs that waited for their turn or were delayed
    rate: float | None  # the rate in force while it is slowed down (0 while paused), else None


class _Destination:
    """The state of one destination: its GCRA timestamp, pause and lowered rate."""

    __slots__ = (
        "deferred_until",
        "in_flight",
        "last_cut",
        "lowered",
        "paused_until",
        "rate",
        "recover_from",
        "tat",
        "throttled",
    )

    def __init__(self, rate: Rate | None) -> None:
        self.rate = rate
        self.tat = -math.inf  # when the next call would conform with no burst left
        self.paused_until = -math.inf
        self.lowered: float | None = None  # the rate right after the last cut
        self.recover_from = -math.inf  # when the lowered rate starts climbing back
        self.last_cut = -math.inf
        self.deferred_until = -math.inf  # where the last delayed job was spread to
        self.throttled = 0
        self.in_flight = 0  # admitted and not done (counted while max_in_flight is on)

    def per_second(self, now: float, recovery_s: float) -> float | None:
        """The rate in force at `now`: the configured one, or a lowered one climbing back."""
        rate = self.rate
        if rate is None:
            return None
        lowered = self.lowered
        if lowered is None:
            return rate.per_second
        if now <= self.recover_from:
            return lowered
        progress = (now - self.recover_from) / recovery_s
        if progress >= 1:
            self.lowered = None
            return rate.per_second
        return lowered + (rate.per_second - lowered) * progress

    def turn(self, now: float, recovery_s: float) -> tuple[float, float]:
        """(when the next call may go, the interval between calls; 0 = no limit)."""
        per_second = self.per_second(now, recovery_s)
        if per_second is None:
            return self.paused_until, 0.0
        assert self.rate is not None
        interval = 1 / per_second
        tolerance = (self.rate.burst - 1) * interval
        return max(self.tat - tolerance, self.paused_until), interval


class DestinationLimits:
    """The rate limits of one worker's destinations (keys like `webhook:host:443`).

    At most `max_keys` destinations are remembered, least recently used
    dropped first (a dropped one starts afresh, with a full burst); one with
    jobs in flight is kept, so the bound can be exceeded meanwhile. `clock`
    and `sleep` are injectable so tests can run on a virtual clock.
    """

    def __init__(
        self,
        rate_of: RateOf,
        *,
        max_wait_s: float,
        max_waiting: int,
        recovery_s: float,
        limited: bool,
        max_in_flight: int = 0,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self._clock = clock
        self._sleep = sleep
        self._max_keys = max_keys
        self._states: OrderedDict[str, _Destination] = OrderedDict()
        self.waiting = 0  # jobs of the process waiting for their turn now
        self.engaged = False  # False: no destination is limited or paused; admit() is a no-op
        self.reconfigure(
            rate_of,
            max_wait_s=max_wait_s,
            max_waiting=max_waiting,
            recovery_s=recovery_s,
            limited=limited,
            max_in_flight=max_in_flight,
        )

    def __repr__(self) -> str:
        return f"DestinationLimits(destinations={len(self._states)}, waiting={self.waiting})"

    def reconfigure(
        self,
        rate_of: RateOf,
        *,
        max_wait_s: float,
        max_waiting: int,
        recovery_s: float,
        limited: bool,
        max_in_flight: int = 0,
    ) -> None:
        """Apply new rates from now on; pauses and cuts in force are kept.

        `limited` says whether `rate_of` may return a rate for any key (when it
        is False and nothing is paused, :meth:`admit` costs nothing).
        """
        if max_wait_s < 0 or max_waiting < 0 or max_in_flight < 0 or not recovery_s > 0:
            raise ValueError(
                "max_wait_s, max_waiting and max_in_flight must be >= 0, recovery_s > 0"
            )
        self._rate_of = rate_of
        self._max_wait_s = max_wait_s
        self._max_waiting = max_waiting
        self._recovery_s = recovery_s
        self._limited = limited
        self._max_in_flight = max_in_flight
        for key, state in self._states.items():
            state.rate = rate_of(key)
            if state.rate is None:
                state.lowered = None
            elif state.lowered is not None:
                state.lowered = min(state.lowered, state.rate.per_second)
        self.engaged = limited or max_in_flight > 0 or bool(self._states)

    def admit(self, key: str) -> Awaitable[None] | None:
        """None when a job for `key` may go now; an awaitable that waits for its turn when
        that is near; raise :class:`Throttled` (delay the job) when it is not.

        Every job admitted (not delayed) is reported to :meth:`done` once it is over.
        """
        if not self.engaged:
            return None
        state = self._states.get(key)
        if state is None:
            rate = self._rate_of(key) if self._limited else None
            if rate is None and not self._max_in_flight:
                return None
            state = self._add(key, rate)
        else:
            self._states.move_to_end(key)
        if self._max_in_flight:
            if state.in_flight >= self._max_in_flight:
                state.throttled += 1
                raise Throttled(key, _BUSY_DELAY_S)
            state.in_flight += 1
            try:
                return self._turn(key, state)
            except Throttled:
                state.in_flight -= 1
                raise
        return self._turn(key, state)

    def done(self, key: str) -> None:
        """A job that :meth:`admit` let through has finished: one fewer in flight."""
        state = self._states.get(key)
        if state is not None and state.in_flight > 0:
            state.in_flight -= 1

    def _turn(self, key: str, state: _Destination) -> Awaitable[None] | None:
        """Reserve the job's turn at its destination's rate, or raise Throttled."""
        now = self._clock()
        allowed_at, interval = state.turn(now, self._recovery_s)
        wait = allowed_at - now
        if wait > 0 and (wait > self._max_wait_s or self.waiting >= self._max_waiting):
            state.throttled += 1
            raise Throttled(key, self._defer(state, now + wait, interval) - now)
        if interval:
            state.tat = max(state.tat, now) + interval
        if wait <= 0:
            # Nobody is ahead: jobs delayed from now on need not queue behind earlier ones.
            state.deferred_until = -math.inf
            return None
        state.throttled += 1
        return self._wait(wait)

    def slow_down(self, key: str, *, status: int, retry_after_s: float | None) -> None:
        """A call to `key` was answered 429 or 503: pause it and lower its rate for a while."""
        now = self._clock()
        if retry_after_s is None:
            pause = _DEFAULT_PAUSE_429_S if status == 429 else 0.0
        else:
            pause = min(max(retry_after_s, 0.0), _MAX_PAUSE_S)
        state = self._states.get(key)
        if state is None:
            rate = self._rate_of(key) if self._limited else None
            if rate is None and pause == 0:
                return  # nothing to pause, nothing to lower
            state = self._add(key, rate)
        state.paused_until = max(state.paused_until, now + pause)
        per_second = state.per_second(now, self._recovery_s)
        if state.rate is not None and per_second is not None:
            if now - state.last_cut >= _MIN_CUT_INTERVAL_S:
                floor = state.rate.per_second * _FLOOR_FACTOR
                state.lowered = max(per_second * _CUT_FACTOR, floor)
                state.last_cut = now
            elif state.lowered is None:
                state.lowered = per_second
            per_second = state.lowered
            # No burst when the pause ends: the first call goes then, the rest at the rate.
            tolerance = (state.rate.burst - 1) / per_second
            state.tat = max(state.tat, state.paused_until + tolerance)
        state.recover_from = max(now, state.paused_until)

    def report(self) -> Iterator[DestinationReport]:
        """The destinations that were throttled or are slowed down now (for `/metrics`)."""
        now = self._clock()
        for key, state in list(self._states.items()):
            slowed: float | None = None
            if now < state.paused_until:
                slowed = 0.0
            elif state.lowered is not None:
                slowed = state.per_second(now, self._recovery_s)
            if state.throttled or slowed is not None:
                yield DestinationReport(key, state.throttled, slowed)

    def _add(self, key: str, rate: Rate | None) -> _Destination:
        state = self._states[key] = _Destination(rate)
        while len(self._states) > self._max_keys:
            idle = next(
                (k for k, s in self._states.items() if not s.in_flight and s is not state), None
            )
            if idle is None:
                break
            del self._states[idle]
        self.engaged = True
        return state

    def _defer(self, state: _Destination, due: float, interval: float) -> float:
        """When a delayed job should come back: spread one interval after the last one."""
        due = max(due, state.deferred_until)
        state.deferred_until = due + interval
        return due

    async def _wait(self, seconds: float) -> None:
        self.waiting += 1
        try:
            await self._sleep(seconds)
        finally:
            self.waiting -= 1
