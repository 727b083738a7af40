"""Settings chosen by destination host: an exact entry, else the longest `*.domain` pattern.

Config sections that apply per destination (`[[workers.webhook.tls]]`, the
`hosts` of `[workers.webhook.rate_limit]`) name a host, optionally with
`:port`, or a `*.example.com` pattern for every name under example.com. The
most specific entry wins: host and port, then host, then the longest pattern.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, TypeVar

__all__ = ["HostTable"]

T = TypeVar("T")
D = TypeVar("D")


class HostTable(Generic[T]):
    """The value of each configured host or `*.domain` pattern."""

    __slots__ = ("_exact", "_patterns")

    def __init__(self, entries: Iterable[tuple[str, T]] = ()) -> None:
        exact: dict[str, T] = {}
        patterns: list[tuple[str, T]] = []
        for host, value in entries:
            if host.startswith("*."):
                patterns.append((host[1:], value))  # ".example.com"
            else:
                exact[host] = value
        patterns.sort(key=lambda item: len(item[0]), reverse=True)  # the longest first
        self._exact = exact
        self._patterns = tuple(patterns)

    def __bool__(self) -> bool:
        return bool(self._exact or self._patterns)

    def lookup(self, host: str, default: D, port: int | str | None = None) -> T | D:
        """The value of the most specific entry for `host` (and `port`), else `default`."""
        exact = self._exact
        if port is not None and (with_port := f"{host}:{port}") in exact:
            return exact[with_port]
        if host in exact:
            return exact[host]
        for suffix, value in self._patterns:
            if host.endswith(suffix):
                return value
        return default
