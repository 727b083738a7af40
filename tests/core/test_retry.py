"""Tests for the retry schedule and its delay tiers."""

from __future__ import annotations

import itertools
import math
from datetime import UTC, datetime

import pytest

from formcraftd.core.config import RetryConfig
from formcraftd.core.retry import MAX_TIERS, RetrySchedule, parse_retry_after

DEFAULT_TIERS = (1000, 2000, 4000, 8000, 16000, 32000, 60000)


@pytest.fixture
def defaults() -> RetrySchedule:
    """The schedule of an empty ``[retry]`` section."""
    return RetrySchedule.from_config(RetryConfig())


def linear(initial: int, maximum: int, attempts: int = 3) -> RetrySchedule:
    return RetrySchedule(
        attempts=attempts, backoff="linear", initial_delay_ms=initial, max_delay_ms=maximum
    )


def exponential(initial: int, maximum: int, attempts: int = 3) -> RetrySchedule:
    return RetrySchedule(
        attempts=attempts, backoff="exponential", initial_delay_ms=initial, max_delay_ms=maximum
    )


def test_from_config_copies_every_setting() -> None:
    """from_config takes attempts, backoff and both delays from the section."""
    config = RetryConfig(attempts=7, backoff="linear", initial_delay_ms=250, max_delay_ms=900)
    assert RetrySchedule.from_config(config) == linear(250, 900, attempts=7)


def test_default_delays_double(defaults: RetrySchedule) -> None:
    """The default schedule waits 1 s, 2 s, 4 s before the first three retries."""
    assert [defaults.delay_ms(retry) for retry in (1, 2, 3)] == [1000, 2000, 4000]


def test_default_tiers_run_to_the_cap(defaults: RetrySchedule) -> None:
    """The default tiers are 1000 .. 32000 doubling, then 60000."""
    assert defaults.tiers() == DEFAULT_TIERS


def test_tiers_do_not_depend_on_attempts() -> None:
    """One try or fifty, the tiers cover the whole curve."""
    assert exponential(1000, 60000, attempts=1).tiers() == DEFAULT_TIERS
    assert exponential(1000, 60000, attempts=50).tiers() == DEFAULT_TIERS


def test_exponential_delay_is_capped_at_max() -> None:
    """A doubling that would pass max_delay_ms waits max_delay_ms instead."""
    schedule = exponential(1000, 60000)
    assert [schedule.delay_ms(retry) for retry in (6, 7, 8)] == [32000, 60000, 60000]


def test_huge_retry_number_is_capped_cheaply() -> None:
    """A retry number far past the cap still answers max_delay_ms."""
    assert exponential(1000, 60000).delay_ms(10**9) == 60000


def test_linear_delays_grow_by_initial() -> None:
    """A linear schedule waits initial, 2 * initial, 3 * initial, ..."""
    schedule = linear(500, 5000)
    assert [schedule.delay_ms(retry) for retry in (1, 2, 3)] == [500, 1000, 1500]


def test_linear_delay_is_capped_at_max() -> None:
    """A linear step past max_delay_ms waits max_delay_ms."""
    assert linear(1000, 2500).delay_ms(3) == 2500


def test_linear_tiers_end_with_the_cap() -> None:
    """Linear tiers are the multiples of initial below max, then max."""
    assert linear(1000, 3500).tiers() == (1000, 2000, 3000, 3500)


def test_linear_tiers_do_not_repeat_an_exact_cap() -> None:
    """A cap that is a multiple of initial appears once."""
    assert linear(1000, 3000).tiers() == (1000, 2000, 3000)


def test_equal_initial_and_max_give_one_tier() -> None:
    """When initial equals max there is a single tier."""
    assert exponential(5000, 5000).tiers() == (5000,)


def test_retry_zero_is_rejected(defaults: RetrySchedule) -> None:
    """delay_ms counts retries from 1."""
    with pytest.raises(ValueError, match="retry"):
        defaults.delay_ms(0)


def test_tries_left_counts_the_first_try(defaults: RetrySchedule) -> None:
    """With three attempts, a job tried twice may go again and one tried three times not."""
    assert defaults.tries_left(2)
    assert not defaults.tries_left(3)


def test_max_below_initial_is_rejected() -> None:
    """A schedule whose cap is below its first delay is invalid."""
    with pytest.raises(ValueError, match="max_delay_ms"):
        exponential(2000, 1000)


def test_zero_attempts_is_rejected() -> None:
    """A schedule needs at least the first try."""
    with pytest.raises(ValueError, match="attempts"):
        exponential(1000, 2000, attempts=0)


