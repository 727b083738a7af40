"""Tests for the circuit breakers and their registry."""

from __future__ import annotations

import pytest

from formcraftd.core.breakers import (
    STATE_VALUES,
    BreakerRegistry,
    BreakerState,
    CircuitBreaker,
)
from formcraftd.core.config import BreakerConfig
from formcraftd.core.errors import BreakerOpen

THRESHOLD = 3
TIMEOUT_S = 30.0


class FakeClock:
    """A monotonic clock that only moves when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Changes:
    """Records every (key, state) the breakers report."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, BreakerState]] = []

    def __call__(self, key: str, state: BreakerState) -> None:
        self.seen.append((key, state))


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock."""
    return FakeClock()


@pytest.fixture
def changes() -> Changes:
    """A recorder of state changes."""
    return Changes()


@pytest.fixture
def breaker(clock: FakeClock, changes: Changes) -> CircuitBreaker:
    """A closed breaker: 3 failures open it for 30 s."""
    return CircuitBreaker(
        "webhook:example.com:443",
        failure_threshold=THRESHOLD,
        reset_timeout_s=TIMEOUT_S,
        clock=clock,
        on_change=changes,
    )


def fail(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        breaker.acquire()
        breaker.record_failure()


def open_then_wait(breaker: CircuitBreaker, clock: FakeClock) -> None:
    """Open the breaker and let its reset timeout pass."""
    fail(breaker, THRESHOLD)
    clock.advance(TIMEOUT_S)


def test_state_values_encode_the_gauge() -> None:
    """The metric encoding is 0 closed, 1 half-open, 2 open."""
    assert STATE_VALUES == {"closed": 0, "half_open": 1, "open": 2}


def test_new_breaker_is_closed(breaker: CircuitBreaker) -> None:
    """A fresh breaker lets calls through."""
    breaker.acquire()
    assert breaker.state == "closed"


def test_failures_below_threshold_keep_it_closed(breaker: CircuitBreaker) -> None:
    """Two failures out of three leave the breaker closed."""
    fail(breaker, THRESHOLD - 1)
    assert (breaker.state, breaker.consecutive_failures) == ("closed", THRESHOLD - 1)


def test_threshold_failures_open_it(breaker: CircuitBreaker) -> None:
    """The third consecutive failure opens the breaker."""
    fail(breaker, THRESHOLD)
    assert breaker.state == "open"


def test_success_resets_the_count(breaker: CircuitBreaker) -> None:
    """A success between failures starts the count again."""
    fail(breaker, THRESHOLD - 1)
    breaker.record_success()
    fail(breaker, THRESHOLD - 1)
    assert (breaker.state, breaker.consecutive_failures) == ("closed", THRESHOLD - 1)


def test_open_raises_with_remaining_time(breaker: CircuitBreaker, clock: FakeClock) -> None:
    """An open breaker refuses calls and says how long it stays open."""
    fail(breaker, THRESHOLD)
    clock.advance(10)
    with pytest.raises(BreakerOpen) as caught:
        breaker.acquire()
    assert caught.value.key == breaker.key
    assert caught.value.remaining == pytest.approx(20.0)


def test_open_turns_half_open_after_timeout(breaker: CircuitBreaker, clock: FakeClock) -> None:
    """Once the reset timeout has passed the breaker reads half-open."""
    open_then_wait(breaker, clock)
    assert breaker.state == "half_open"


def test_open_stays_open_just_before_timeout(breaker: CircuitBreaker, clock: FakeClock) -> None:
    """A moment before the timeout the breaker is still open."""
    fail(breaker, THRESHOLD)
    clock.advance(TIMEOUT_S - 0.001)
    assert breaker.state == "open"


def test_half_open_lets_one_probe_through(breaker: CircuitBreaker, clock: FakeClock) -> None:
    """The first caller after the timeout becomes the probe."""
    open_then_wait(breaker, clock)
    breaker.acquire()
    assert breaker.state == "half_open"


def test_half_open_refuses_others_during_probe(breaker: CircuitBreaker, clock: FakeClock) -> None:
    """While the probe is in flight, other callers get BreakerOpen with no time left."""
    open_then_wait(breaker, clock)
    breaker.acquire()
    with pytest.raises(BreakerOpen) as caught:
        breaker.acquire()
    assert caught.value.remaining == 0.0


def test_probe_success_closes(breaker: CircuitBreaker, clock: FakeClock) -> None:
    """A successful probe closes the breaker and zeroes the count."""
    open_then_wait(breaker, clock)
    breaker.acquire()
    breaker.record_success()
    assert (breaker.state, breaker.consecutive_failures) == ("closed", 0)


def test_probe_failure_reopens_for_a_fresh_timeout(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    """A failed probe opens the breaker for a whole new reset timeout."""
    open_then_wait(breaker, clock)
    breaker.acquire()
    breaker.record_failure()
    with pytest.raises(BreakerOpen) as caught:
        breaker.acquire()
    assert caught.value.remaining == pytest.approx(TIMEOUT_S)


def test_release_frees_the_probe_slot(breaker: CircuitBreaker, clock: FakeClock) -> None:
    """A probe that ended without a verdict lets the next caller probe."""
    open_then_wait(breaker, clock)
    breaker.acquire()
    breaker.release()
    breaker.acquire()
    assert breaker.state == "half_open"


def test_release_changes_no_state(breaker: CircuitBreaker) -> None:
    """Releasing a closed breaker leaves it closed with its failures."""
    fail(breaker, 1)
    breaker.acquire()
    breaker.release()
    assert (breaker.state, breaker.consecutive_failures) == ("closed", 1)


def test_reset_closes_an_open_breaker(breaker: CircuitBreaker) -> None:
    """reset forces an open breaker closed and forgets its failures."""
    fail(breaker, THRESHOLD)
    breaker.reset()
    breaker.acquire()
    assert (breaker.state, breaker.consecutive_failures) == ("closed", 0)


def test_reconfigure_changes_the_threshold(breaker: CircuitBreaker) -> None:
    """A lowered threshold opens the breaker sooner."""
    breaker.reconfigure(failure_threshold=1, reset_timeout_s=TIMEOUT_S)
    fail(breaker, 1)
    assert breaker.state == "open"


def test_reconfigure_changes_an_open_breakers_timeout(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    """A shorter timeout applies to a breaker that is already open."""
    fail(breaker, THRESHOLD)
    breaker.reconfigure(failure_threshold=THRESHOLD, reset_timeout_s=5.0)
    clock.advance(5.0)
    assert breaker.state == "half_open"


def test_invalid_threshold_is_rejected(breaker: CircuitBreaker) -> None:
    """A threshold below one is refused."""
    with pytest.raises(ValueError, match="failure_threshold"):
        breaker.reconfigure(failure_threshold=0, reset_timeout_s=TIMEOUT_S)


def test_on_change_follows_a_full_cycle(
    breaker: CircuitBreaker, clock: FakeClock, changes: Changes
) -> None:
    """on_change hears open, half_open (when observed) and closed, in order."""
    open_then_wait(breaker, clock)
    breaker.acquire()
    breaker.record_success()
    assert [state for _, state in changes.seen] == ["open", "half_open", "closed"]


def test_on_change_is_silent_without_transition(breaker: CircuitBreaker, changes: Changes) -> None:
    """Failures below the threshold and a reset of a closed breaker report nothing."""
    fail(breaker, THRESHOLD - 1)
    breaker.reset()
    assert changes.seen == []


def test_on_change_names_the_key(breaker: CircuitBreaker, changes: Changes) -> None:
    """on_change is called with the breaker's key."""
    fail(breaker, THRESHOLD)
    assert changes.seen == [(breaker.key, "open")]


