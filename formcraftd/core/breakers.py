"""Circuit breakers, one per remote service, shared by every worker of the process.

A :class:`CircuitBreaker` counts consecutive failures of one service (a key such
as ``webhook:example.com:443``). At `failure_threshold` it opens: callers get
:class:`~formcraftd.core.errors.BreakerOpen` and the consumer delays their jobs without
spending a try. After `reset_timeout_s` it lets exactly one probe through
(half-open); the probe's outcome closes it or opens it again.

Everything runs on one event loop and no method awaits, so each call is atomic
with respect to other coroutines; nothing here is thread-safe.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Literal

from formcraftd.core.config import BreakerConfig
from formcraftd.core.errors import BreakerOpen

BreakerState = Literal["closed", "half_open", "open"]

STATE_VALUES: dict[BreakerState, int] = {"closed": 0, "half_open": 1, "open": 2}
"""The value of each state in the ``formcraftd_breaker_state`` gauge."""

OnChange = Callable[[str, BreakerState], None]


class CircuitBreaker:
    """The closed / open / half-open state machine for one key.

    Each caller whose :meth:`acquire` returned reports exactly once: with
    :meth:`record_success`, :meth:`record_failure`, or :meth:`release` when it ended
    without learning anything about the service. The breaker cannot tell the probe's
    report from a late report of a call that started while it was closed, so any
    failure reported while half-open re-opens it and any success closes it.
    """

    def __init__(
        self,
        key: str,
        *,
        failure_threshold: int,
        reset_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_change: OnChange | None = None,
    ) -> None:
        _check_settings(failure_threshold, reset_timeout_s)
        self.key = key
        self._failure_threshold = failure_threshold
        self._reset_timeout_s = reset_timeout_s
        self._clock = clock
        self._on_change = on_change
        self._state: BreakerState = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False
        self.failing_since: float | None = None  # time.time() of the streak's first failure
        self.last_error_code: str | None = None
        self.last_status: int | None = None

    def __repr__(self) -> str:
        return (
            f"CircuitBreaker({self.key!r}, state={self._state}, "
            f"failures={self._failures}/{self._failure_threshold})"
        )

    @property
    def state(self) -> BreakerState:
        """The current state; an open breaker turns half-open once its timeout has passed."""
        if self._state == "open" and self._remaining() <= 0:
            self._transition("half_open")
        return self._state

    @property
    def consecutive_failures(self) -> int:
        """Failures reported since the last success (or reset)."""
        return self._failures

    @property
    def failure_threshold(self) -> int:
        """Consecutive failures that open the breaker."""
        return self._failure_threshold

    @property
    def reset_timeout_s(self) -> float:
        """How long the breaker stays open before it lets a probe through."""
        return self._reset_timeout_s

    def acquire(self) -> None:
        """Return when a call may go ahead, else raise :class:`BreakerOpen`.

        Closed: always. Open: never, with the seconds left until half-open.
        Half-open: the first caller becomes the single probe; until it reports,
        everyone else gets ``BreakerOpen(key, 0.0)``.
        """
        state = self.state
        if state == "closed":
            return
        if state == "open":
            raise BreakerOpen(self.key, self._remaining())
        if self._probe_in_flight:
            raise BreakerOpen(self.key, 0.0)
        self._probe_in_flight = True

    def record_success(self) -> None:
        """The service answered: zero the failure count; a half-open breaker closes."""
        self._failures = 0
        self.failing_since = None
        if self.state == "half_open":
            self._transition("closed")

    def record_failure(self, code: str | None = None, status: int | None = None) -> None:
        """The service failed (with `code` and `status` when known): count it; open at the
        threshold; a failed probe re-opens."""
        if self._failures == 0:
            self.failing_since = time.time()
        self._failures += 1
        self.last_error_code, self.last_status = code, status
        state = self.state
        tripped = state == "closed" and self._failures >= self._failure_threshold
        if state == "half_open" or tripped:
            self._open()

    def release(self) -> None:
        """The caller ended without a verdict: free the probe slot, change nothing else."""
        self._probe_in_flight = False

    def reset(self) -> None:
        """Force the breaker closed and forget its failures."""
        self._failures = 0
        self.failing_since = None
        if self._state != "closed":
            self._transition("closed")

    def reconfigure(self, *, failure_threshold: int, reset_timeout_s: float) -> None:
        """Apply new settings now.

        An open breaker's remaining time follows the new timeout (it is measured from
        when it opened). A closed breaker whose count already reaches a lowered
        threshold stays closed until the next failure.
        """
        _check_settings(failure_threshold, reset_timeout_s)
        self._failure_threshold = failure_threshold
        self._reset_timeout_s = reset_timeout_s

    def _remaining(self) -> float:
        return self._opened_at + self._reset_timeout_s - self._clock()

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._transition("open")

    def _transition(self, state: BreakerState) -> None:
        # Every transition starts without a probe: a new half-open period hands out
        # a fresh one, and open/closed have none.
        self._probe_in_flight = False
        if state == self._state:
            return
        self._state = state
        if self._on_change is not None:
            self._on_change(self.key, state)


class BreakerRegistry:
    """The breakers of the process by key, created on first use, bounded in number.

    When more than `max_keys` breakers exist, the least recently used ones that are
    closed with no failures are dropped (they hold nothing a fresh breaker would
    not); open and half-open breakers are never dropped, so the bound can be
    exceeded while more than `max_keys` services are failing. `on_evict` is told
    each dropped key (so a metric label can be removed).
    """

    def __init__(
        self,
        config: BreakerConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: OnChange | None = None,
        max_keys: int = 10_000,
        on_evict: Callable[[str], None] | None = None,
    ) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self._config = config
        self._clock = clock
        self._on_change = on_change
        self._on_evict = on_evict
        self._max_keys = max_keys
        self._breakers: OrderedDict[str, CircuitBreaker] = OrderedDict()

    def __len__(self) -> int:
        return len(self._breakers)

    def __contains__(self, key: object) -> bool:
        return key in self._breakers

    def get(self, key: str) -> CircuitBreaker:
        """The breaker for `key`, created (closed) on first use."""
        breaker = self._breakers.get(key)
        if breaker is not None:
            self._breakers.move_to_end(key)
            return breaker
        breaker = CircuitBreaker(
            key,
            failure_threshold=self._config.failure_threshold,
            reset_timeout_s=self._config.reset_timeout_ms / 1000,
            clock=self._clock,
            on_change=self._on_change,
        )
        self._breakers[key] = breaker
        if len(self._breakers) > self._max_keys:
            self._evict()
        return breaker

    def reconfigure(self, config: BreakerConfig) -> None:
        """Apply `config` to every existing breaker and to those created later."""
        self._config = config
        for breaker in self._breakers.values():
            breaker.reconfigure(
                failure_threshold=config.failure_threshold,
                reset_timeout_s=config.reset_timeout_ms / 1000,
            )

    def peek(self, key: str) -> CircuitBreaker | None:
        """The breaker for `key` if there is one, without creating or touching it."""
        return self._breakers.get(key)

    def reset(self, key: str) -> bool:
        """Close the breaker for `key`; False when there is none."""
        breaker = self._breakers.get(key)
        if breaker is None:
            return False
        breaker.reset()
        return True

    def snapshot(self) -> dict[str, BreakerState]:
        """Every known key and its current state."""
        return {key: breaker.state for key, breaker in self._breakers.items()}

    def _evict(self) -> None:
        excess = len(self._breakers) - self._max_keys
        # The newest breaker was just handed out; never drop it from under its caller.
        newest = next(reversed(self._breakers))
        idle: list[str] = []
        for key, breaker in self._breakers.items():
            if len(idle) >= excess:
                break
            if key != newest and breaker.state == "closed" and breaker.consecutive_failures == 0:
                idle.append(key)
        for key in idle:
            del self._breakers[key]
            if self._on_evict is not None:
                self._on_evict(key)


def _check_settings(failure_threshold: int, reset_timeout_s: float) -> None:
    if failure_threshold < 1:
        raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
    if not reset_timeout_s >= 0:
        raise ValueError(f"reset_timeout_s must be >= 0, got {reset_timeout_s}")
