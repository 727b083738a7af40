"""Error tracking: dead letters and unexpected handler errors, reported to Sentry.

Sentry is the optional extra ``formcraftd[sentry]``; :func:`start` (called by
:func:`formcraftd.ops.logs.configure` when ``logging.sentry_dsn`` is set) starts
it with a ``before_send`` hook that runs
:func:`~formcraftd.core.redaction.redact` over every string of every event,
after the SDK has serialised it and after its own key-based scrubber. Until
then (or without the extra) each report here is a cheap no-op, and a report
never raises: error tracking must not change a job's fate.

Dead letters are grouped by queue and error code (one Sentry issue per pair,
not one per reason text); the job's context travels as tags (searchable) and
extras. ERROR log lines still reach Sentry through its logging integration;
:func:`unexpected` should be called *before* such a line is logged for the same
exception, so that the SDK's deduplication keeps the report with the job's tags.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from formcraftd import __version__
from formcraftd.core.redaction import redact
from formcraftd.core.text import one_line

try:
    import sentry_sdk

    HAVE_SENTRY = True
except ImportError:  # the optional extra is not installed: every report is a no-op
    HAVE_SENTRY = False

log = logging.getLogger("formcraftd.tracking")

_started_dsn = ""
_missing_warned = False

_MAX_TAG = 200  # Sentry's limit for a tag value
_MAX_REASON = 1000


def start(dsn: str) -> None:
    """Start Sentry once per DSN; without the extra installed, warn once and go on."""
    global _started_dsn, _missing_warned  # noqa: PLW0603 - one SDK per process
    try:
        sdk = importlib.import_module("sentry_sdk")
    except ImportError:
        if not _missing_warned:
            _missing_warned = True
            log.warning(
                "logging.sentry_dsn is set but sentry-sdk is not installed; "
                "install the formcraftd[sentry] extra to report errors"
            )
        return
    # A reload with the same DSN keeps the running client, unless it was closed.
    if dsn == _started_dsn and sdk.get_client().is_active():
        return
    sdk.init(**_options(dsn))
    _started_dsn = dsn


def forget_missing_warning() -> None:
    """Warn again about a missing extra on the next :func:`start` (for tests)."""
    global _missing_warned  # noqa: PLW0603 - see start()
    _missing_warned = False


def _options(dsn: str) -> dict[str, Any]:
    return {
        "dsn": dsn,
        "release": f"formcraftd@{__version__}",
        # send_default_pii stays unset (off): newer SDKs warn when it is passed at all.
        # Handler frames hold job bodies: webhook secrets, refresh tokens, addresses.
        "include_local_variables": False,
        "max_request_body_size": "never",
        # No auto-patched libraries (aiohttp's client would add sentry-trace and
        # baggage headers to customers' webhooks), and no trace headers anywhere.
        "auto_enabling_integrations": False,
        "trace_propagation_targets": [],
        "before_send": _before_send,
    }


def _scrub(value: Any) -> Any:
    """`value` (a Sentry event, nested) with :func:`redact` applied to every string."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: _scrub(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(item) for item in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    # The SDK serialises events before before_send; anything else is shown as text.
    return redact(repr(value))


def _before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
    scrubbed: dict[str, Any] = _scrub(event)
    return scrubbed


def enabled() -> bool:
    """True when a Sentry client is running (a DSN was configured and the SDK is there)."""
    return HAVE_SENTRY and sentry_sdk.get_client().is_active()


def _tag(value: str) -> str:
    return one_line(redact(value), _MAX_TAG)


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
    :func:`formcraftd.ops.logs.configure` with a DSN starts a new client.
    """
    if HAVE_SENTRY:
        sentry_sdk.get_client().close(timeout=timeout)
        sentry_sdk.get_global_scope().set_client(None)


__all__ = ["HAVE_SENTRY", "close", "dead_lettered", "enabled", "start", "unexpected"]