# --- registry ---------------------------------------------------------------------


@pytest.fixture
def registry(clock: FakeClock, changes: Changes) -> BreakerRegistry:
    """A registry of at most 3 breakers with threshold 3 and a 30 s timeout."""
    config = BreakerConfig(failure_threshold=THRESHOLD, reset_timeout_ms=30_000)
    return BreakerRegistry(config, clock=clock, on_change=changes, max_keys=3)


def test_registry_creates_on_first_use(registry: BreakerRegistry) -> None:
    """get returns the same breaker for the same key."""
    assert registry.get("a") is registry.get("a")


def test_registry_applies_its_config(registry: BreakerRegistry) -> None:
    """New breakers take the threshold and the timeout (in seconds) from the config."""
    breaker = registry.get("a")
    assert (breaker.failure_threshold, breaker.reset_timeout_s) == (THRESHOLD, 30.0)


def test_registry_reconfigure_reaches_existing_breakers(registry: BreakerRegistry) -> None:
    """reconfigure updates breakers that already exist."""
    breaker = registry.get("a")
    registry.reconfigure(BreakerConfig(failure_threshold=9, reset_timeout_ms=1500))
    assert (breaker.failure_threshold, breaker.reset_timeout_s) == (9, 1.5)


def test_registry_reconfigure_reaches_future_breakers(registry: BreakerRegistry) -> None:
    """reconfigure also applies to breakers created afterwards."""
    registry.reconfigure(BreakerConfig(failure_threshold=9, reset_timeout_ms=1500))
    assert registry.get("b").failure_threshold == 9


