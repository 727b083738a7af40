"""How formcraftd writes values as text: one-line reasons and RFC 3339 timestamps."""

from __future__ import annotations

import time

REASON_CHARS = 300
"""The usual cut of a reason, an error text or a response snippet."""


def one_line(value: object, limit: int = REASON_CHARS) -> str:
    """`value` as text on one line (whitespace runs become one space), cut to `limit` chars."""
    return " ".join(str(value).split())[:limit]


# ".000" to ".999", looked up rather than formatted for every line and event.
_MILLIS = tuple(f".{n:03d}" for n in range(1000))
# The last second formatted and its text, as one tuple so that threads never
# read the text of one second paired with another.
_last_second: tuple[int, str] = (-1, "")


def utc_timestamp(instant: float, zone: str = "Z") -> str:
    """`instant` (seconds since the epoch) in RFC 3339, UTC, with milliseconds.

    E.g. ``2024-05-01T12:00:00.123Z``; `zone` is written as is at the end ("Z",
    or "+00:00" as ``datetime.isoformat`` writes it). The date and time of day
    are formatted once per second: every log line and event carries one.
    """
    global _last_second  # noqa: PLW0603 - a one-entry cache shared by every caller
    second = int(instant)
    cached, text = _last_second
    if cached != second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _last_second = (second, text)
    return text + _MILLIS[int((instant - second) * 1000)] + zone


def utc_now() -> str:
    """Now, as :func:`utc_timestamp` writes it with a "+00:00" zone."""
    return utc_timestamp(time.time(), "+00:00")
