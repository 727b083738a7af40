"""The bounded memory of settled deliveries."""

from __future__ import annotations

from formcraftd.amqp.settled import SettledDeliveries


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_settled_delivery_is_remembered() -> None:
    """A delivery added is found by (job id, tries before)."""
    memory = SettledDeliveries(window_s=60, size=10, clock=Clock())
    memory.add("job", 0)
    assert ("job", 0) in memory
    assert ("job", 1) not in memory
    assert ("other", 0) not in memory


def test_entries_expire_after_the_window() -> None:
    """An entry older than window_s is forgotten."""
    clock = Clock()
    memory = SettledDeliveries(window_s=60, size=10, clock=clock)
    memory.add("job", 0)
    clock.now = 61
    assert ("job", 0) not in memory
    assert len(memory) == 0


def test_size_is_bounded_oldest_first() -> None:
    """Past `size` entries the oldest go first."""
    clock = Clock()
    memory = SettledDeliveries(window_s=60, size=3, clock=clock)
    for i in range(5):
        clock.now = i
        memory.add(f"job{i}", 0)
    assert len(memory) == 3
    assert ("job0", 0) not in memory
    assert ("job4", 0) in memory


def test_size_zero_turns_the_memory_off() -> None:
    """settled_memory_size = 0 remembers nothing."""
    memory = SettledDeliveries(window_s=60, size=0, clock=Clock())
    memory.add("job", 0)
    assert ("job", 0) not in memory


def test_reconfigure_shrinks_at_once() -> None:
    """A smaller size after a reload trims the memory immediately."""
    memory = SettledDeliveries(window_s=60, size=10, clock=Clock())
    for i in range(10):
        memory.add(f"job{i}", 0)
    memory.reconfigure(window_s=60, size=2)
    assert len(memory) == 2
