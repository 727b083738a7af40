"""Tests for the resizable concurrency limiter and the token bucket."""

from __future__ import annotations

import asyncio

import pytest

from formcraftd.core.limits import ResizableLimiter, TokenBucket

# A slot lost by a bug shows up as a task that waits forever: fail fast instead.
pytestmark = pytest.mark.timeout(10)


async def settle() -> None:
    """Let every ready task run until none can make progress."""
    for _ in range(10):
        await asyncio.sleep(0)


class Holders:
    """Tasks that enter a limiter and hold it until told to leave."""

    def __init__(self, limiter: ResizableLimiter) -> None:
        self.limiter = limiter
        self.entered: list[int] = []
        self.leave: dict[int, asyncio.Event] = {}
        self.tasks: dict[int, asyncio.Task[None]] = {}

    def start(self, tg: asyncio.TaskGroup, *ids: int) -> None:
        for ident in ids:
            self.leave[ident] = asyncio.Event()
            self.tasks[ident] = tg.create_task(self._hold(ident))

    def release(self, *ids: int) -> None:
        for ident in ids:
            self.leave[ident].set()

    def release_all(self) -> None:
        self.release(*self.leave)

    async def _hold(self, ident: int) -> None:
        async with self.limiter:
            self.entered.append(ident)
            await self.leave[ident].wait()


@pytest.fixture
def limiter() -> ResizableLimiter:
    """A limiter of two slots."""
    return ResizableLimiter(2)


async def test_never_exceeds_limit_under_load() -> None:
    """200 concurrent tasks never hold more than the limit at once."""
    limiter = ResizableLimiter(5)
    active = peak = 0

    async def job(ident: int) -> None:
        nonlocal active, peak
        async with limiter:
            active += 1
            peak = max(peak, active)
            for _ in range(ident % 4):
                await asyncio.sleep(0)
            active -= 1

    async with asyncio.TaskGroup() as tg:
        for ident in range(200):
            tg.create_task(job(ident))
    assert (peak, limiter.in_use, limiter.waiting) == (5, 0, 0)


async def test_counts_holders_and_waiters(limiter: ResizableLimiter) -> None:
    """in_use and waiting follow who holds and who waits."""
    holders = Holders(limiter)
    async with asyncio.TaskGroup() as tg:
        holders.start(tg, 1, 2, 3)
        await settle()
        counts = (limiter.in_use, limiter.waiting)
        holders.release_all()
    assert counts == (2, 1)


async def test_waiters_are_served_fifo() -> None:
    """Waiters get slots in the order they arrived."""
    limiter = ResizableLimiter(1)
    holders = Holders(limiter)
    async with asyncio.TaskGroup() as tg:
        holders.start(tg, 0)
        await settle()
        holders.start(tg, 1, 2, 3, 4)
        await settle()
        for ident in range(5):
            holders.release(ident)
            await settle()
    assert holders.entered == [0, 1, 2, 3, 4]


async def test_newcomer_does_not_overtake_a_waiter() -> None:
    """A slot freed while someone waits goes to the waiter, not to a later arrival."""
    limiter = ResizableLimiter(1)
    holders = Holders(limiter)
    async with asyncio.TaskGroup() as tg:
        holders.start(tg, 0)
        await settle()
        holders.start(tg, 1)
        await settle()
        holders.release(0)
        holders.start(tg, 2)  # arrives before waiter 1 has resumed
        await settle()
        holders.release_all()
    assert holders.entered == [0, 1, 2]


async def test_resize_up_wakes_waiters_at_once(limiter: ResizableLimiter) -> None:
    """Growing the limit lets waiting tasks in without anyone leaving."""
    holders = Holders(limiter)
    async with asyncio.TaskGroup() as tg:
        holders.start(tg, 1, 2, 3, 4)
        await settle()
        limiter.resize(4)
        await settle()
        entered = sorted(holders.entered)
        holders.release_all()
    assert entered == [1, 2, 3, 4]


