"""A bounded memory of deliveries this process has already settled.

RabbitMQ redelivers a message whose ack never reached it (the connection
dropped between our outcome and our ack). If this process already settled that
delivery — the webhook was sent, the retry or dead letter published — doing it
again would send the webhook twice. The memory is keyed by (job id, tries
before this delivery), so a later retry of the same job is not mistaken for a
duplicate; it is consulted only for messages RabbitMQ flags as redelivered, and
it is bounded both in size and in age. Across processes (another daemon gets
the redelivery, or this one restarted) delivery stays at least once.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class SettledDeliveries:
    """(job id, tries before) pairs settled in the last `window_s` seconds, at most `size`."""

    def __init__(
        self, *, window_s: float, size: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._window_s = window_s
        self._size = size
        self._clock = clock
        self._entries: OrderedDict[tuple[str, int], float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def reconfigure(self, *, window_s: float, size: int) -> None:
        self._window_s = window_s
        self._size = size
        self._trim(self._clock())

    def add(self, job_id: str, tries_before: int) -> None:
        if self._size == 0:
            return
        now = self._clock()
        key = (job_id, tries_before)
        self._entries[key] = now
        self._entries.move_to_end(key)
        self._trim(now)

    def __contains__(self, key: tuple[str, int]) -> bool:
        settled_at = self._entries.get(key)
        if settled_at is None:
            return False
        if self._clock() - settled_at > self._window_s:
            del self._entries[key]
            return False
        return True

    def _trim(self, now: float) -> None:
        entries = self._entries
        while entries and (
            len(entries) > self._size or now - next(iter(entries.values())) > self._window_s
        ):
            entries.popitem(last=False)
