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

_Key = tuple[str, int]


class SettledDeliveries:
    """(job id, tries before) pairs settled in the last `window_s` seconds, at most `size`.

    `size` 0 turns the memory off. Past `size` entries the oldest settled go first.
    Entries are kept oldest first, so forgetting the expired ones only ever looks
    at the front. (cachetools' TTLCache did this at three times the cost per
    job: see BENCHMARKS.md.)
    """

    def __init__(
        self, *, window_s: float, size: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        self._window_s = window_s
        self._size = size
        self._entries: OrderedDict[_Key, float] = OrderedDict()  # key -> when settled

    def __len__(self) -> int:
        self._expire(self._clock())
        return len(self._entries)

    def reconfigure(self, *, window_s: float, size: int) -> None:
        """Apply a new window and size; entries still inside the new window are kept.

        A smaller size keeps the most recently settled entries.
        """
        self._window_s, self._size = window_s, size
        self._expire(self._clock())
        while len(self._entries) > size:
            self._entries.popitem(last=False)

    def add(self, job_id: str, tries_before: int) -> None:
        """Remember that this delivery of the job was settled."""
        if not self._size:
            return
        now = self._clock()
        entries = self._entries
        key = (job_id, tries_before)
        if key in entries:
            entries.move_to_end(key)  # settled again: its window starts over
        entries[key] = now
        if len(entries) > self._size:
            entries.popitem(last=False)
        self._expire(now)

    def __contains__(self, key: _Key) -> bool:
        settled_at = self._entries.get(key)
        return settled_at is not None and self._clock() < settled_at + self._window_s

    def _expire(self, now: float) -> None:
        """Forget the entries whose window has ended (the oldest are at the front)."""
        entries, oldest_kept = self._entries, now - self._window_s
        while entries and next(iter(entries.values())) <= oldest_kept:
            entries.popitem(last=False)
