"""The suppression policy: what a bounce or a complaint does to its address.

- A hard bounce or a complaint suppresses the address at once, until an
  operator removes it.
- A soft bounce is counted; the `soft_bounce_limit`-th within
  `soft_bounce_window_s` suppresses the address for `soft_suppression_s`,
  after which it gets mail again (and its count starts afresh).

Every report applied publishes `email.bounced` or `email.complained` with the
job's ids when the job is known. The job is found through the ledger of sent
jobs, by any token the report carries: the VERP return path it was delivered
to, the original's Message-ID or its X-FormCraft-Job-Id. A match also
requires the bounced address to be one of the job's recipients, so a report
about somebody else's mail never suppresses anyone.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator

from formcraftd.core.bounces import BounceCounts, BounceOutcome, BounceReport
from formcraftd.core.config import BouncesConfig
from formcraftd.core.events import EmailBouncedEvent, EmailComplainedEvent, Emit, now
from formcraftd.workers.email import mime
from formcraftd.workers.email.bounces.ledger import BounceLedger, SentJob
from formcraftd.workers.email.suppression import (
    SuppressionError,
    SuppressionKind,
    SuppressionList,
    normalize_address,
)

__all__ = ["BouncePolicy", "verp_pattern"]

log = logging.getLogger("formcraftd.email.bounces")

_TOKEN = r"([A-Za-z0-9_-]{1,64})"
_PRUNE_EVERY_S = 3600.0


def verp_pattern(return_path: str) -> re.Pattern[str] | None:
    """A pattern whose group 1 is the job token of a VERP address made from `return_path`."""
    if "{job_id}" not in return_path:
        return None
    before, _, after = return_path.partition("{job_id}")
    return re.compile(re.escape(before) + _TOKEN + re.escape(after), re.IGNORECASE)


class BouncePolicy:
    """Applies bounce reports to the suppression list; remembers the jobs sent."""

    def __init__(
        self,
        config: BouncesConfig,
        *,
        return_path: str,
        suppression: SuppressionList,
        ledger: BounceLedger,
        emit: Emit | None,
        counts: BounceCounts | None = None,
    ) -> None:
        self.config = config
        self._verp = verp_pattern(return_path)
        self.suppression = suppression
        self.ledger = ledger
        self._emit = emit
        self.counts = counts or BounceCounts()
        self._pruned_at = 0.0

    def reconfigure(self, config: BouncesConfig, return_path: str) -> None:
        """A reload: new limits and windows, a new return path pattern."""
        self.config, self._verp = config, verp_pattern(return_path)

    async def record_sent(
        self, job_id: str, form_id: str | None, submission_id: str | None, recipients: list[str]
    ) -> None:
        """Remember a job whose mail `recipients` (envelope addresses) accepted."""
        keys = frozenset(mime.address_key(r) for r in recipients)
        sent = SentJob(mime.job_token(job_id), job_id, form_id, submission_id, keys)
        at = time.time()
        await self.ledger.record_sent(sent, at)
        if at - self._pruned_at > _PRUNE_EVERY_S:
            self._pruned_at = at
            config = self.config
            await self.ledger.prune(at, config.sent_memory_s, config.soft_bounce_window_s)

    async def take(self, report: BounceReport, *, require_match: bool) -> BounceOutcome:
        """Apply `report` (see the module's docstring); never raises for a bad report."""
        try:
            key = normalize_address(report.recipient)
        except ValueError:
            return BounceOutcome(False, ignored="the recipient is not an email address")
        try:
            job = await self.ledger.find(self._tokens(report))
        except SuppressionError as exc:
            log.error("cannot read the bounce ledger: %s", exc)
            job = None
        if job is not None and key not in job.recipients:
            job = None
        if job is None and require_match:
            return BounceOutcome(False, ignored="no job sent by this host matches it")
        suppressed = await self._suppress(report, key, job)
        self.counts.took(report.source, report.type)
        self._publish(report, key, job, suppressed)
        log.info(
            "%s %s of %s (job %s, %s): %s",
            report.source,
            "complaint" if report.type == "complaint" else f"{report.type} bounce",
            key,
            job.job_id if job else "unknown",
            report.status or "-",
            "suppressed" if suppressed else "counted",
            extra={"job_id": job.job_id if job else None},
        )
        return BounceOutcome(job is not None, job.job_id if job else None, suppressed)

    def _tokens(self, report: BounceReport) -> Iterator[str]:
        for address in report.envelope_to:
            match = self._verp.fullmatch(address.strip()) if self._verp else None
            if match:
                yield match.group(1)
        for message_id in report.message_ids:
            local, at, _ = message_id.strip().strip("<>").partition("@")
            if at and local:
                yield local
        for job_id in report.job_ids:
            yield mime.job_token(job_id.strip())

    async def _suppress(self, report: BounceReport, key: str, job: SentJob | None) -> bool:
        """Put the address on the list when the policy says so; whether it is on it now."""
        config = self.config
        at = time.time()
        expires_at: float | None = None
        kind: SuppressionKind = "complaint" if report.type == "complaint" else "hard_bounce"
        try:
            if report.type == "soft":
                count = await self.ledger.soft_bounce(key, at, config.soft_bounce_window_s)
                if count < config.soft_bounce_limit:
                    return bool(self.suppression.suppressed([key]))
                kind, expires_at = "soft_bounce", at + config.soft_suppression_s
                await self.ledger.forget_soft_bounces(key)
            reason = " ".join(filter(None, (report.status, report.diagnostic))) or report.type
            await self.suppression.add(
                key,
                reason=reason,
                status=_smtp_code(report.diagnostic),
                source=report.source,
                kind=kind,
                job_id=job.job_id if job else None,
                expires_at=expires_at,
            )
        except (SuppressionError, ValueError) as exc:
            log.error("could not suppress %s after a %s: %s", key, report.type, exc)
            return False
        return True

    def _publish(
        self, report: BounceReport, key: str, job: SentJob | None, suppressed: bool
    ) -> None:
        if self._emit is None:
            return
        job_id = job.job_id if job else None
        form_id = job.form_id if job else None
        submission_id = job.submission_id if job else None
        if report.type == "complaint":
            self._emit(
                EmailComplainedEvent(
                    job_id=job_id,
                    form_id=form_id,
                    submission_id=submission_id,
                    recipient=key,
                    feedback=report.diagnostic,
                    source=report.source,
                    at=now(),
                )
            )
            return
        self._emit(
            EmailBouncedEvent(
                job_id=job_id,
                form_id=form_id,
                submission_id=submission_id,
                recipient=key,
                bounce_type=report.type,
                status=report.status,
                diagnostic=report.diagnostic,
                source=report.source,
                suppressed=suppressed,
                at=now(),
            )
        )


def _smtp_code(diagnostic: str | None) -> int | None:
    """The SMTP reply code a diagnostic starts with (`550 5.1.1 ...` -> 550)."""
    head = (diagnostic or "")[:3]
    return int(head) if head.isdigit() and head[0] in "245" else None
