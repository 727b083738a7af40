"""The three job messages, typed: a tagged union on `type`, validated on decode.

The wire format is the seed's JSON exactly (camelCase keys). Decoding goes
straight from the message bytes with one module-level decoder; a body that does
not validate raises :class:`JobInvalid` with a one-line reason.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec

from formcraftd.core.config import WorkerKind
from formcraftd.core.errors import FormcraftError
from formcraftd.core.text import one_line

# Bounds that keep one hostile message from costing much (the whole body is
# already capped by `daemon.max_message_bytes`).
ShortText = Annotated[str, msgspec.Meta(max_length=1024)]
Url = Annotated[str, msgspec.Meta(min_length=1, max_length=8192)]
HeaderMap = Annotated[dict[str, str], msgspec.Meta(max_length=100)]
# One signing secret, or several while one is rotated out (each signs; see
# formcraftd.workers.webhook.signing). A list of 10 still costs little per job.
MAX_SECRETS = 10
Secret = Annotated[str, msgspec.Meta(max_length=4096)]
SecretList = Annotated[
    list[Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]],
    msgspec.Meta(min_length=1, max_length=MAX_SECRETS),
]


class JobInvalid(FormcraftError):
    """A message body that is not a valid job; dead-lettered as VALIDATION_ERROR."""


class Metadata(msgspec.Struct, frozen=True, rename="camel"):
    form_id: ShortText
    submission_id: ShortText
    retry_count: Annotated[int, msgspec.Meta(ge=0)] = 0


# --- webhook.send -------------------------------------------------------------

# Control characters (tab aside) cannot be framed in a header; HTTP clients refuse them.
_FORBIDDEN_HEADER_CHARS = frozenset(chr(c) for c in (*range(32), 127)) - {"\t"}


class WebhookPayload(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    url: Url
    method: Literal["POST", "PUT"] = "POST"
    headers: HeaderMap = {}
    body: Any = None
    secret: Annotated[
        Secret | SecretList,
        msgspec.Meta(
            description=(
                "Standard Webhooks signing secret: whsec_<base64> or any other string "
                "(HMAC-SHA256, v1), or whsk_<base64> (an Ed25519 private key, v1a); "
                "empty: unsigned. A list signs with each (rotation), the current one first; "
                "X-FormCraft-Signature uses the first when it is an HMAC secret."
            )
        ),
    ] = ""

    def __post_init__(self) -> None:
        problem = _url_problem(self.url)
        if problem is not None:
            raise ValueError(problem)
        for name, value in self.headers.items():
            if not name or _FORBIDDEN_HEADER_CHARS.intersection(name + value) or ":" in name:
                raise ValueError(f"payload.headers has an invalid header {name[:64]!r}")


def _url_problem(url: str) -> str | None:
    """Why `url` cannot be a webhook target, or None (cached: a form's URL recurs)."""
    # Long URLs are checked each time, so the cache stays small.
    return _check_url(url) if len(url) > 1024 else _cached_check_url(url)


def _check_url(url: str) -> str | None:
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        return f"payload.url is not a URL: {exc}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "payload.url must be an absolute http(s) URL"
    return None


_cached_check_url = functools.lru_cache(maxsize=4096)(_check_url)


class WebhookJob(msgspec.Struct, frozen=True, tag="webhook.send", tag_field="type"):
    payload: WebhookPayload
    metadata: Metadata


# --- email.send ---------------------------------------------------------------


class EmailAttachment(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    filename: Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
    path: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]


class EmailPayload(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    to: Annotated[
        list[Annotated[str, msgspec.Meta(max_length=320)]],
        msgspec.Meta(min_length=1, max_length=1000),
    ]
    subject: Annotated[str, msgspec.Meta(max_length=4096)]
    template: Annotated[
        str,
        msgspec.Meta(
            min_length=1, max_length=200, pattern=r"^(?!.*\.\.)[A-Za-z0-9_-][A-Za-z0-9_./-]*$"
        ),
    ]
    data: dict[str, Any] = {}
    attachments: Annotated[list[EmailAttachment], msgspec.Meta(max_length=50)] = []


class EmailJob(msgspec.Struct, frozen=True, tag="email.send", tag_field="type"):
    payload: EmailPayload
    metadata: Metadata


# --- sheets.update -----------------------------------------------------------


class SheetsAuth(msgspec.Struct, frozen=True):
    access_token: Annotated[str, msgspec.Meta(max_length=8192)]
    refresh_token: Annotated[str, msgspec.Meta(min_length=1, max_length=8192)]
    expiry_date: int  # ms since the epoch


class SheetsPayload(msgspec.Struct, frozen=True, rename={"spreadsheet_id": "spreadsheetId"}):
    spreadsheet_id: Annotated[
        str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_-]+$")
    ]
    range: Annotated[str, msgspec.Meta(min_length=1, max_length=500)]
    values: Annotated[
        list[Annotated[list[Any], msgspec.Meta(max_length=1000)]],
        msgspec.Meta(min_length=1, max_length=10_000),
    ]
    auth: SheetsAuth


class SheetsJob(msgspec.Struct, frozen=True, tag="sheets.update", tag_field="type"):
    payload: SheetsPayload
    metadata: Metadata


Job = WebhookJob | EmailJob | SheetsJob
JOB_TYPES: dict[str, type[WebhookJob] | type[EmailJob] | type[SheetsJob]] = {
    "webhook": WebhookJob,
    "email": EmailJob,
    "sheets": SheetsJob,
}

_decoder: msgspec.json.Decoder[Job] = msgspec.json.Decoder(Job)
_encoder = msgspec.json.Encoder()


def decode(body: bytes) -> Job:
    """Decode and validate a message body; raises :class:`JobInvalid`."""
    try:
        return _decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise JobInvalid(one_line(str(exc))) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise JobInvalid(f"not valid JSON: {one_line(str(exc))}") from None
    except RecursionError:
        raise JobInvalid("JSON nested too deeply") from None


def encode(job: Job) -> bytes:
    return _encoder.encode(job)


def kind_of(job: Job) -> WorkerKind:
    """The worker kind (and so the config section) a job belongs to."""
    if isinstance(job, WebhookJob):
        return "webhook"
    if isinstance(job, EmailJob):
        return "email"
    return "sheets"


def job_id_for(message_id: str | None, body: bytes) -> str:
    """The publisher's `message_id`, else a stable id derived from the body."""
    if message_id:
        return message_id
    return "sha256:" + hashlib.sha256(body).hexdigest()[:32]


def schema(kind: str | None = None) -> dict[str, Any]:
    """The JSON Schema of one job type, or of the union of all three."""
    target: Any = Job if kind is None else JOB_TYPES[kind]
    result: dict[str, Any] = msgspec.json.schema(target)
    return result
