"""One attempt of a job, how it ended, and who is told about it.

The consumer decides a job's fate and describes each attempt as an
:class:`Attempt`; an :class:`AttemptReporter` (the daemon gives the consumer
:class:`formcraftd.ops.reporting.AttemptLog`) writes it where operators and form
owners look: the job log line, the delivery event, error tracking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from formcraftd.core import events
from formcraftd.core.config import WorkerKind
from formcraftd.core.errors import JobFailure, PermanentFailure
from formcraftd.core.events import DeliveryEvent, EventOutcome
from formcraftd.core.handler import Delivered, JobContext
from formcraftd.core.jobs import Job

JobOutcome = Literal["success", "retry", "dead_letter", "delayed"]

EVENT_OUTCOMES: dict[JobOutcome, EventOutcome] = {
    "success": "succeeded",
    "retry": "retrying",
    "dead_letter": "dead_lettered",
    "delayed": "delayed",
}


@dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt of one job and how it ended."""

    kind: WorkerKind
    queue: str
    ctx: JobContext
    job: Job | None  # None when the body was not a valid job
    outcome: JobOutcome
    failure: Exception | None = None  # the failure that decided the outcome
    delivered: Delivered | None = None
    duration: float = 0.0

    @property
    def form_id(self) -> str | None:
        return self.job.metadata.form_id if self.job is not None else None

    @property
    def submission_id(self) -> str | None:
        return self.job.metadata.submission_id if self.job is not None else None


class AttemptReporter(Protocol):
    """Where the consumer reports attempts; reporting never raises or changes a fate."""

    def attempt(self, attempt: Attempt) -> None:
        """Every attempt, once its outcome is settled."""
        ...

    def dead_lettered(self, attempt: Attempt, failure: PermanentFailure, tries: int) -> None:
        """A job that was dead-lettered (error tracking groups these)."""
        ...

    def unexpected(self, exc: BaseException, *, queue: str, job_id: str) -> None:
        """An exception a handler was not meant to raise."""
        ...


def delivery_event(attempt: Attempt) -> DeliveryEvent:
    """The attempt as a delivery event for the app (never a secret)."""
    failure = attempt.failure
    delivered = attempt.delivered
    if delivered is not None:
        status, snippet = delivered.status, delivered.snippet
    else:
        status = getattr(failure, "status", None)
        snippet = getattr(failure, "snippet", None)
    if failure is None:
        error_code = error = None
    else:
        error_code = failure.code if isinstance(failure, JobFailure) else "INTERNAL_ERROR"
        error = events.snippet(str(failure))
    ctx = attempt.ctx
    return DeliveryEvent(
        kind=attempt.kind,
        outcome=EVENT_OUTCOMES[attempt.outcome],
        job_id=ctx.job_id,
        queue=attempt.queue,
        form_id=attempt.form_id,
        submission_id=attempt.submission_id,
        attempt=ctx.attempt,
        status_code=status,
        duration_ms=round(attempt.duration * 1000, 1),
        error_code=error_code,
        error=error,
        response_snippet=events.snippet(snippet),
        at=events.now(),
    )
