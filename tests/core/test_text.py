"""Text helpers: one-line reasons and RFC 3339 timestamps."""

from __future__ import annotations

import time

import pytest

from formcraftd.core.text import one_line, utc_timestamp


@pytest.mark.parametrize("second", [0, 59, 86_399, 951_782_400, 1_700_000_000, 4_102_444_799])
@pytest.mark.parametrize("millis", [0, 7, 999])
def test_timestamp_is_rfc3339_utc_with_milliseconds(second: int, millis: int) -> None:
    """utc_timestamp() writes what strftime and the millisecond digits write, cache or not."""
    instant = second + (millis + 0.5) / 1000
    expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)) + f".{millis:03d}Z"
    assert utc_timestamp(instant) == expected
    assert utc_timestamp(instant + 1) != expected
    assert utc_timestamp(instant) == expected


def test_one_line_joins_lines_and_cuts() -> None:
    """Whitespace runs, line breaks included, become one space; the text is cut to the limit."""
    assert one_line("a\r\n  b\tc ") == "a b c"
    assert one_line("x" * 500) == "x" * 300
    assert one_line(ValueError("bad\nthing"), 5) == "bad t"
