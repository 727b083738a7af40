"""The retry schedule and its delay tiers (pure functions, no I/O).

A :class:`RetrySchedule` answers three questions for the consumer: how many tries a
job gets, how long to wait before the next one, and which retry wait queue
(``<queue>.retry.<delay_ms>``, see :mod:`formcraftd.amqp.topology`) serves a given delay.
Every delay it hands out is one of :meth:`RetrySchedule.tiers`, so a wait queue for
it has always been declared.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_left
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Literal

from formcraftd.core.config import RetryConfig

Backoff = Literal["exponential", "linear"]

MAX_TIERS = 64
"""The most delay tiers (and so retry wait queues) one schedule declares."""


@dataclass(frozen=True, slots=True)
class RetrySchedule:
    """How often and after how long a failed job is tried again.

    `attempts` counts every try, the first included. The delay before retry ``n``
    is ``initial_delay_ms * 2**(n-1)`` (exponential) or ``initial_delay_ms * n``
    (linear), capped at `max_delay_ms`.
    """

    attempts: int
    backoff: Backoff
    initial_delay_ms: int
    max_delay_ms: int
    _tiers: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts}")
        if self.backoff not in ("exponential", "linear"):
            raise ValueError(f"backoff must be 'exponential' or 'linear', got {self.backoff!r}")
        if self.initial_delay_ms < 1:
            raise ValueError(f"initial_delay_ms must be >= 1, got {self.initial_delay_ms}")
        if self.max_delay_ms < self.initial_delay_ms:
            raise ValueError("max_delay_ms must be >= initial_delay_ms")
        # A frozen slots dataclass cannot use cached_property; compute once here.
        object.__setattr__(self, "_tiers", self._compute_tiers())

    @classmethod
    def from_config(cls, config: RetryConfig) -> RetrySchedule:
        """The schedule a ``[retry]`` (or ``[workers.X.retry]``) section describes."""
        return cls(
            attempts=config.attempts,
            backoff=config.backoff,
            initial_delay_ms=config.initial_delay_ms,
            max_delay_ms=config.max_delay_ms,
        )

    def delay_ms(self, retry: int) -> int:
        """The delay before retry number `retry` (1 = the first retry, after the first try).

        This is the curve's value, capped at `max_delay_ms`. Only when the tiers had
        to be thinned out (see :meth:`tiers`) and the value fell between two of them
        is it rounded up to the next tier, so that a wait queue for it exists and the
        wait is never shorter than the curve asks.
        """
        if retry < 1:
            raise ValueError(f"retry must be >= 1, got {retry}")
        raw = self._curve(retry - 1)
        if raw in self._tiers:
            return raw
        return self.tier_at_least(raw)

    def tries_left(self, tries_so_far: int) -> bool:
        """Whether a job tried `tries_so_far` times may be tried again."""
        return tries_so_far < self.attempts

    def tiers(self) -> tuple[int, ...]:
        """Every delay of the curve from `initial_delay_ms` up to `max_delay_ms`, ascending.

        Linear: ``initial * k`` for ``k = 1, 2, ...`` while below the cap, then the
        cap; exponential: ``initial * 2**k`` likewise. The range does not depend on
        `attempts`: Retry-After and open breakers may ask for any delay up to the cap.

        At most :data:`MAX_TIERS` (64) tiers are kept, since each is a queue on the
        broker. When the curve has more points (e.g. linear from 1 ms to 60000 ms),
        it is thinned deterministically:

        * the delays this schedule itself uses before its retries (``delay_ms(1)`` to
          ``delay_ms(attempts - 1)``, at most the first 32 of them) are kept exactly,
          so :meth:`delay_ms` keeps its formula for them; `initial_delay_ms` is
          always kept;
        * the rest of the 64 are spread evenly by position over the remaining
          points, the last one being `max_delay_ms`.

        So only a thinned curve's tiers depend on `attempts`.
        """
        return self._tiers

    def tier_at_least(self, delay_ms: float) -> int:
        """The smallest tier >= `delay_ms`, or the largest tier when none is."""
        tiers = self._tiers
        index = bisect_left(tiers, _checked(delay_ms))
        return tiers[min(index, len(tiers) - 1)]

    def nearest_tier(self, delay_ms: float) -> int:
        """The tier nearest to `delay_ms`; on a tie, the larger one."""
        tiers = self._tiers
        index = bisect_left(tiers, _checked(delay_ms))
        if index == 0:
            return tiers[0]
        if index == len(tiers):
            return tiers[-1]
        lower, upper = tiers[index - 1], tiers[index]
        return lower if delay_ms - lower < upper - delay_ms else upper

    def _curve(self, step: int) -> int:
        """The curve's delay after `step` doublings or increments, capped."""
        if self.backoff == "linear":
            return min(self.initial_delay_ms * (step + 1), self.max_delay_ms)
        # Past this many doublings the cap is reached; skip building a huge int.
        if step >= self.max_delay_ms.bit_length():
            return self.max_delay_ms
        return min(self.initial_delay_ms << step, self.max_delay_ms)

    def _curve_length(self) -> int:
        """How many distinct points the full (uncapped-count) curve has."""
        initial, cap = self.initial_delay_ms, self.max_delay_ms
        if self.backoff == "linear":
            return -(-cap // initial)  # multiples below the cap, plus the cap itself
        length = 1
        while initial << (length - 1) < cap:
            length += 1
        return length

    def _compute_tiers(self) -> tuple[int, ...]:
        length = self._curve_length()
        if length <= MAX_TIERS:
            return tuple(self._curve(step) for step in range(length))
        # Keep the schedule's own first delays (step r-1 is retry r) exactly ...
        head = max(1, min(self.attempts - 1, MAX_TIERS // 2))
        # ... then spread the remaining budget over steps head .. length-1, ending on
        # the cap. length > 64 >= head + budget, so every pick is a distinct step;
        # integer arithmetic (round half up) stays exact for curves of any length.
        budget, rest = MAX_TIERS - head, length - head
        tail = (head - 1 + (2 * j * rest + budget) // (2 * budget) for j in range(1, budget + 1))
        return tuple(self._curve(step) for step in (*range(head), *tail))


def _checked(delay_ms: float) -> float:
    if math.isnan(delay_ms):
        raise ValueError("delay_ms is NaN")
    return delay_ms


_RETRY_AFTER_SECONDS = re.compile(r"-?\d{1,12}")
MAX_RETRY_AFTER_S = 86_400.0  # a day: longer waits are a server's mistake, not a plan


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta-seconds or an HTTP date).

    None when missing or unusable; negative or past values count as 0, and
    anything over a day as a day.
    """
    if not value:
        return None
    value = value.strip()
    if _RETRY_AFTER_SECONDS.fullmatch(value):
        return min(float(max(0, int(value))), MAX_RETRY_AFTER_S)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return min(max(0.0, seconds), MAX_RETRY_AFTER_S)
