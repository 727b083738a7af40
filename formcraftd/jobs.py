"""The three job messages, typed: a tagged union on `type`, validated on decode.

The wire format is the seed's JSON exactly (camelCase keys). Decoding goes
straight from the message bytes with one module-level decoder; a body that does
not validate raises :class:`JobInvalid` with a one-line reason.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol, TypeVar
from urllib.parse import urlsplit

import msgspec

from formcraftd.config import WorkerKind
from formcraftd.errors import FormcraftError

# Bounds that keep one hostile message from costing much (the whole body is
# already capped by `daemon.max_message_bytes`).
ShortText = Annotated[str, msgspec.Meta(max_length=1024)]
Url = Annotated[str, msgspec.Meta(min_length=1, max_length=8192)]
HeaderMap = Annotated[dict[str, str], msgspec.Meta(max_length=100)]


class JobInvalid(FormcraftError):
    """A message body that is not a valid job; dead-lettered as VALIDATION_ERROR."""


class Metadata(msgspec.Struct, frozen=True, rename="camel"):
    form_id: ShortText
    submission_id: ShortText
    retry_count: Annotated[int, msgspec.Meta(ge=0)] = 0


# --- webhook.send -------------------------------------------------------------

_FORBIDDEN_HEADER_CHARS = frozenset("\r\n\0")


class WebhookPayload(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    url: Url
    method: Literal["POST", "PUT"] = "POST"
    headers: HeaderMap = {}
    body: Any = None
    secret: Annotated[str, msgspec.Meta(max_length=4096)] = ""

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

J = TypeVar("J", WebhookJob, EmailJob, SheetsJob)


def decode(body: bytes) -> Job:
    """Decode and validate a message body; raises :class:`JobInvalid`."""
    try:
        return _decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise JobInvalid(_one_line(str(exc))) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise JobInvalid(f"not valid JSON: {_one_line(str(exc))}") from None
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


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]


class _NoSlot(contextlib.AbstractAsyncContextManager[None]):
    """The slot of a handler that does not batch: the consumer already holds one."""

    async def __aexit__(self, *_exc: object) -> None:
        return None


_NO_SLOT = _NoSlot()


@dataclass(frozen=True, slots=True)
class JobContext:
    """What a handler may know about the delivery besides the job itself.

    `slot` is the queue's concurrency limit for handlers that batch
    (`Handler.batching`): they hold it around each remote call only, so jobs
    waiting to join a batch do not occupy the queue's slots.
    """

    job_id: str
    attempt: int  # 1 for the first try
    queue: str
    slot: contextlib.AbstractAsyncContextManager[None] = _NO_SLOT


class Delivered:
    """What a handler may report about a successful delivery (for delivery events).

    The snippet may be given as text or as a function that makes it: that runs
    once, and only if something reads `snippet` (a delivery event); most
    successes are never described, and masking a response costs a little.
    """

    __slots__ = ("_describe", "_snippet", "status")

    def __init__(
        self,
        status: int | None = None,
        snippet: str | None = None,
        *,
        describe: Callable[[], str | None] | None = None,
    ) -> None:
        self.status = status
        self._snippet = snippet
        self._describe = describe

    @property
    def snippet(self) -> str | None:
        if self._describe is not None:
            self._snippet, self._describe = self._describe(), None
        return self._snippet

    def __repr__(self) -> str:
        return f"Delivered(status={self.status!r})"


class Handler(Protocol[J]):
    """A worker: takes a typed job, returns on success or raises a job-fate exception.

    It knows nothing of AMQP. `breaker_key` names the remote service the job
    will call (`webhook:host:port`), so the consumer can consult its breaker.
    """

    kind: str
    job_type: type[J]
    # False: the consumer holds a concurrency slot for the whole of `handle`.
    # True: `handle` may wait to join a batch and holds `ctx.slot` around its remote call.
    batching: bool

    def prefetch(self, concurrency: int) -> int:
        """How many unacked messages the broker may push to this worker."""
        ...

    def reconfigure(self, config: Any) -> None:
        """Apply this worker's config section after a reload (raise ConfigError if unusable)."""
        ...

    def breaker_key(self, job: J) -> str: ...

    async def handle(self, job: J, ctx: JobContext) -> Delivered | None: ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...
