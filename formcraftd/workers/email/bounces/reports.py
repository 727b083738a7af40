"""What the DSN and ARF parsers share: the parsed report and the original's headers.

A report (RFC 6522 ``multipart/report``) carries, besides a human-readable
part, machine-readable fields and the original message (or only its headers,
``text/rfc822-headers``). The original names the job: its ``Message-ID`` and
``X-FormCraft-Job-Id``. The report's own ``To`` / ``Delivered-To`` headers hold
the VERP return path it was sent to.
"""

from __future__ import annotations

import email
import email.parser
import email.policy
import email.utils
from dataclasses import dataclass, field
from email.message import Message

from formcraftd.core.bounces import BounceType
from formcraftd.core.text import one_line

# Headers of the report itself that may hold the address it was delivered to.
ENVELOPE_HEADERS = ("To", "Delivered-To", "X-Original-To", "Envelope-To", "X-Envelope-To")
DIAGNOSTIC_CHARS = 300


class NotAReport(ValueError):
    """The message is not a report formcraftd understands; it is left alone."""


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """One recipient a report is about."""

    type: BounceType
    recipient: str  # addr-spec
    status: str | None = None
    diagnostic: str | None = None


@dataclass(slots=True)
class ParsedReport:
    """A DSN or ARF report: its recipients and what identifies the original message."""

    format: str  # "dsn" or "arf"
    results: list[RecipientResult] = field(default_factory=list)
    message_ids: list[str] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)
    envelope_to: list[str] = field(default_factory=list)
    original_to: list[str] = field(default_factory=list)  # the original's To addresses


def parse_message(raw: bytes) -> Message:
    """The message as the stdlib parses it (compat32: values stay plain strings)."""
    return email.message_from_bytes(raw)


def report_type(message: Message) -> str | None:
    """`delivery-status`, `feedback-report`, ... of a multipart/report; None otherwise."""
    if message.get_content_type() != "multipart/report":
        return None
    value = message.get_param("report-type")
    return value.lower() if isinstance(value, str) else None


def field_blocks(part: Message) -> list[Message]:
    """The header blocks of a message/delivery-status or message/feedback-report part.

    The stdlib parses both into sub-messages; a part it left as text (an
    encoded body) is decoded and split on blank lines here.
    """
    payload = part.get_payload()
    if isinstance(payload, list):
        return [block for block in payload if isinstance(block, Message)]
    data = part.get_payload(decode=True)
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(payload)
    text = text.replace("\r\n", "\n")
    parser = email.parser.HeaderParser()
    return [parser.parsestr(chunk.strip() + "\n") for chunk in text.split("\n\n") if chunk.strip()]


def original_headers(report: Message) -> Message | None:
    """The original message's headers, from the report's third part."""
    for part in report.walk():
        kind = part.get_content_type()
        if kind == "message/rfc822":
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                return payload[0]
        elif kind in ("text/rfc822-headers", "message/rfc822-headers"):
            data = part.get_payload(decode=True)
            text = data.decode("utf-8", "replace") if isinstance(data, bytes) else ""
            return email.parser.HeaderParser().parsestr(text.replace("\r\n", "\n"))
    return None


def collect_identifiers(report: Message, parsed: ParsedReport) -> None:
    """Fill in what can name the job: the original's ids, the report's envelope addresses."""
    original = original_headers(report)
    if original is not None:
        parsed.message_ids += [v.strip() for v in original.get_all("Message-ID", []) if v]
        parsed.job_ids += [v.strip() for v in original.get_all("X-FormCraft-Job-Id", []) if v]
        parsed.original_to += addresses(original.get_all("To", []))
    for name in ENVELOPE_HEADERS:
        parsed.envelope_to += addresses(report.get_all(name, []))


def addresses(values: list[str]) -> list[str]:
    """The addr-specs in header values (malformed ones skipped)."""
    found = []
    for _name, address in email.utils.getaddresses([str(v) for v in values]):
        if "@" in address:
            found.append(address.strip())
    return found


def typed_address(value: str | None) -> str | None:
    """`rfc822; ada@example.com` (a DSN's address-type; address) -> `ada@example.com`."""
    if not value:
        return None
    _, _, address = str(value).rpartition(";")
    address = address.strip().strip("<>").strip()
    return address if "@" in address else None


def diagnostic(value: str | None) -> str | None:
    """`smtp; 550 5.1.1 no such user` -> `550 5.1.1 no such user`, one line, bounded."""
    if not value:
        return None
    text = str(value)
    kind, sep, rest = text.partition(";")
    if sep and kind.strip().lower() in ("smtp", "x-unix", "x-postfix", "x-local"):
        text = rest
    return one_line(text.strip(), DIAGNOSTIC_CHARS) or None
