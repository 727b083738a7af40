"""The exception tree of formcraftd.

One root, :class:`FormcraftError`. Configuration and broker problems are plain
errors; the *job-fate* exceptions (:class:`PermanentFailure`, :class:`RetryLater`
and the :class:`Delayed` ones, :class:`BreakerOpen` and :class:`Throttled`) are
control flow that a handler (or the consumer) raises and the generic consumer
turns into a dead letter, a delayed retry or a delay without a try.
They carry the data that log lines, DLQ headers and metrics need.
"""

from __future__ import annotations

from typing import Literal

ErrorCode = Literal[
    "VALIDATION_ERROR",
    "RETRIES_EXHAUSTED",
    "HTTP_STATUS",
    "SSRF_BLOCKED",
    "TEMPLATE_ERROR",
    "ATTACHMENT_ERROR",
    "RECIPIENT_REJECTED",
    "SUPPRESSED",
    "AUTH_REVOKED",
    "SHEETS_REQUEST_REJECTED",
    "BREAKER_OPEN",
    "JOB_EXPIRED",
]
"""Why a job was dead-lettered (`x-formcraft-error-code`)."""

RetryCode = Literal[
    "TIMEOUT",
    "CONNECTION_ERROR",
    "DNS_ERROR",
    "TLS_ERROR",
    "HTTP_STATUS",
    "RATE_LIMITED",
    "PROXY_ERROR",
    "SMTP_TEMPORARY",
    "SMTP_CONNECTION",
    "RENDER_BUSY",
    "SHEETS_RATE_LIMITED",
    "SHEETS_UNAVAILABLE",
    "SHEETS_CONNECTION",
    "OAUTH_UNAVAILABLE",
    "OAUTH_CLIENT_REJECTED",
    "SHUTDOWN",
    "INTERNAL_ERROR",
]
"""Why a try failed but the job will be tried again."""

AttemptErrorCode = ErrorCode | RetryCode
"""The error code of an attempt that did not succeed (log line, event, counters)."""

ERROR_CODES: dict[str, str] = {
    # dead letters
    "VALIDATION_ERROR": "the message is not a valid job (or a field is refused); never retried",
    "RETRIES_EXHAUSTED": "every try failed; the last try's reason is in the error",
    "HTTP_STATUS": "the receiver answered with a status that is not 2xx (retried: 408, 425, 5xx)",
    "SSRF_BLOCKED": "the webhook URL resolves only to addresses the SSRF guard refuses "
    "(through the egress proxy: to any such address)",
    "TEMPLATE_ERROR": "the email template or subject cannot be rendered",
    "ATTACHMENT_ERROR": "an attachment is missing, outside attachments_dir or too large",
    "RECIPIENT_REJECTED": "the SMTP relay refused every recipient, the sender or the message",
    "SUPPRESSED": "every recipient is on the suppression list",
    "AUTH_REVOKED": "credentials refused for good (Google invalid_grant, SMTP AUTH)",
    "SHEETS_REQUEST_REJECTED": "Google Sheets refused the request (400, 403, 404, ...)",
    "BREAKER_OPEN": "the destination's circuit breaker is open (delayed without a try; "
    "dead-lettered after breaker.max_job_age_ms)",
    "JOB_EXPIRED": "the job waited longer than it may (held back by its destination's "
    "rate limit past breaker.max_job_age_ms)",
    # retried
    "TIMEOUT": "no answer within the webhook timeout",
    "CONNECTION_ERROR": "the connection was refused, reset or lost",
    "DNS_ERROR": "the destination's host name could not be looked up",
    "TLS_ERROR": "the TLS handshake or the certificate check failed",
    "RATE_LIMITED": "the receiver answered 429 Too Many Requests, or the job was delayed "
    "without a try to keep its destination's rate limit",
    "PROXY_ERROR": "the egress proxy could not be reached, refused the request or CONNECT, "
    "or answered with an error of its own",
    "SMTP_TEMPORARY": "the SMTP relay answered 4xx (a recipient, MAIL or DATA)",
    "SMTP_CONNECTION": "the SMTP relay could not be reached, or the connection was lost",
    "RENDER_BUSY": "every render thread is held by a template that ran past its timeout",
    "SHEETS_RATE_LIMITED": "Google answered 429 or a quota error",
    "SHEETS_UNAVAILABLE": "Google answered 5xx, 408, 409 or 425",
    "SHEETS_CONNECTION": "Google could not be reached, or did not answer in time",
    "OAUTH_UNAVAILABLE": "the OAuth token endpoint was down or answered an unusable token",
    "OAUTH_CLIENT_REJECTED": "the OAuth token endpoint refused the client (client_id, "
    "client_secret, token_url)",
    "SHUTDOWN": "the daemon stopped while the job's call was on the wire",
    "INTERNAL_ERROR": "an unexpected error in formcraftd (logged with its traceback)",
}
"""Every error code an attempt can carry, with what it means (README, `schema events`)."""


