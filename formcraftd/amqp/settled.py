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
from collections.abc import Callable

from cachetools import TTLCache

_Key = tuple[str, int]


class SettledDeliveries:
    """(job id, tries before) pairs settled in the last `window_s` seconds, at most `size`.

    `size` 0 turns the memory off. Past `size` entries the oldest settled go first.
    """

    def __init__(
        self, *, window_s: float, size: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        # The value is when the delivery was settled, which a rebuild needs.
        self._entries: TTLCache[_Key, float] = TTLCache(size, window_s, timer=clock)

    def __len__(self) -> int:
        return len(self._entries)

    def reconfigure(self, *, window_s: float, size: int) -> None:
        """Apply a new window and size; entries still inside the new window are kept.

        A kept entry's window restarts with the rebuild (a cache's entries all
        share one time-to-live), so it is forgotten within twice the window.
        """
        old = self._entries
        if old.ttl == window_s and old.maxsize == size:
            return
        now = self._clock()
        # Oldest first, so a smaller size keeps the newest.
        kept = sorted(
            (settled_at, key) for key, settled_at in old.items() if now < settled_at + window_s
        )
        self._entries = TTLCache(size, window_s, timer=self._clock)
        if size:
            for settled_at, key in kept:
                self._entries[key] = settled_at

    def add(self, job_id: str, tries_before: int) -> None:
        """Remember that this delivery of the job was settled."""
        if self._entries.maxsize:
            self._entries[job_id, tries_before] = self._clock()

    def __contains__(self, key: _Key) -> bool:
        return key in self._entries
