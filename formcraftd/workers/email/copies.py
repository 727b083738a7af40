"""The copies of one email job: one message for all its recipients, or one each.

A job is one message to all its recipients, unless the unsubscribe URL names
the `{recipient}`: then each recipient gets a copy of their own, since one
message with one recipient's link would let the others unsubscribe them
(RFC 8058 one-click unsubscribe). The copies go out in turn, one SMTP
transaction each, and :class:`SentCopies` says what became of every address.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from formcraftd.core.errors import PermanentFailure, RetryLater
from formcraftd.core.handler import JobContext
from formcraftd.core.jobs import EmailJob
from formcraftd.workers.email import mime
from formcraftd.workers.email.smtp_pool import SmtpError, SmtpPool

__all__ = ["Copy", "SentCopies", "copy_per_recipient", "send_copies", "unsubscribe_link"]

log = logging.getLogger("formcraftd.email")


def copy_per_recipient(unsubscribe_template: str, recipients: int) -> bool:
    """Whether each recipient gets their own copy: the unsubscribe URL names them."""
    return recipients > 1 and "{recipient}" in unsubscribe_template


def unsubscribe_link(template: str, job: EmailJob, ctx: JobContext, recipient: str) -> str:
    """The one-click unsubscribe URL of a copy; "" when off, or too long for a header line."""
    if not template:
        return ""
    url = mime.unsubscribe_url(
        template,
        form_id=job.metadata.form_id,
        submission_id=job.metadata.submission_id,
        job_id=ctx.job_id,
        recipient=recipient,
    )
    if len(url) > mime.MAX_UNSUBSCRIBE_URL:
        log.warning(
            "job %s: the unsubscribe URL would be %d characters, more than a header line"
            " holds (%d); sending without List-Unsubscribe",
            ctx.job_id,
            len(url),
            mime.MAX_UNSUBSCRIBE_URL,
            extra={"queue": ctx.queue, "job_id": ctx.job_id},
        )
        return ""
    return url


@dataclass(frozen=True, slots=True)
class Copy:
    """One message and the envelope addresses it goes to (all of the job's, or one)."""

    envelopes: tuple[str, ...]
    message: bytes


@dataclass(slots=True)
class SentCopies:
    """What the SMTP server made of a job's copies, by envelope address."""

    accepted: list[str] = field(default_factory=list)
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)  # at RCPT
    undelivered: dict[str, tuple[int | None, str]] = field(default_factory=dict)  # after RCPT
    interrupted: RetryLater | None = None  # why the copies to `unsent` did not go
    unsent: set[str] = field(default_factory=set)


FailureOf = Callable[[SmtpError], PermanentFailure | RetryLater]


async def send_copies(
    pool: SmtpPool, sender: str, copies: Sequence[Copy], failure_of: FailureOf
) -> SentCopies:
    """Send the copies in turn; a failure before any went out is the job's fate (raised).

    Once a copy went out, a retryable failure stops the sending and leaves the
    rest `unsent` (to be retried alone); a copy refused for good is
    `undelivered` and the others go on; refused credentials stop everything.
    """
    sent = SentCopies()
    for index, copy in enumerate(copies):
        try:
            replies = await pool.send(sender, copy.envelopes, copy.message)
        except SmtpError as exc:
            failure = failure_of(exc)
            refused_copy = isinstance(failure, PermanentFailure) and not exc.auth
            if len(copies) == 1 or (index == 0 and not refused_copy):
                raise failure from None  # nothing went out: the job's fate as a whole
            if exc.auth and not sent.accepted:
                raise failure from None
            rest = [envelope for later in copies[index:] for envelope in later.envelopes]
            if isinstance(failure, RetryLater):
                sent.interrupted, sent.unsent = failure, set(rest)
                break
            for envelope in rest if exc.auth else copy.envelopes:
                sent.undelivered[envelope] = (exc.status, exc.reason)
            if exc.auth:
                break
            continue
        sent.accepted.extend(replies.accepted)
        sent.refused.update(replies.refused)
    return sent
