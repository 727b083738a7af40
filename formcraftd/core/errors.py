"""The exception tree of formcraftd.

One root, :class:`FormcraftError`. Configuration and broker problems are plain
errors; the *job-fate* exceptions (:class:`PermanentFailure`, :class:`RetryLater`,
:class:`BreakerOpen`) are control flow that a handler raises and the generic
consumer turns into a dead letter, a delayed retry or a delay without a try.
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
    """Base of the exceptions that decide a job's fate."""


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
    """A transient failure: try again after `after` seconds (None = the schedule's delay).

    `replacement` is an updated job body to republish instead of the original
    (the email worker uses it to retry only the recipients not yet accepted).
    """

    def __init__(
        self,
        reason: str,
        *,
        after: float | None = None,
        status: int | None = None,
        replacement: object | None = None,
        counts_for_breaker: bool = True,
        snippet: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.after = after
        self.status = status
        self.replacement = replacement
        self.snippet = snippet
        # False for the other jobs of a batch whose one call failed: one call, one failure.
        self.counts_for_breaker = counts_for_breaker

    def __repr__(self) -> str:
        return f"RetryLater({self.reason!r}, after={self.after}, status={self.status})"


class BreakerOpen(JobFailure):
    """The breaker for `key` is open for `remaining` more seconds; delay without a try."""

    def __init__(self, key: str, remaining: float) -> None:
        super().__init__(f"circuit breaker {key} is open")
        self.key = key
        self.remaining = remaining

    def __repr__(self) -> str:
        return f"BreakerOpen({self.key!r}, remaining={self.remaining:.3f})"
