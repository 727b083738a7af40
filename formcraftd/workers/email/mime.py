"""Mail messages: addresses, attachments and the MIME message of one email job.

Everything here is synchronous and free of the network: the email worker runs
:func:`read_attachment` and :func:`build_message` in a thread. Problems raise
:class:`HeaderRefused` (a job that would inject headers or names an invalid
address: ``VALIDATION_ERROR``) or :class:`AttachmentRefused` (``ATTACHMENT_ERROR``).

Addresses are made ASCII: an internationalized domain is sent in its IDNA
(punycode) form, so no mail needs SMTPUTF8; a non-ASCII local part is refused.
"""

from __future__ import annotations

import binascii
import datetime as dt
import email.policy
import email.utils
import functools
import hashlib
import io
import mimetypes
import os
import re
import secrets
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from email import encoders
from email.errors import HeaderParseError
from email.generator import BytesGenerator
from email.header import Header
from email.headerregistry import Address
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.nonmultipart import MIMENonMultipart
from pathlib import Path
from urllib.parse import quote

from formcraftd.core.errors import FormcraftError

__all__ = [
    "Attachment",
    "AttachmentRefused",
    "HeaderRefused",
    "address_key",
    "build_message",
    "check_header_text",
    "job_token",
    "message_id",
    "parse_address",
    "read_attachment",
    "return_path",
    "unsubscribe_url",
]

# Parses addresses; messages are all 7bit, so no 8BITMIME or SMTPUTF8 is ever required.
POLICY = email.policy.SMTP.clone(cte_type="7bit")
_MAX_LINE = 998  # RFC 5322, without the CRLF
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")
_READ_CHUNK = 1 << 20


class HeaderRefused(FormcraftError):
    """An address, subject or file name that cannot go into a header as it is."""


class AttachmentRefused(FormcraftError):
    """An attachment that is missing, outside `attachments_dir` or too large."""


# --- addresses ------------------------------------------------------------------------


def check_header_text(value: str, what: str) -> None:
    """Refuse line breaks and other control characters (header injection)."""
    if _CONTROL.search(value):
        raise HeaderRefused(f"{what} contains a line break or control character")


@functools.lru_cache(maxsize=4096)  # the same few addresses come back job after job
def parse_address(raw: str, what: str = "recipient") -> Address:
    """One mailbox (`a@b.example` or `Name <a@b.example>`), its domain in ASCII."""
    check_header_text(raw, what)
    try:
        header = POLICY.header_factory("To", raw)
        addresses = header.addresses
    except (HeaderParseError, IndexError, ValueError, TypeError):
        raise HeaderRefused(f"{what} {raw[:100]!r} is not an email address") from None
    if len(addresses) != 1 or header.defects:
        raise HeaderRefused(f"{what} {raw[:100]!r} is not one valid email address")
    address: Address = addresses[0]
    if not address.username or not address.domain or not address.username.isascii():
        raise HeaderRefused(f"{what} {raw[:100]!r} is not a usable email address")
    try:
        domain = address.domain.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise HeaderRefused(f"{what} {raw[:100]!r} has an invalid domain") from None
    return Address(address.display_name, address.username, domain)


def address_key(address: Address | str) -> str:
    """How the suppression list knows an address: its addr-spec, case-folded."""
    spec = address.addr_spec if isinstance(address, Address) else address
    return spec.casefold()


# --- identifiers ------------------------------------------------------------------------


def job_token(job_id: str) -> str:
    """The job id as a token safe in a Message-ID or a local part (VERP).

    A short plain id is kept as is (``sha256:``-derived ids lose the prefix);
    anything else is replaced by a hash of it.
    """
    plain = job_id.removeprefix("sha256:")
    if _TOKEN.fullmatch(plain):
        return plain
    return hashlib.sha256(job_id.encode()).hexdigest()[:40]


def message_id(job_id: str, domain: str) -> str:
    """`<token@domain>`: the same on every try of a job, so receivers can drop duplicates."""
    return f"<{job_token(job_id)}@{domain}>"


