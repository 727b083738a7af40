"""Who a job's mail reached, and what that means for the job.

The job's recipients are parsed once (:func:`parse_recipients`); after the send,
:func:`judge` settles the job from the server's replies: a recipient refused
with 4xx, or not reached because the connection went, is retried alone (the
retried job carries only those), and the job is dead-lettered when nobody got
the mail. :func:`smtp_failure` is the fate of a transaction that did not
happen at all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from email.headerregistry import Address

import msgspec

from formcraftd.core.errors import PermanentFailure, RetryCode, RetryLater
from formcraftd.core.handler import JobContext
from formcraftd.core.jobs import EmailJob
from formcraftd.workers.email import mime
from formcraftd.workers.email.copies import SentCopies
from formcraftd.workers.email.smtp_pool import SmtpError

log = logging.getLogger("formcraftd.email")


@dataclass(frozen=True, slots=True)
class Recipient:
    """One recipient of a job, parsed."""

    raw: str  # as the job gave it (a retried job carries these)
    address: Address
    key: str  # the suppression list's key

    @property
    def envelope(self) -> str:
        return self.address.addr_spec


def parse_recipients(job: EmailJob) -> list[Recipient]:
    """The job's recipients, parsed, in order, without duplicates; VALIDATION_ERROR if bad."""
    unique: dict[str, Recipient] = {}
    for raw in job.payload.to:
        try:
            address = mime.parse_address(raw)
        except mime.HeaderRefused as exc:
            raise PermanentFailure("VALIDATION_ERROR", str(exc), reached_service=False) from None
        key = mime.address_key(address)
        unique.setdefault(key, Recipient(raw, address, key))
    return list(unique.values())


def judge(job: EmailJob, ctx: JobContext, recipients: list[Recipient], sent: SentCopies) -> None:
    """Return when every recipient is settled; raise the retry of the rest, or the failure.

    Recipients refused with 5xx are settled (the caller suppresses them).
    """
    rejected = {rcpt: reply for rcpt, reply in sent.refused.items() if reply[0] >= 500}
    deferred = {rcpt: reply for rcpt, reply in sent.refused.items() if reply[0] < 500}
    if sent.undelivered:
        log.warning(
            "job %s: the copies to %d recipients were refused (%s); they are not retried",
            ctx.job_id,
            len(sent.undelivered),
            next(iter(sent.undelivered.values()))[1],
            extra={"queue": ctx.queue, "job_id": ctx.job_id},
        )
    retried = [r.raw for r in recipients if r.envelope in deferred or r.envelope in sent.unsent]
    payload = msgspec.structs.replace(job.payload, to=retried)
    if sent.interrupted is not None:
        cause = sent.interrupted
        raise RetryLater(
            cause.code,
            f"{cause.reason}; {len(sent.accepted)} of {len(recipients)} recipients have"
            f" the mail, retrying only the other {len(retried)}",
            status=cause.status,
            replacement=msgspec.structs.replace(job, payload=payload),
            counts_for_breaker=cause.counts_for_breaker,
        )
    if deferred:
        code, text = next(iter(deferred.values()))
        raise RetryLater(
            "SMTP_TEMPORARY",
            f"{len(deferred)} of {len(recipients)} recipients deferred ({code} {text});"
            " retrying only those",
            status=code,
            replacement=msgspec.structs.replace(job, payload=payload),
            counts_for_breaker=False,  # the relay answered: greylisting is not an outage
        )
    if not sent.accepted and rejected:
        code, text = next(iter(rejected.values()))
        raise PermanentFailure(
            "RECIPIENT_REJECTED",
            f"all {len(rejected) + len(sent.undelivered)} recipients refused ({code} {text})",
            status=code,
        )
    if not sent.accepted:
        status, reason = next(iter(sent.undelivered.values()))
        raise PermanentFailure(
            "RECIPIENT_REJECTED", f"every copy was refused: {reason}", status=status
        )


def smtp_failure(exc: SmtpError, *, endpoint: str) -> PermanentFailure | RetryLater:
    """What a transaction that did not happen means for the job."""
    if exc.auth:
        log.error(
            "SMTP authentication failed at %s: %s",
            endpoint,
            exc.reason,
            extra={"alert": "smtp_auth_failed", "status": exc.status},
        )
        return PermanentFailure("AUTH_REVOKED", exc.reason, status=exc.status)
    if exc.transient:
        code: RetryCode = "SMTP_CONNECTION" if exc.status is None else "SMTP_TEMPORARY"
        return RetryLater(code, exc.reason, status=exc.status)
    return PermanentFailure("RECIPIENT_REJECTED", exc.reason, status=exc.status)
