"""Error tracking: dead letters and unexpected handler errors, reported to Sentry.

Sentry is the optional extra ``formcraftd[sentry]``; :func:`formcraftd.logs.configure`
starts it when ``logging.sentry_dsn`` is set, with a ``before_send`` hook that
runs :func:`~formcraftd.logs.redact` over every string of every event. Until
then (or without the extra) each report here is a cheap no-op, and a report
never raises: error tracking must not change a job's fate.

Dead letters are grouped by queue and error code (one Sentry issue per pair,
not one per reason text); the job's context travels as tags (searchable) and
extras. ERROR log lines still reach Sentry through its logging integration;
:func:`unexpected` should be called *before* such a line is logged for the same
exception, so that the SDK's deduplication keeps the report with the job's tags.
"""

from __future__ import annotations

import logging

from formcraftd.logs import redact

try:
    import sentry_sdk

    HAVE_SENTRY = True
except ImportError:  # the optional extra is not installed: every report is a no-op
    HAVE_SENTRY = False

log = logging.getLogger("formcraftd.tracking")

_MAX_TAG = 200  # Sentry's limit for a tag value
_MAX_REASON = 1000


def enabled() -> bool:
    """True when a Sentry client is running (a DSN was configured and the SDK is there)."""
    return HAVE_SENTRY and sentry_sdk.get_client().is_active()


def _tag(value: str) -> str:
    return " ".join(redact(value).split())[:_MAX_TAG]


def dead_lettered(
    *,
    queue: str,
    job_id: str,
    form_id: str | None,
    submission_id: str | None,
    code: str,
    reason: str,
    attempts: int,
) -> None:
    """Report a job that was dead-lettered, with its context; a no-op without Sentry."""
    if not enabled():
        return
    tags = {"queue": _tag(queue), "job_id": _tag(job_id), "error_code": _tag(code)}
    if form_id:
        tags["form_id"] = _tag(form_id)
    try:
        sentry_sdk.capture_message(
            f"job dead-lettered on {tags['queue']}: {tags['error_code']}",
            level="warning",
            tags=tags,
            extras={
                "reason": redact(reason)[:_MAX_REASON],
                "attempts": attempts,
                "submission_id": redact(submission_id) if submission_id else None,
            },
            fingerprint=["formcraftd.dead_letter", tags["queue"], tags["error_code"]],
        )
    except Exception as exc:  # reporting must never fail a job
        log.debug("reporting a dead letter to Sentry failed: %s", exc)


def unexpected(exc: BaseException, *, queue: str, job_id: str) -> None:
    """Report an exception a handler was not meant to raise; a no-op without Sentry."""
    if not enabled():
        return
    try:
        sentry_sdk.capture_exception(
            exc, level="error", tags={"queue": _tag(queue), "job_id": _tag(job_id)}
        )
    except Exception as error:  # reporting must never fail a job
        log.debug("reporting an exception to Sentry failed: %s", error)


def close(timeout: float = 2.0) -> None:
    """Send what is queued (waiting up to `timeout` s) and stop the Sentry client.

    Blocking: from the event loop, run it in a thread. The next
    :func:`formcraftd.logs.configure` with a DSN starts a new client.
    """
    if HAVE_SENTRY:
        sentry_sdk.get_client().close(timeout=timeout)
        sentry_sdk.get_global_scope().set_client(None)


__all__ = ["HAVE_SENTRY", "close", "dead_lettered", "enabled", "unexpected"]