def test_pathological_linear_tiers_are_capped() -> None:
    """Linear from 1 ms to 60 s keeps 64 tiers, not 60000."""
    assert len(linear(1, 60000).tiers()) == MAX_TIERS


def test_capped_tiers_keep_initial_and_max() -> None:
    """Thinned-out tiers still start at initial and end at max."""
    tiers = linear(1, 60000).tiers()
    assert (tiers[0], tiers[-1]) == (1, 60000)


def test_capped_tiers_are_ascending_and_unique() -> None:
    """Thinned-out tiers are strictly ascending."""
    tiers = linear(1, 60000).tiers()
    assert all(low < high for low, high in itertools.pairwise(tiers))


def test_capped_tiers_are_deterministic() -> None:
    """Two equal schedules thin out to the same tiers."""
    assert linear(7, 1_000_003).tiers() == linear(7, 1_000_003).tiers()


def test_capped_tiers_stay_on_the_curve() -> None:
    """Every thinned-out tier below the cap is a multiple of initial."""
    tiers = linear(7, 1_000_003).tiers()
    assert all(tier % 7 == 0 for tier in tiers[:-1])


def test_capped_tiers_handle_an_enormous_curve() -> None:
    """A linear curve of 2**64 points is thinned without enumerating it."""
    tiers = linear(1, 2**64).tiers()
    assert (len(tiers), tiers[0], tiers[-1]) == (MAX_TIERS, 1, 2**64)


def test_capped_tiers_keep_the_schedules_own_delays() -> None:
    """Thinning keeps every delay the schedule's retries use, so they follow the formula."""
    schedule = linear(500, 60000, attempts=5)
    assert [schedule.delay_ms(retry) for retry in (1, 2, 3, 4)] == [500, 1000, 1500, 2000]
    assert {500, 1000, 1500, 2000} <= set(schedule.tiers())


def test_capped_tiers_keep_at_most_32_own_delays() -> None:
    """With many attempts, only the first 32 retry delays are kept exactly."""
    tiers = linear(1, 60000, attempts=1000).tiers()
    assert (len(tiers), tiers[:33]) == (MAX_TIERS, (*range(1, 33), tiers[32]))
    assert tiers[32] > 33


def test_delay_between_capped_tiers_rounds_up_to_a_tier() -> None:
    """A retry delay that thinning left out waits for the next tier up."""
    schedule = linear(1, 60000, attempts=1000)
    delay = schedule.delay_ms(40)
    assert delay in schedule.tiers()
    assert delay > 40


def test_every_delay_is_a_tier(defaults: RetrySchedule) -> None:
    """Each retry delay has a wait queue."""
    assert all(defaults.delay_ms(retry) in DEFAULT_TIERS for retry in range(1, 20))


@pytest.mark.parametrize(
    ("delay", "tier"),
    [
        (-5, 1000),
        (0, 1000),
        (1000, 1000),
        (1000.5, 2000),
        (4000, 4000),
        (32001, 60000),
        (60000, 60000),
        (90000, 60000),
        (math.inf, 60000),
    ],
)
def test_tier_at_least(defaults: RetrySchedule, delay: float, tier: int) -> None:
    """tier_at_least gives the smallest tier covering the delay, else the largest."""
    assert defaults.tier_at_least(delay) == tier


@pytest.mark.parametrize(
    ("delay", "tier"),
    [
        (-5, 1000),
        (0, 1000),
        (1499, 1000),
        (1500, 2000),
        (2000, 2000),
        (45999, 32000),
        (46000, 60000),
        (10**9, 60000),
    ],
)
def test_nearest_tier(defaults: RetrySchedule, delay: float, tier: int) -> None:
    """nearest_tier picks the closest tier, the larger one on a tie."""
    assert defaults.nearest_tier(delay) == tier


def test_nan_delay_is_rejected(defaults: RetrySchedule) -> None:
    """A NaN delay is a caller bug, not a tier."""
    with pytest.raises(ValueError, match="NaN"):
        defaults.nearest_tier(math.nan)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("7", 7.0),
        ("0", 0.0),
        ("-5", 0.0),
        (" 12 ", 12.0),
        ("soon", None),
        ("", None),
        (None, None),
        ("1.5", None),
    ],
)
def test_parse_retry_after_seconds(value: str | None, expected: float | None) -> None:
    """Delta-seconds are parsed, negatives clamped to 0 and garbage ignored."""
    assert parse_retry_after(value) == expected


def test_parse_retry_after_http_date() -> None:
    """An HTTP date gives the seconds until it; a past date gives 0."""
    now = datetime(2024, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("Mon, 01 Jan 2024 12:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Mon, 01 Jan 2024 11:00:00 GMT", now=now) == 0.0
