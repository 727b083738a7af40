"""How one attempt of a job is reported: the job log line, the delivery event, error tracking.

The consumer decides what happens to a job; this module only describes it, in
the three places operators and form owners look. Reasons are redacted and cut
to one line everywhere.

Both the log line and the delivery event are written for every attempt of every
job, so both take shortcuts that change nothing in what they say: the line goes
through :func:`formcraftd.logs.write_direct` when it can, and the event's time
comes from the per-second cache of :func:`formcraftd.events.now`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

from formcraftd import events, logs, tracking
from formcraftd.config import WorkerKind
from formcraftd.errors import BreakerOpen, PermanentFailure, RetryLater
from formcraftd.events import DeliveryEvent
from formcraftd.jobs import Delivered, Job, JobContext
from formcraftd.outcomes import one_line

log = logging.getLogger("formcraftd.consumer")

# The job line: job id, outcome, then ": <reason>" when there is one.
_JOB_LINE = "job %s %s%s"

Outcome = Literal["success", "retry", "dead_letter", "delayed"]

EVENT_OUTCOMES: dict[Outcome, events.Outcome] = {
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
    outcome: Outcome
    failure: Exception | None = None  # the failure that decided the outcome
    delivered: Delivered | None = None
    duration: float = 0.0

    @property
    def form_id(self) -> str | None:
        return self.job.metadata.form_id if self.job is not None else None

    @property
    def submission_id(self) -> str | None:
        return self.job.metadata.submission_id if self.job is not None else None


def log_attempt(attempt: Attempt) -> None:
    """One dense log line: INFO for success/retry/delay, WARNING for a dead letter."""
    level = logging.WARNING if attempt.outcome == "dead_letter" else logging.INFO
    if not log.isEnabledFor(level):
        return
    ctx = attempt.ctx
    fields: dict[str, Any] = {
        "queue": attempt.queue,
        "job_id": ctx.job_id,
        "attempt": ctx.attempt,
        "outcome": attempt.outcome,
        "duration_ms": round(attempt.duration * 1000, 1),
    }
    job = attempt.job
    if job is not None:
        fields["form_id"] = job.metadata.form_id
        fields["submission_id"] = job.metadata.submission_id
    failure = attempt.failure
    reason = ""
    if failure is not None:  # most attempts succeed: skip the type tests
        if isinstance(failure, PermanentFailure):
            fields["error_code"] = failure.code
            reason = failure.reason
        elif isinstance(failure, RetryLater | BreakerOpen):
            reason = str(failure)
        status = getattr(failure, "status", None)
        if status is not None:
            fields["status"] = status
    args = (ctx.job_id, attempt.outcome, f": {one_line(reason)}" if reason else "")
    if not logs.write_direct(log, level, _JOB_LINE % args, fields):
        log.log(level, _JOB_LINE, *args, extra=fields)


def delivery_event(attempt: Attempt) -> DeliveryEvent:
    """The attempt as a delivery event for the app (never a secret)."""
    failure = attempt.failure
    delivered = attempt.delivered
    if delivered is not None:
        status, snippet = delivered.status, delivered.snippet
    else:
        status = getattr(failure, "status", None)
        snippet = getattr(failure, "snippet", None)
    job = attempt.job
    if failure is None:  # most attempts succeed: no error to describe
        error_code = error = None
    else:
        error_code = failure.code if isinstance(failure, PermanentFailure) else None
        error = events.snippet(str(failure))
    ctx = attempt.ctx
    return DeliveryEvent(
        kind=attempt.kind,
        outcome=EVENT_OUTCOMES[attempt.outcome],
        job_id=ctx.job_id,
        queue=attempt.queue,
        form_id=job.metadata.form_id if job is not None else None,
        submission_id=job.metadata.submission_id if job is not None else None,
        attempt=ctx.attempt,
        status_code=status,
        duration_ms=round(attempt.duration * 1000, 1),
        error_code=error_code,
        error=error,
        # events.snippet makes None of None and of "" alike: no call for those.
        response_snippet=events.snippet(snippet) if snippet else None,
        at=events.now(),
    )


def report_dead_letter(attempt: Attempt, failure: PermanentFailure, tries: int) -> None:
    """Tell error tracking (when configured) that a job was dead-lettered."""
    tracking.dead_lettered(
        queue=attempt.queue,
        job_id=attempt.ctx.job_id,
        form_id=attempt.form_id,
        submission_id=attempt.submission_id,
        code=failure.code,
        reason=failure.reason,
        attempts=tries,
    )