def return_path(template: str, job_id: str) -> str:
    """The envelope sender: `template` with `{job_id}` replaced by the job's token."""
    return template.replace("{job_id}", job_token(job_id))


# RFC 2369 / 8058: the URL in angle brackets; the header on a line of its own, folded
# after the colon, must stay within RFC 5322's 998 characters.
MAX_UNSUBSCRIBE_URL = _MAX_LINE - len(" <>")
ONE_CLICK = "List-Unsubscribe=One-Click"


def unsubscribe_url(
    template: str, *, form_id: str, submission_id: str, job_id: str, recipient: str
) -> str:
    """`template` (checked by the config) with each placeholder's value percent-encoded."""
    values = {
        "form_id": form_id,
        "submission_id": submission_id,
        "job_id": job_id,
        "recipient": recipient,
    }
    return template.format_map({name: quote(value, safe="") for name, value in values.items()})


def _header_job_id(job_id: str) -> str:
    if len(job_id) <= 200 and job_id.isascii() and job_id.isprintable():
        return job_id
    return job_token(job_id)


# --- attachments -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Attachment:
    filename: str
    content_type: str  # "maintype/subtype"
    data: bytes


def read_attachment(
    base_dir: str, path: str, filename: str, max_bytes: int, limit: str = "max_attachment_bytes"
) -> Attachment:
    """Read one attachment, which must resolve to a regular file inside `base_dir`."""
    check_header_text(filename, "attachment filename")
    if not base_dir:
        raise AttachmentRefused("attachments are disabled: attachments_dir is not set")
    base = Path(base_dir).resolve()
    if "\0" in path:
        raise AttachmentRefused("attachment path contains a NUL byte")
    candidate = Path(path) if os.path.isabs(path) else base / path
    try:
        real = candidate.resolve(strict=True)
    except FileNotFoundError:
        raise AttachmentRefused(f"attachment {path!r} does not exist") from None
    except (OSError, RuntimeError) as exc:
        raise AttachmentRefused(f"attachment {path!r} cannot be resolved: {exc}") from None
    if not real.is_relative_to(base):
        raise AttachmentRefused(f"attachment {path!r} is outside attachments_dir")
    data = _read_inside(real, base, path, max_bytes, limit)
    content_type, encoding = mimetypes.guess_type(filename, strict=False)
    if content_type is None or encoding is not None:
        content_type = "application/octet-stream"
    return Attachment(filename, content_type, data)