def test_registry_reset_closes_a_known_breaker(registry: BreakerRegistry) -> None:
    """reset closes the breaker of a known key and says so."""
    fail(registry.get("a"), THRESHOLD)
    assert registry.reset("a")
    assert registry.get("a").state == "closed"


def test_registry_reset_of_unknown_key_is_false(registry: BreakerRegistry) -> None:
    """reset of a key never seen returns False."""
    assert not registry.reset("nope")


def test_registry_snapshot_lists_states(registry: BreakerRegistry) -> None:
    """snapshot maps each key to its state."""
    registry.get("a")
    fail(registry.get("b"), THRESHOLD)
    assert registry.snapshot() == {"a": "closed", "b": "open"}


def test_registry_passes_on_change(registry: BreakerRegistry, changes: Changes) -> None:
    """Breakers made by the registry report to its on_change."""
    fail(registry.get("a"), THRESHOLD)
    assert changes.seen == [("a", "open")]


def test_registry_stays_within_max_keys(registry: BreakerRegistry) -> None:
    """Idle closed breakers are dropped so no more than max_keys remain."""
    for index in range(50):
        registry.get(f"k{index}")
    assert len(registry) == 3


def test_registry_drops_least_recently_used_first(registry: BreakerRegistry) -> None:
    """The idle breaker used longest ago goes first."""
    for key in ("a", "b", "c"):
        registry.get(key)
    registry.get("a")
    registry.get("d")
    assert set(registry.snapshot()) == {"a", "c", "d"}


def test_registry_keeps_open_breakers(registry: BreakerRegistry) -> None:
    """Open breakers survive eviction even past max_keys."""
    for key in ("a", "b", "c", "d"):
        fail(registry.get(key), THRESHOLD)
    registry.get("e")
    assert set(registry.snapshot()) == {"a", "b", "c", "d", "e"}


def test_registry_keeps_half_open_breakers(registry: BreakerRegistry, clock: FakeClock) -> None:
    """Half-open breakers survive eviction."""
    open_then_wait(registry.get("a"), clock)
    for key in ("b", "c", "d", "e"):
        registry.get(key)
    assert registry.snapshot()["a"] == "half_open"


def test_registry_keeps_closed_breakers_with_failures(registry: BreakerRegistry) -> None:
    """A closed breaker that has counted failures is not dropped."""
    fail(registry.get("a"), 1)
    for key in ("b", "c", "d", "e"):
        registry.get(key)
    assert "a" in registry


def test_registry_reports_evictions(clock: FakeClock) -> None:
    """on_evict hears each dropped key."""
    dropped: list[str] = []
    registry = BreakerRegistry(BreakerConfig(), clock=clock, max_keys=1, on_evict=dropped.append)
    registry.get("a")
    registry.get("b")
    assert dropped == ["a"]
