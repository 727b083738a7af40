"""What each consumer counts: jobs by outcome and their durations, as plain numbers.

The consumer updates these once per job, on the event loop's thread (the only
writer), so plain numbers suffice; :mod:`formcraftd.ops.metrics` exports them
when `/metrics` is scraped, and the monitor derives its rates from them.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""The upper bounds (seconds) of the job-duration histogram's buckets."""


class JobDurations:
    """A histogram of job durations over :data:`DURATION_BUCKETS`."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        # Bucket `le` bounds are inclusive: the first bound >= seconds.
        self.counts[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        """(`le`, count) pairs as Prometheus wants them: each bucket holds those below it."""
        bounds = [str(float(bound)) for bound in DURATION_BUCKETS] + ["+Inf"]
        total, buckets = 0, []
        for bound, count in zip(bounds, self.counts, strict=True):
            total += count
            buckets.append((bound, float(total)))
        return buckets


@dataclass(slots=True)
class QueueStats:
    """One queue's job counts since the process started."""

    success: int = 0
    retry: int = 0
    dead_letter: int = 0
    delayed: int = 0  # delayed by an open breaker, without using a try
    duplicates: int = 0  # redeliveries of settled jobs, acked without running again
    durations: JobDurations = field(default_factory=JobDurations)
    errors: dict[str, int] = field(default_factory=dict)  # failed attempts by error code

    def count_error(self, code: str) -> None:
        """One more attempt that failed with `code` (retried, delayed or dead-lettered)."""
        self.errors[code] = self.errors.get(code, 0) + 1

    @property
    def finished(self) -> int:
        """Jobs that succeeded, were retried or were dead-lettered."""
        return self.success + self.retry + self.dead_letter

    @property
    def failed(self) -> int:
        """Jobs that were retried or dead-lettered."""
        return self.retry + self.dead_letter
