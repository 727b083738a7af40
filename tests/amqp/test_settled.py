"""The bounded memory of settled deliveries."""

from __future__ import annotations

from formcraftd.amqp.settled import SettledDeliveries


class Clock:
    """A clock that stands still until a test moves it."""

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


def test_an_entry_is_remembered_until_its_window_ends() -> None:
    """An entry is still found just before window_s has passed."""
    clock = Clock()
    memory = SettledDeliveries(window_s=60, size=10, clock=clock)
    memory.add("job", 0)
    clock.now = 59.9
    assert ("job", 0) in memory


def test_adding_again_restarts_the_window() -> None:
    """A delivery settled again is remembered for a full window from the second time."""
    clock = Clock()
    memory = SettledDeliveries(window_s=60, size=10, clock=clock)
    memory.add("job", 0)
    clock.now = 50
    memory.add("job", 0)
    clock.now = 100
    assert ("job", 0) in memory
    clock.now = 111
    assert ("job", 0) not in memory


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


def test_expired_entries_make_room_before_a_live_one_is_dropped() -> None:
    """A full memory whose oldest entry has expired drops only that one for a new entry."""
    clock = Clock()
    memory = SettledDeliveries(window_s=60, size=2, clock=clock)
    memory.add("old", 0)
    clock.now = 30
    memory.add("live", 0)
    clock.now = 70
    memory.add("new", 0)
    assert ("live", 0) in memory and ("new", 0) in memory
    assert len(memory) == 2


def test_size_bound_holds_over_many_deliveries() -> None:
    """Ten thousand deliveries into a memory of 100 leave the last 100."""
    memory = SettledDeliveries(window_s=60, size=100, clock=Clock())
    for i in range(10_000):
        memory.add(f"job{i}", 0)
    assert len(memory) == 100
    assert all((f"job{i}", 0) in memory for i in range(9_900, 10_000))
    assert ("job9899", 0) not in memory


def test_reconfigure_shrinking_keeps_the_newest() -> None:
    """A smaller size after a reload keeps the most recently settled entries."""
    clock = Clock()
    memory = SettledDeliveries(window_s=60, size=10, clock=clock)
    for i in range(5):
        clock.now = i
        memory.add(f"job{i}", 0)
    memory.reconfigure(window_s=60, size=2)
    assert [i for i in range(5) if (f"job{i}", 0) in memory] == [3, 4]


def test_reconfigure_keeps_entries_inside_the_new_window() -> None:
    """A longer window after a reload keeps every entry and remembers it longer."""
    clock = Clock()
    memory = SettledDeliveries(window_s=60, size=10, clock=clock)
    memory.add("job", 0)
    clock.now = 30
    memory.reconfigure(window_s=120, size=10)
    clock.now = 100
    assert ("job", 0) in memory


def test_reconfigure_forgets_entries_older_than_the_new_window() -> None:
    """A shorter window after a reload forgets at once what is older than it."""
    clock = Clock()
    memory = SettledDeliveries(window_s=60, size=10, clock=clock)
    memory.add("older", 0)
    clock.now = 50
    memory.add("newer", 0)
    clock.now = 55
    memory.reconfigure(window_s=10, size=10)
    assert ("older", 0) not in memory and ("newer", 0) in memory
    assert len(memory) == 1


def test_reconfigure_with_the_same_settings_changes_nothing() -> None:
    """A reload that leaves window and size alone does not extend any entry's window."""
    clock = Clock()
    memory = SettledDeliveries(window_s=60, size=10, clock=clock)
    memory.add("job", 0)
    clock.now = 30
    memory.reconfigure(window_s=60, size=10)
    clock.now = 61
    assert ("job", 0) not in memory


def test_reconfigure_to_size_zero_forgets_everything() -> None:
    """Turning the memory off in a reload forgets what it held and remembers nothing new."""
    memory = SettledDeliveries(window_s=60, size=10, clock=Clock())
    memory.add("job", 0)
    memory.reconfigure(window_s=60, size=0)
    memory.add("later", 0)
    assert len(memory) == 0 and ("job", 0) not in memory and ("later", 0) not in memory


def test_reconfigure_from_size_zero_starts_remembering() -> None:
    """Turning the memory on in a reload remembers deliveries settled afterwards."""
    memory = SettledDeliveries(window_s=60, size=0, clock=Clock())
    memory.reconfigure(window_s=60, size=10)
    memory.add("job", 0)
    assert ("job", 0) in memory
