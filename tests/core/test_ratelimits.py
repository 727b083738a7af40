"""Tests for the per-destination rate limits, on a virtual clock."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import pytest

from formcraftd.core.errors import Throttled
from formcraftd.core.ratelimits import DestinationLimits, Rate, RateOf

A = "webhook:a.example:443"
B = "webhook:b.example:443"


class VirtualClock:
    """A clock that only moves when told to (or when a wait sleeps)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def only(key: str, rate: Rate | None) -> RateOf:
    """A rate for `key` alone; every other destination is unlimited."""
    return lambda k: rate if k == key else None


def limits(
    clock: VirtualClock,
    rate_of: RateOf,
    *,
    max_wait_s: float = 1.0,
    max_waiting: int = 100,
    recovery_s: float = 10.0,
    limited: bool = True,
) -> DestinationLimits:
    return DestinationLimits(
        rate_of,
        max_wait_s=max_wait_s,
        max_waiting=max_waiting,
        recovery_s=recovery_s,
        limited=limited,
        clock=clock,
        sleep=clock.sleep,
    )


async def take(limits: DestinationLimits, clock: VirtualClock, key: str) -> float:
    """Admit one job for `key` and return how long it waited (virtual seconds)."""
    turn = limits.admit(key)
    if turn is None:
        return 0.0
    before = clock.now
    await turn
    return clock.now - before


def test_without_any_rate_admitting_costs_nothing() -> None:
    """With no rate configured and nothing paused, admit() returns at once for any key."""
    clock = VirtualClock()
    lim = limits(clock, lambda _key: None, limited=False)
    assert not lim.engaged
    assert all(lim.admit(A) is None for _ in range(1000))
    assert list(lim.report()) == []


async def test_a_burst_goes_at_once_then_the_rate() -> None:
    """Burst 3 at 10/s: three calls go now, the next ones 0.1 s apart."""
    clock = VirtualClock()
    lim = limits(clock, only(A, Rate(10, 3)))
    waits = [await take(lim, clock, A) for _ in range(6)]
    assert waits[:3] == [0.0, 0.0, 0.0]
    assert waits[3:] == pytest.approx([0.1, 0.1, 0.1])


async def test_other_destinations_are_not_slowed() -> None:
    """While A is over its rate, B's jobs go at once."""
    clock = VirtualClock()
    lim = limits(clock, only(A, Rate(1, 1)), max_wait_s=0)
    assert lim.admit(A) is None
    with pytest.raises(Throttled):
        lim.admit(A)
    assert all(lim.admit(B) is None for _ in range(100))


def test_a_wait_longer_than_max_wait_is_a_delay_spread_over_the_rate() -> None:
    """Jobs whose turn is too far off are delayed, each one interval after the previous one."""
    clock = VirtualClock()
    lim = limits(clock, only(A, Rate(2, 1)), max_wait_s=0.2)
    assert lim.admit(A) is None
    remaining = []
    for _ in range(3):
        with pytest.raises(Throttled) as caught:
            lim.admit(A)
        remaining.append(caught.value.remaining)
        assert caught.value.key == A
    assert remaining == pytest.approx([0.5, 1.0, 1.5])


def test_the_spread_of_delays_starts_afresh_once_a_job_goes_at_once() -> None:
    """After a backlog has drained, a delayed job comes back at its turn, not behind old ones."""
    clock = VirtualClock()
    lim = limits(clock, only(A, Rate(2, 1)), max_wait_s=0)
    assert lim.admit(A) is None
    for _ in range(20):
        with pytest.raises(Throttled):
            lim.admit(A)
    clock.now += 60
    assert lim.admit(A) is None
    with pytest.raises(Throttled) as caught:
        lim.admit(A)
    assert caught.value.remaining == pytest.approx(0.5)


def test_delays_do_not_take_the_turns_of_jobs_that_wait() -> None:
    """A delayed job reserves nothing: the next job's turn is as near as before."""
    clock = VirtualClock()
    lim = limits(clock, only(A, Rate(2, 1)), max_wait_s=0.2)
    assert lim.admit(A) is None
    with pytest.raises(Throttled):
        lim.admit(A)
    clock.now += 0.4
    turn = lim.admit(A)
    assert turn is not None  # 0.1 s away: within max_wait
    turn.close()  # type: ignore[attr-defined]


