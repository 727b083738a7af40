"""Complaints: Abuse Reporting Format feedback reports (RFC 5965).

A mailbox provider's feedback loop sends a ``multipart/report;
report-type=feedback-report`` when a user marks a mail as spam. Its
``message/feedback-report`` part says what kind of feedback it is
(``Feedback-Type``) and often who complained (``Original-Rcpt-To``); the third
part is the original message or its headers. Providers that redact the
recipient leave only the original's ``To``: that names the complainer only
when it holds one address (matching then checks it was the job's recipient).

``abuse``, ``fraud``, ``virus`` and ``other`` feedback are complaints;
``not-spam`` and ``auth-failure`` (DMARC failure reports) are not, and such
reports are left alone.
"""

from __future__ import annotations

from email.message import Message

from formcraftd.workers.email.bounces.reports import (
    NotAReport,
    ParsedReport,
    RecipientResult,
    addresses,
    collect_identifiers,
    field_blocks,
    report_type,
)

__all__ = ["parse_arf"]

COMPLAINT_TYPES = ("abuse", "fraud", "virus", "other")


def parse_arf(message: Message) -> ParsedReport:
    """The complaint of an ARF report; :class:`NotAReport` if it is not one."""
    if report_type(message) != "feedback-report":
        raise NotAReport("not a multipart/report with report-type=feedback-report")
    fields = _feedback_fields(message)
    if fields is None:
        raise NotAReport("no message/feedback-report part")
    feedback_type = str(fields.get("Feedback-Type", "")).strip().lower()
    if feedback_type not in COMPLAINT_TYPES:
        raise NotAReport(f"feedback type {feedback_type[:40]!r} is not a complaint")
    parsed = ParsedReport("arf")
    collect_identifiers(message, parsed)
    recipients = addresses(fields.get_all("Original-Rcpt-To", []))
    if not recipients and len(parsed.original_to) == 1:
        recipients = parsed.original_to
    if not recipients:
        raise NotAReport("the complaint names no recipient (redacted, several in To)")
    said = f"feedback-type {feedback_type}"
    user_agent = fields.get("User-Agent")
    if user_agent:
        said += f" from {' '.join(str(user_agent).split())[:100]}"
    parsed.results = [RecipientResult("complaint", r, None, said) for r in recipients]
    return parsed


def _feedback_fields(message: Message) -> Message | None:
    for part in message.walk():
        if part.get_content_type() == "message/feedback-report":
            blocks = field_blocks(part)
            return blocks[0] if blocks else None
    return None