async def test_resize_down_does_not_interrupt_holders() -> None:
    """Shrinking leaves current holders in place."""
    limiter = ResizableLimiter(3)
    holders = Holders(limiter)
    async with asyncio.TaskGroup() as tg:
        holders.start(tg, 1, 2, 3)
        await settle()
        limiter.resize(1)
        await settle()
        state = (limiter.limit, limiter.in_use, [task.done() for task in holders.tasks.values()])
        holders.release_all()
    assert state == (1, 3, [False, False, False])


async def test_resize_down_holds_newcomers_until_below_limit() -> None:
    """After shrinking, a newcomer waits until fewer than the new limit hold a slot."""
    limiter = ResizableLimiter(3)
    holders = Holders(limiter)
    async with asyncio.TaskGroup() as tg:
        holders.start(tg, 1, 2, 3)
        await settle()
        limiter.resize(1)
        holders.start(tg, 4)
        progress = []
        for leaver in (1, 2, 3):
            holders.release(leaver)
            await settle()
            progress.append(4 in holders.entered)
        holders.release_all()
    assert progress == [False, False, True]


async def test_cancelled_waiter_does_not_leak_a_slot() -> None:
    """Cancelling a waiter leaves the slot count intact."""
    limiter = ResizableLimiter(1)
    holders = Holders(limiter)
    async with asyncio.TaskGroup() as tg:
        holders.start(tg, 0, 1)
        await settle()
        holders.tasks[1].cancel()
        await settle()
        counts = (limiter.in_use, limiter.waiting)
        holders.release_all()
    assert counts == (1, 0)
    assert limiter.in_use == 0


async def test_cancelled_waiter_does_not_swallow_the_next_wakeup() -> None:
    """After a waiter is cancelled the next waiter still gets the freed slot."""
    limiter = ResizableLimiter(1)
    holders = Holders(limiter)
    async with asyncio.TaskGroup() as tg:
        holders.start(tg, 0, 1, 2)
        await settle()
        holders.tasks[1].cancel()
        holders.release(0)
        await settle()
        entered = list(holders.entered)
        holders.release_all()
    assert entered == [0, 2]


async def test_waiter_cancelled_after_its_wakeup_passes_the_slot_on() -> None:
    """A waiter handed a slot but cancelled before it resumes gives the slot to the next."""
    limiter = ResizableLimiter(1)
    holders = Holders(limiter)
    async with asyncio.TaskGroup() as tg:
        holders.start(tg, 0, 1, 2)
        await settle()
        holders.release(0)
        await asyncio.sleep(0)  # holder 0 leaves and hands the slot to waiter 1
        holders.tasks[1].cancel()  # ... which is cancelled before it runs
        await settle()
        state = (list(holders.entered), limiter.in_use)
        holders.release_all()
    assert state == ([0, 2], 1)


async def test_exception_in_body_frees_the_slot(limiter: ResizableLimiter) -> None:
    """Leaving the block with an error releases the slot."""
    with pytest.raises(RuntimeError):
        async with limiter:
            raise RuntimeError("boom")
    assert limiter.in_use == 0


def test_limit_below_one_is_rejected() -> None:
    """A limiter needs at least one slot."""
    with pytest.raises(ValueError, match="limit"):
        ResizableLimiter(0)


def test_resize_below_one_is_rejected(limiter: ResizableLimiter) -> None:
    """resize refuses a limit below one and keeps the old one."""
    with pytest.raises(ValueError, match="limit"):
        limiter.resize(0)
    assert limiter.limit == 2


# --- TokenBucket -------------------------------------------------------------------


class VirtualClock:
    """A clock that only moves when a bucket sleeps on it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def bucket_on(clock: VirtualClock, rate_per_minute: float, **kwargs: float) -> TokenBucket:
    return TokenBucket(rate_per_minute, clock=clock, sleep=clock.sleep, **kwargs)


async def test_bucket_starts_full_and_hands_out_its_capacity_at_once() -> None:
    """A new bucket gives `capacity` tokens without waiting."""
    clock = VirtualClock()
    bucket = bucket_on(clock, 60, capacity=5)
    for _ in range(5):
        await bucket.acquire()
    assert clock.sleeps == []


async def test_bucket_holds_the_configured_rate() -> None:
    """Beyond the burst, tokens come at rate_per_minute / 60 a second."""
    clock = VirtualClock()
    bucket = bucket_on(clock, 120)  # 2 a second, capacity 2
    for _ in range(12):
        await bucket.acquire()
    assert clock.now - 1000.0 == pytest.approx(5.0)


def test_bucket_default_capacity_is_one_second_of_tokens() -> None:
    """Without a capacity, the burst is a second's worth of tokens, at least one."""
    assert (TokenBucket(300).capacity, TokenBucket(30).capacity) == (5.0, 1.0)