def _read_inside(real: Path, base: Path, shown: str, max_bytes: int, limit: str) -> bytes:
    """Open without following a late symlink, check what was opened, read within the cap."""
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise AttachmentRefused(f"attachment {shown!r} cannot be opened: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise AttachmentRefused(f"attachment {shown!r} is not a regular file")
        opened = Path(f"/proc/self/fd/{fd}")
        if opened.exists() and not opened.resolve().is_relative_to(base):
            raise AttachmentRefused(f"attachment {shown!r} is outside attachments_dir")
        if info.st_size > max_bytes:
            raise AttachmentRefused(_too_large(shown, info.st_size, max_bytes, limit))
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, min(_READ_CHUNK, max_bytes + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise AttachmentRefused(_too_large(shown, size, max_bytes, limit))
        return b"".join(chunks)
    except OSError as exc:
        raise AttachmentRefused(f"attachment {shown!r} cannot be read: {exc.strerror}") from None
    finally:
        os.close(fd)


def _too_large(shown: str, size: int, max_bytes: int, limit: str) -> str:
    return f"attachment {shown!r} is {size} bytes, over {limit} ({max_bytes})"


# --- the message ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Content:
    subject: str
    text: str
    html: str
    attachments: Sequence[Attachment] = ()


def build_message(
    *,
    sender: Address,
    recipients: Sequence[Address],
    content: Content,
    job_id: str,
    mailer: str = "",
    date: dt.datetime | None = None,
    unsubscribe: str = "",
) -> bytes:
    """The message as it goes over SMTP: multipart/alternative text + HTML, then attachments.

    Built with the `email` package's MIME classes and its compat32 generator,
    which is several times faster than `EmailMessage` with the SMTP policy for
    the one shape of message sent here; headers are encoded (RFC 2047) and
    folded by it, and bodies are 7bit when they can be, else quoted-printable.
    `unsubscribe` (an https URL) adds RFC 8058's `List-Unsubscribe` and
    `List-Unsubscribe-Post`.
    """
    check_header_text(content.subject, "subject")
    body = MIMEMultipart("alternative", boundary=_boundary())
    body.attach(_text_part(content.text, "plain"))
    body.attach(_text_part(content.html, "html"))
    root = body
    if content.attachments:
        root = MIMEMultipart("mixed", boundary=_boundary())
        _part_of(root, body)
        for attachment in content.attachments:
            _part_of(root, _attachment_part(attachment))
    try:
        root["From"] = format_address(sender)
        root["To"] = ", ".join(format_address(address) for address in recipients)
        root["Subject"] = _header_text(content.subject)
        root["Date"] = email.utils.format_datetime(date or dt.datetime.now(dt.UTC))
        root["Message-ID"] = message_id(job_id, sender.domain)
        root["X-FormCraft-Job-Id"] = _header_job_id(job_id)
        root["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies to this
        if unsubscribe:
            _unsubscribe_headers(root, unsubscribe)
        if mailer:
            root["X-Mailer"] = mailer
        out = io.BytesIO()
        BytesGenerator(out, mangle_from_=False, policy=email.policy.compat32).flatten(root)
        return out.getvalue()
    except (ValueError, TypeError, HeaderParseError) as exc:
        raise HeaderRefused(f"the message cannot be built: {exc}") from None


def _unsubscribe_headers(root: Message, url: str) -> None:
    """The generator folds a long value onto a line of its own, never inside the URL."""
    if len(url) > MAX_UNSUBSCRIBE_URL or not url.isascii() or re.search(r"[\s<>]", url):
        raise ValueError("the unsubscribe URL is too long or not a plain URL")
    root["List-Unsubscribe"] = f"<{url}>"
    root["List-Unsubscribe-Post"] = ONE_CLICK


def format_address(address: Address) -> str:
    """`Name <a@b>` with the name quoted or RFC 2047-encoded as needed."""
    return email.utils.formataddr((address.display_name, address.addr_spec), charset="utf-8")


def _boundary() -> str:
    """A random boundary: no body can contain it by chance, and none need be scanned for it."""
    return f"=_fc_{secrets.token_hex(12)}"


def _header_text(value: str) -> str:
    """ASCII as is (the generator folds it); anything else as RFC 2047 encoded words."""
    return value if value.isascii() else Header(value, "utf-8").encode()


def _part_of(parent: MIMEMultipart, part: Message) -> None:
    del part["MIME-Version"]  # only the top level carries it
    parent.attach(part)


def _text_part(text: str, subtype: str) -> MIMENonMultipart:
    """7bit when the text is ASCII in short lines, else UTF-8 quoted-printable."""
    text = text.replace("\r\n", "\n")
    if text.isascii() and "\r" not in text and max(map(len, text.split("\n"))) <= _MAX_LINE:
        part = MIMENonMultipart("text", subtype, charset="us-ascii")
        part["Content-Transfer-Encoding"] = "7bit"
        part.set_payload(text)
    else:
        part = MIMENonMultipart("text", subtype, charset="utf-8")
        part["Content-Transfer-Encoding"] = "quoted-printable"
        part.set_payload(binascii.b2a_qp(text.encode(), istext=True).decode("ascii"))
    del part["MIME-Version"]
    return part


def _attachment_part(attachment: Attachment) -> Message:
    maintype, _, subtype = attachment.content_type.partition("/")
    part = MIMEBase(maintype, subtype)
    part.set_payload(attachment.data)
    encoders.encode_base64(part)
    name = attachment.filename
    filename: str | tuple[str, str, str] = name if name.isascii() else ("utf-8", "", name)
    part.add_header("Content-Disposition", "attachment", filename=filename)
    return part
