"""Delivery status notifications (RFC 3464): which recipients failed, hard or soft.

A DSN is a ``multipart/report; report-type=delivery-status``. Its
``message/delivery-status`` part holds one block of per-message fields, then
one block per recipient: ``Final-Recipient``, ``Action`` (failed, delayed,
delivered, relayed, expanded), ``Status`` (an enhanced status code, RFC 3463)
and often ``Diagnostic-Code`` (the remote server's reply).

``Action: failed`` with a 5.x.x status is a hard bounce; a 4.x.x status
(the sending server gave up on a temporary failure) or ``Action: delayed`` is
a soft one. Without a Status, the SMTP code in the Diagnostic-Code decides,
and a failure saying nothing at all is taken as hard. Recipients that were
delivered, relayed or expanded are not bounces.
"""

from __future__ import annotations

import re
from email.message import Message

from formcraftd.core.bounces import BounceType
from formcraftd.workers.email.bounces.reports import (
    NotAReport,
    ParsedReport,
    RecipientResult,
    collect_identifiers,
    diagnostic,
    field_blocks,
    report_type,
    typed_address,
)

__all__ = ["parse_dsn"]

_STATUS = re.compile(r"\b([245])\.\d{1,3}\.\d{1,3}\b")
_SMTP_CODE = re.compile(r"^\s*([245])\d\d\b")
_BOUNCE_ACTIONS = ("failed", "delayed")
# Postfix names the envelope sender in the per-message fields: the VERP return path.
_SENDER_FIELDS = ("X-Postfix-Sender", "Original-Envelope-Sender")


def parse_dsn(message: Message) -> ParsedReport:
    """The failed and delayed recipients of a DSN; :class:`NotAReport` if it has none."""
    if report_type(message) != "delivery-status":
        raise NotAReport("not a multipart/report with report-type=delivery-status")
    blocks = _status_blocks(message)
    if not blocks:
        raise NotAReport("no message/delivery-status part")
    parsed = ParsedReport("dsn")
    per_message, per_recipient = blocks[0], blocks[1:]
    for name in _SENDER_FIELDS:
        sender = typed_address(per_message.get(name))
        if sender:
            parsed.envelope_to.append(sender)
    for block in per_recipient:
        result = _recipient(block)
        if result is not None:
            parsed.results.append(result)
    if not parsed.results:
        raise NotAReport("no failed or delayed recipient in the delivery-status part")
    collect_identifiers(message, parsed)
    return parsed


def _status_blocks(message: Message) -> list[Message]:
    for part in message.walk():
        if part.get_content_type() == "message/delivery-status":
            return field_blocks(part)
    return []


def _recipient(block: Message) -> RecipientResult | None:
    action = str(block.get("Action", "")).strip().lower()
    if action not in _BOUNCE_ACTIONS:
        return None
    recipient = typed_address(block.get("Final-Recipient")) or typed_address(
        block.get("Original-Recipient")
    )
    if recipient is None:
        return None
    said = diagnostic(block.get("Diagnostic-Code"))
    status_match = _STATUS.search(str(block.get("Status", "")))
    status = status_match.group(0) if status_match else None
    return RecipientResult(_type(action, status, said), recipient, status, said)


def _type(action: str, status: str | None, said: str | None) -> BounceType:
    if action == "delayed":
        return "soft"
    if status is not None:
        return "soft" if status.startswith("4") else "hard"
    code = _SMTP_CODE.match(said or "")
    if code is not None and code.group(1) == "4":
        return "soft"
    return "hard"