async def test_bucket_refills_while_idle_up_to_capacity() -> None:
    """Idle time refills the bucket, but never beyond its capacity."""
    clock = VirtualClock()
    bucket = bucket_on(clock, 60, capacity=3)
    for _ in range(3):
        await bucket.acquire()
    clock.now += 3600
    assert bucket.available == pytest.approx(3.0)


async def test_bucket_pause_holds_every_token_until_it_ends() -> None:
    """After pause(5), the next token comes 5 s later, and only one at once."""
    clock = VirtualClock()
    bucket = bucket_on(clock, 60, capacity=10)
    bucket.pause(5)
    await bucket.acquire()
    first = clock.now - 1000.0
    await bucket.acquire()
    assert first == pytest.approx(5.0)
    assert clock.now - 1000.0 == pytest.approx(6.0)


async def test_bucket_shorter_pause_does_not_cut_a_longer_one() -> None:
    """A later, shorter pause keeps the end of the longer one."""
    clock = VirtualClock()
    bucket = bucket_on(clock, 60)
    bucket.pause(10)
    bucket.pause(2)
    await bucket.acquire()
    assert clock.now - 1000.0 == pytest.approx(10.0)


async def test_bucket_reconfigure_changes_the_rate() -> None:
    """After reconfigure(600), tokens come ten times a second."""
    clock = VirtualClock()
    bucket = bucket_on(clock, 60, capacity=1)
    await bucket.acquire()
    bucket.reconfigure(600, capacity=1)
    await bucket.acquire()
    assert clock.now - 1000.0 == pytest.approx(0.1)
    assert bucket.rate_per_minute == 600


async def test_bucket_reconfigure_keeps_saved_tokens_within_the_new_capacity() -> None:
    """Shrinking the capacity drops the saved tokens above it."""
    clock = VirtualClock()
    bucket = bucket_on(clock, 6000)  # capacity 100
    bucket.reconfigure(60)
    assert bucket.available == pytest.approx(1.0)


async def test_bucket_waiters_are_served_fifo() -> None:
    """Waiting acquirers get their tokens in the order they asked."""
    clock = VirtualClock()
    bucket = bucket_on(clock, 60, capacity=1)
    order: list[int] = []

    async def take(ident: int) -> None:
        await bucket.acquire()
        order.append(ident)

    async with asyncio.TaskGroup() as tg:
        for ident in range(5):
            tg.create_task(take(ident))
    assert order == [0, 1, 2, 3, 4]
    assert clock.now - 1000.0 == pytest.approx(4.0)


async def test_bucket_cancelled_waiter_takes_no_token() -> None:
    """A waiter cancelled while it sleeps leaves the bucket as if it never asked."""
    bucket = TokenBucket(60, capacity=1)  # real clock: the waiter sleeps for a second
    await bucket.acquire()
    waiter = asyncio.ensure_future(bucket.acquire())
    await settle()
    assert bucket.busy
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not bucket.busy
    assert bucket.available < 1


@pytest.mark.parametrize("rate", [0, -1, float("nan"), float("inf")])
def test_bucket_rejects_a_rate_that_is_not_positive(rate: float) -> None:
    """The rate must be a positive, finite number."""
    with pytest.raises(ValueError, match="rate_per_minute"):
        TokenBucket(rate)


def test_bucket_rejects_a_capacity_below_one() -> None:
    """A bucket must be able to hold at least one token."""
    with pytest.raises(ValueError, match="capacity"):
        TokenBucket(60, capacity=0.5)