async def test_no_more_than_max_waiting_jobs_wait_in_the_process() -> None:
    """Past `max_waiting` jobs waiting, the next one is delayed even though its turn is near."""
    clock = VirtualClock()
    gate = asyncio.Event()

    async def held_sleep(_seconds: float) -> None:
        await gate.wait()

    lim = DestinationLimits(
        only(A, Rate(100, 1)),
        max_wait_s=1,
        max_waiting=2,
        recovery_s=1,
        limited=True,
        clock=clock,
        sleep=held_sleep,
    )
    assert lim.admit(A) is None
    waiting = [asyncio.ensure_future(_awaited(lim.admit(A))) for _ in range(2)]
    await asyncio.sleep(0)
    assert lim.waiting == 2
    with pytest.raises(Throttled):
        lim.admit(A)
    gate.set()
    await asyncio.gather(*waiting)
    assert lim.waiting == 0


async def _awaited(turn: Awaitable[None] | None) -> None:
    assert turn is not None
    await turn


async def test_a_429_pauses_an_unlimited_destination_for_its_retry_after() -> None:
    """No rate configured: a 429 with Retry-After: 5 delays A's jobs about 5 s, not B's."""
    clock = VirtualClock()
    lim = limits(clock, lambda _key: None, limited=False)
    lim.slow_down(A, status=429, retry_after_s=5)
    assert lim.engaged
    with pytest.raises(Throttled) as caught:
        lim.admit(A)
    assert caught.value.remaining == pytest.approx(5)
    assert lim.admit(B) is None
    clock.now += 4.5
    assert await take(lim, clock, A) == pytest.approx(0.5)
    assert lim.admit(A) is None


def test_a_503_without_retry_after_leaves_an_unlimited_destination_alone() -> None:
    """Nothing to pause and no rate to lower: a bare 503 is the breaker's business."""
    clock = VirtualClock()
    lim = limits(clock, lambda _key: None, limited=False)
    lim.slow_down(A, status=503, retry_after_s=None)
    assert not lim.engaged
    assert lim.admit(A) is None


def test_a_429_without_retry_after_pauses_one_second() -> None:
    """A 429 that does not say how long to wait pauses the destination 1 s."""
    clock = VirtualClock()
    lim = limits(clock, lambda _key: None, limited=False, max_wait_s=0)
    lim.slow_down(A, status=429, retry_after_s=None)
    with pytest.raises(Throttled) as caught:
        lim.admit(A)
    assert caught.value.remaining == pytest.approx(1.0)


async def test_a_429_halves_the_rate_then_it_recovers() -> None:
    """10/s, a 429: after the pause calls go at 5/s, and at 10/s again after recovery_s."""
    clock = VirtualClock()
    lim = limits(clock, only(A, Rate(10, 1)), recovery_s=10, max_wait_s=5)
    await take(lim, clock, A)
    lim.slow_down(A, status=429, retry_after_s=2)
    first = await take(lim, clock, A)
    assert first == pytest.approx(2.0)  # the pause; then no burst
    assert await take(lim, clock, A) == pytest.approx(0.2, rel=0.05)  # 5/s right after the pause
    reports = {r.key: r for r in lim.report()}
    assert 5 <= (reports[A].rate or 0) < 10
    clock.now += 20  # past recovery_s
    await take(lim, clock, A)
    assert await take(lim, clock, A) == pytest.approx(0.1)
    assert {r.key: r.rate for r in lim.report()}[A] is None


def test_answers_to_calls_sent_together_cut_the_rate_once() -> None:
    """Five 429s within a second halve the rate once, not five times."""
    clock = VirtualClock()
    lim = limits(clock, only(A, Rate(16, 1)), recovery_s=100)
    for _ in range(5):
        lim.slow_down(A, status=429, retry_after_s=0)
    clock.now += 1.0
    assert {r.key: r.rate for r in lim.report()}[A] == pytest.approx(8, rel=0.02)


def test_the_rate_is_never_cut_below_a_sixteenth() -> None:
    """Ten 503s a second apart leave 1/s of a configured 16/s."""
    clock = VirtualClock()
    lim = limits(clock, only(A, Rate(16, 1)), recovery_s=1000)
    for _ in range(10):
        lim.slow_down(A, status=503, retry_after_s=None)
        clock.now += 1.0
    assert {r.key: r.rate for r in lim.report()}[A] == pytest.approx(1, rel=0.02)


