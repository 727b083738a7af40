"""The attempt reporter the daemon gives its consumers: job log line, delivery event, Sentry.

Reasons are redacted (by the log formatter, the event snippet and the Sentry
hook) and cut to one line everywhere.
"""

from __future__ import annotations

import logging
from typing import Any

from formcraftd.core.attempts import Attempt, delivery_event
from formcraftd.core.errors import Delayed, JobFailure, PermanentFailure, RetryLater
from formcraftd.core.events import Emit
from formcraftd.core.text import one_line
from formcraftd.ops import tracking

log = logging.getLogger("formcraftd.consumer")


class AttemptLog:
    """Writes each attempt as one job log line and, with events on, one delivery event."""

    def __init__(self, emit: Emit | None = None) -> None:
        self._emit = emit

    def attempt(self, attempt: Attempt) -> None:
        log_attempt(attempt)
        if self._emit is not None:
            self._emit(delivery_event(attempt))

    def dead_lettered(self, attempt: Attempt, failure: PermanentFailure, tries: int) -> None:
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

    def unexpected(self, exc: BaseException, *, queue: str, job_id: str) -> None:
        tracking.unexpected(exc, queue=queue, job_id=job_id)


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
    if failure is not None:
        if isinstance(failure, PermanentFailure):
            reason = failure.reason
        elif isinstance(failure, RetryLater | Delayed):
            reason = str(failure)
        if isinstance(failure, JobFailure):
            fields["error_code"] = failure.code
        status = getattr(failure, "status", None)
        if status is not None:
            fields["status"] = status
    suffix = f": {one_line(reason, 500)}" if reason else ""
    # Logger.log() would first look up the caller's frame for the record
    # (findCaller), which costs more in the running daemon than all the rest of
    # the line; the record names this function instead. handle() applies the
    # logger's filters and calls every handler, as log() does.
    record = log.makeRecord(
        log.name,
        level,
        __file__,
        _LINE,
        "job %s %s%s",
        (ctx.job_id, attempt.outcome, suffix),
        None,
        func="log_attempt",
        extra=fields,
    )
    log.handle(record)


_LINE = log_attempt.__code__.co_firstlineno