class FormcraftError(Exception):
    """The root of every error formcraftd raises on purpose."""


class ConfigError(FormcraftError):
    """The configuration file or environment is unusable; the message is one line."""


class BrokerError(FormcraftError):
    """RabbitMQ could not be reached or refused what we asked."""


class BrokerUnreachable(BrokerError):
    """No broker answered within `broker.connect_timeout_s`."""


class TopologyError(BrokerError):
    """A queue or exchange exists with arguments that clash with ours."""


class JobFailure(FormcraftError):
    """Base of the exceptions that decide a job's fate; each carries an error `code`."""

    code: AttemptErrorCode


class PermanentFailure(JobFailure):
    """The job can never succeed: dead-letter it now with `code`.

    `reached_service` says whether the remote side was contacted and answered;
    only then does the failure tell the circuit breaker the service is alive.
    """

    def __init__(
        self,
        code: ErrorCode,
        reason: str,
        *,
        status: int | None = None,
        reached_service: bool = True,
        snippet: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.code: ErrorCode = code
        self.reason = reason
        self.status = status
        self.reached_service = reached_service
        self.snippet = snippet  # the start of the remote answer, for delivery events

    def __repr__(self) -> str:
        return f"PermanentFailure({self.code}, {self.reason!r}, status={self.status})"


class RetryLater(JobFailure):
    """A transient failure with `code`: try again after `after` seconds (None = the schedule's).

    `replacement` is an updated job body to republish instead of the original
    (the email worker uses it to retry only the recipients not yet accepted).
    """

    def __init__(
        self,
        code: RetryCode,
        reason: str,
        *,
        after: float | None = None,
        status: int | None = None,
        replacement: object | None = None,
        counts_for_breaker: bool = True,
        snippet: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.code: RetryCode = code
        self.reason = reason
        self.after = after
        self.status = status
        self.replacement = replacement
        self.snippet = snippet
        # False for the other jobs of a batch whose one call failed: one call, one failure.
        self.counts_for_breaker = counts_for_breaker

    def __repr__(self) -> str:
        return f"RetryLater({self.code}, {self.reason!r}, after={self.after}, status={self.status})"


class Delayed(JobFailure):
    """Delay the job `remaining` seconds without using a try (the consumer picks the wait queue).

    `key` names what holds it back (a breaker or rate-limit key). A job delayed
    past `breaker.max_job_age_ms` is dead-lettered with `expired_code`.
    """

    expired_code: ErrorCode

    def __init__(self, message: str, key: str, remaining: float) -> None:
        super().__init__(message)
        self.key = key
        self.remaining = remaining

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.key!r}, remaining={self.remaining:.3f})"


class BreakerOpen(Delayed):
    """The breaker for `key` is open for `remaining` more seconds; delay without a try."""

    code: ErrorCode = "BREAKER_OPEN"
    expired_code: ErrorCode = "BREAKER_OPEN"

    def __init__(self, key: str, remaining: float) -> None:
        super().__init__(f"circuit breaker {key} is open", key, remaining)


class Throttled(Delayed):
    """The destination `key` is over its rate limit (or paused by a 429/503) for
    `remaining` more seconds, longer than a job may wait in the process; delay without a try."""

    code: RetryCode = "RATE_LIMITED"
    expired_code: ErrorCode = "JOB_EXPIRED"

    def __init__(self, key: str, remaining: float) -> None:
        super().__init__(f"{key} is over its rate limit", key, remaining)