def test_a_paused_destination_reports_rate_zero_and_its_throttled_jobs() -> None:
    """/metrics reads rate 0 while paused, and every job that was held back."""
    clock = VirtualClock()
    lim = limits(clock, only(A, Rate(10, 1)), max_wait_s=0)
    lim.slow_down(A, status=429, retry_after_s=30)
    for _ in range(3):
        with pytest.raises(Throttled):
            lim.admit(A)
    (report,) = lim.report()
    assert (report.key, report.throttled, report.rate) == (A, 3, 0.0)


def test_destinations_are_bounded_least_recently_used_first() -> None:
    """Past max_keys the least recently used destination is forgotten (and its label)."""
    clock = VirtualClock()
    lim = DestinationLimits(
        lambda _key: Rate(1, 1),
        max_wait_s=0,
        max_waiting=1,
        recovery_s=1,
        limited=True,
        max_keys=2,
        clock=clock,
    )
    for key in ("webhook:x:1", "webhook:y:1", "webhook:z:1"):
        lim.admit(key)
        with pytest.raises(Throttled):
            lim.admit(key)
    assert [r.key for r in lim.report()] == ["webhook:y:1", "webhook:z:1"]


def test_reconfigure_lifts_a_limit() -> None:
    """A reload that sets the rate to 0 lets A's jobs go at once."""
    clock = VirtualClock()
    lim = limits(clock, only(A, Rate(1, 1)), max_wait_s=0)
    lim.admit(A)
    with pytest.raises(Throttled):
        lim.admit(A)
    lim.reconfigure(lambda _key: None, max_wait_s=0, max_waiting=1, recovery_s=1, limited=False)
    assert lim.admit(A) is None


def test_rate_must_be_positive() -> None:
    """A rate of 0 is "no limit", which is None, never a Rate."""
    with pytest.raises(ValueError, match="per_second"):
        Rate(0, 1)
    with pytest.raises(ValueError, match="burst"):
        Rate(1, 0)


def test_max_in_flight_caps_the_jobs_of_one_destination_under_way() -> None:
    """Two under way to A: a third is delayed (no try) until one is done; B is not capped."""
    clock = VirtualClock()
    lim = limits(clock, lambda _key: None, limited=False)
    lim.reconfigure(
        lambda _key: None, max_wait_s=1, max_waiting=5, recovery_s=1, limited=False, max_in_flight=2
    )
    assert lim.engaged
    assert lim.admit(A) is None and lim.admit(A) is None
    with pytest.raises(Throttled) as caught:
        lim.admit(A)
    assert caught.value.remaining > 0
    assert lim.admit(B) is None and lim.admit(B) is None
    lim.done(A)
    assert lim.admit(A) is None


def test_a_job_delayed_for_its_rate_does_not_count_as_in_flight() -> None:
    """Only admitted jobs hold a place under max_in_flight."""
    clock = VirtualClock()
    lim = limits(clock, only(A, Rate(1, 1)), max_wait_s=0)
    lim.reconfigure(
        only(A, Rate(1, 1)),
        max_wait_s=0,
        max_waiting=5,
        recovery_s=1,
        limited=True,
        max_in_flight=1,
    )
    assert lim.admit(A) is None
    lim.done(A)
    with pytest.raises(Throttled):
        lim.admit(A)  # over the rate: delayed, and not counted
    clock.now += 1
    assert lim.admit(A) is None


def test_a_destination_with_jobs_in_flight_is_not_forgotten() -> None:
    """The bound on destinations never drops one whose in-flight count is still needed."""
    clock = VirtualClock()
    lim = DestinationLimits(
        lambda _key: None,
        max_wait_s=0,
        max_waiting=1,
        recovery_s=1,
        limited=False,
        max_in_flight=1,
        max_keys=1,
        clock=clock,
    )
    assert lim.admit("webhook:x:1") is None
    assert lim.admit("webhook:y:1") is None
    for key in ("webhook:x:1", "webhook:y:1"):
        with pytest.raises(Throttled):
            lim.admit(key)
