"""The webhook worker: signed HTTP delivery of `webhook.send` jobs.

A job is one request (Standard Webhooks signing, no redirects, a bounded
response read). 2xx returns; network errors, timeouts, 408/425/429 and 5xx
raise :class:`RetryLater`; every other status raises :class:`PermanentFailure`.

The SSRF guard (:mod:`formcraftd.netguard`) checks the address that is
actually connected: hostnames go through its resolver, which drops refused
addresses before the connector sees them; IP literals (which aiohttp never
resolves) are checked here before the request. Reasons name only the URL's
origin, never its path or query (webhook URLs often carry tokens there), and
never a secret or signature.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import ipaddress
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from yarl import URL

from formcraftd.core.config import WebhookWorkerConfig
from formcraftd.core.errors import PermanentFailure, RetryLater
from formcraftd.core.events import Emit
from formcraftd.core.handler import Delivered, JobContext
from formcraftd.core.jobs import WebhookJob
from formcraftd.core.retry import parse_retry_after
from formcraftd.workers.webhook.netguard import AddressRefused, GuardedResolver, NetworkPolicy

if TYPE_CHECKING:
    from formcraftd.core.handler import Handler

__all__ = [
    "WebhookHandler",
    "breaker_key",
    "encode_body",
    "parse_retry_after",
    "sign",
    "signing_key",
    "webhook_id",
]

log = logging.getLogger("formcraftd.webhook")

_SNIPPET_CHARS = 512
_SNIPPET_BYTES = _SNIPPET_CHARS * 4  # enough UTF-8 for 512 characters
_READ_CHUNK = 65_536
# Parsed URLs and keyed HMACs are kept for this many distinct URLs and
# secrets (about 1.2 KiB per ordinary URL, 0.3 KiB per secret). A longer URL
# or secret than _CACHEABLE_CHARS is worked out per job instead, which bounds
# the caches at about 13 and 5 MiB even if every entry were that long.
_CACHE_ENTRIES = 4096
_CACHEABLE_CHARS = 1024
_RETRYABLE = frozenset({408, 425, 429})
# Ours always win; framing and hop-by-hop headers are the client's, so a job cannot desync it.
_NOT_FROM_PAYLOAD = frozenset(
    {
        "user-agent",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "x-formcraft-signature",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "host",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
    }
)
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_SIGNATURE_HEADERS = ("webhook-signature", "X-FormCraft-Signature")
_INVALID_KEY = "webhook:invalid-url"


# --- pure functions -------------------------------------------------------------


def signing_key(secret: str) -> bytes:
    """The HMAC key: base64-decoded after a `whsec_` prefix, else the UTF-8 bytes."""
    if not secret.startswith("whsec_"):
        return secret.encode()
    try:
        key = base64.b64decode(secret[len("whsec_") :], validate=True)
    except ValueError:
        raise ValueError("payload.secret starts with whsec_ but is not valid base64") from None
    if not key:
        raise ValueError("payload.secret starts with whsec_ but holds an empty key")
    return key


def webhook_id(job_id: str, url: str) -> str:
    """`msg_` + a stable id: the same on every try, different for each endpoint."""
    return "msg_" + hashlib.sha256(f"{job_id}\n{url}".encode()).hexdigest()[:26]


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The Standard Webhooks headers, plus `X-FormCraft-Signature` for simple receivers.

    An empty key signs nothing: only `webhook-id` and `webhook-timestamp` are set.
    """
    headers: dict[str, str] = {}
    _Signer(key).add_headers(headers.__setitem__, msg_id, timestamp, body)
    return headers


def encode_body(body: Any) -> bytes:
    """A str body as is (UTF-8); anything else as compact JSON."""
    if isinstance(body, str):
        return body.encode()
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError as exc:
        raise ValueError(f"payload.body cannot be encoded as JSON: {exc}") from None


def breaker_key(url: str) -> str:
    """`webhook:<host>:<port>`, host lowercased, the scheme's default port filled in."""
    return _target(url).breaker_key


class _Signer:
    """HMAC-SHA256 keyed once; each message is signed on a copy.

    Keying an HMAC hashes the key into its inner and outer pads; copying the
    keyed state skips that for every message after the first.
    """

    __slots__ = ("_mac",)

    def __init__(self, key: bytes) -> None:
        self._mac = hmac.new(key, digestmod=hashlib.sha256) if key else None

    def add_headers(
        self, add: Callable[[str, str], None], msg_id: str, timestamp: int, body: bytes
    ) -> None:
        """Pass `webhook-id`, `webhook-timestamp` and, with a key, both signatures to `add`."""
        add("webhook-id", msg_id)
        add("webhook-timestamp", str(timestamp))
        if self._mac is None:
            return
        v1 = self._mac.copy()
        v1.update(f"{msg_id}.{timestamp}.".encode())
        v1.update(body)
        add("webhook-signature", "v1," + base64.b64encode(v1.digest()).decode())
        plain = self._mac.copy()
        plain.update(body)
        add("X-FormCraft-Signature", "sha256=" + plain.hexdigest())


def _signer(secret: str) -> _Signer:
    """The signer for a secret: cached (a form's secret recurs on every submission).

    An invalid secret raises ValueError each time; failures are not cached.
    """
    if len(secret) > _CACHEABLE_CHARS:
        return _new_signer(secret)
    return _cached_signer(secret)


def _new_signer(secret: str) -> _Signer:
    """A signer keyed with `secret`; ValueError if it is not a valid secret."""
    return _Signer(signing_key(secret))


_cached_signer = functools.lru_cache(maxsize=_CACHE_ENTRIES)(_new_signer)


@dataclass(frozen=True, slots=True)
class _Target:
    """What a job's URL string yields, worked out once per distinct string."""

    url: URL | None  # None: not a valid URL
    origin: str  # for reasons and logs: no userinfo, path or query
    breaker_key: str
    host: str  # the raw host, for the IP-literal check
    literal: bool  # an IP literal: aiohttp connects to it without resolving


def _target(raw: str) -> _Target:
    """The parsed target of `raw`: cached (every job of a form goes to one URL)."""
    if len(raw) > _CACHEABLE_CHARS:
        return _parse_target(raw)
    return _cached_target(raw)


def _parse_target(raw: str) -> _Target:
    """Parse `raw` once into everything a delivery and its breaker need."""
    try:
        url = URL(raw)
    except ValueError:
        return _Target(None, "", _INVALID_KEY, "", literal=False)
    key = _breaker_key_of(url)
    try:
        origin = str(url.origin())
    except ValueError:  # a breaker key but nothing to send to
        return _Target(None, "", key, "", literal=False)
    host = url.raw_host or ""
    # The test mirrors aiohttp's own (`":" in host` or digits and dots), so
    # every host aiohttp will not resolve is checked against the policy.
    literal = ":" in host or host.replace(".", "").isdigit()
    return _Target(url, origin, key, host, literal)


_cached_target = functools.lru_cache(maxsize=_CACHE_ENTRIES)(_parse_target)


def _breaker_key_of(url: URL) -> str:
    """`webhook:<host>:<port>` of a parsed URL, or the shared key of invalid ones."""
    try:
        host, port = url.raw_host, url.port
    except ValueError:
        return _INVALID_KEY
    if not host:
        return _INVALID_KEY
    host = host.lower()
    return f"webhook:[{host}]:{port}" if ":" in host else f"webhook:{host}:{port}"


class _Pool:
    """One keep-alive ClientSession whose connector is bound to one policy."""

    def __init__(self, policy: NetworkPolicy, concurrency: int) -> None:
        self.policy = policy
        self.inflight = 0
        self.resolver = GuardedResolver(policy)
        # No per-host limit: the consumer's limiter already bounds concurrency. The
        # DNS cache only ever holds answers the resolver has checked.
        connector = aiohttp.TCPConnector(
            limit=max(100, concurrency * 2),
            limit_per_host=0,
            ttl_dns_cache=10,
            resolver=self.resolver,
        )
        self.session = aiohttp.ClientSession(
            connector=connector, trust_env=False, cookie_jar=aiohttp.DummyCookieJar()
        )

    async def aclose(self) -> None:
        """Close the session, then the resolver it used."""
        await self.session.close()
        await self.resolver.close()


# --- the handler -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Settings:
    """What a reload may change, swapped in one assignment."""

    timeout_s: float
    max_response_bytes: int
    policy: NetworkPolicy
    concurrency: int
    # total bounds the whole exchange: waiting for a pooled connection,
    # resolving, connecting, sending and reading the response, body included
    # (every body read checks it), so a receiver dribbling bytes cannot stretch
    # a request past timeout_ms. sock_connect and sock_read (restarted by each
    # chunk received) start later, so they never fire first: a second line.
    # aiohttp rounds total and sock_connect deadlines of 5 s or more up to the
    # next whole second of the loop clock; an infinite ceil_threshold turns
    # that off, so a request ends at timeout_ms, not up to a second later.
    client_timeout: aiohttp.ClientTimeout

    @classmethod
    def from_config(cls, config: WebhookWorkerConfig) -> _Settings:
        t = config.timeout_ms / 1000
        return cls(
            t,
            config.max_response_bytes,
            NetworkPolicy.from_config(config),
            config.concurrency,
            aiohttp.ClientTimeout(total=t, sock_connect=t, sock_read=t, ceil_threshold=math.inf),
        )


@dataclass(slots=True)
class _Request:
    """One job's request, built once and not changed afterwards.

    Not frozen: a frozen dataclass's `__init__` costs several times as much,
    once per job. Headers, body and secret stay out of its repr.
    """

    method: str
    url: URL
    origin: str  # for reasons and logs: no userinfo, path or query
    headers: dict[str, str] = field(repr=False)
    body: bytes = field(repr=False)
    secret: str = field(repr=False)
    payload_headers: dict[str, str] = field(repr=False)

    def sensitive(self) -> tuple[str, ...]:
        """What a receiver might echo back that must not leak through a snippet.

        The secret (with and without `whsec_`), both signatures and every
        payload header value of 8 characters or more. Built only when a
        response has a body to mask.
        """
        signatures = [
            value.split(",", 1)[-1].removeprefix("sha256=")
            for name in _SIGNATURE_HEADERS
            if (value := self.headers.get(name)) is not None
        ]
        long_values = [v for v in self.payload_headers.values() if len(v) >= 8]
        return (self.secret, self.secret.removeprefix("whsec_"), *signatures, *long_values)


@dataclass(slots=True)
class _Response:
    status: int
    retry_after: str | None
    head: bytes


class WebhookHandler:
    """Delivers webhook jobs over one shared keep-alive session."""

    kind = "webhook"
    job_type = WebhookJob
    batching = False

    def __init__(
        self, config: WebhookWorkerConfig, *, user_agent: str, emit: Emit | None = None
    ) -> None:
        self._settings = _Settings.from_config(config)
        self._user_agent = user_agent
        self._pool: _Pool | None = None
        self._retired: list[_Pool] = []

    async def start(self) -> None:
        """Open the shared session."""
        if self._pool is None:
            self._pool = _Pool(self._settings.policy, self._settings.concurrency)

    async def aclose(self) -> None:
        """Close every session, newest first, logging and continuing on errors."""
        pools = ([self._pool] if self._pool else []) + self._retired[::-1]
        self._pool, self._retired = None, []
        for pool in pools:
            try:
                await pool.aclose()
            except Exception:
                log.exception("closing a webhook session failed")

    def prefetch(self, concurrency: int) -> int:
        """A second round of jobs ready while one runs."""
        return concurrency * 2

    def reconfigure(self, config: WebhookWorkerConfig) -> None:
        """Swap in new live settings; raises :class:`ConfigError` and changes nothing if bad."""
        self._settings = _Settings.from_config(config)

    def breaker_key(self, job: WebhookJob) -> str:
        """`webhook:<host>:<port>` of the job's URL."""
        return _target(job.payload.url).breaker_key

    async def handle(self, job: WebhookJob, ctx: JobContext) -> Delivered:
        """Deliver once: return on 2xx, else raise PermanentFailure or RetryLater."""
        settings = self._settings  # one read: a reload mid-request does not mix settings
        request = self._build(job, ctx, settings.policy)
        pool = self._pool_for(settings)
        pool.inflight += 1
        started = time.monotonic()
        try:
            response = await _send(pool.session, request, settings)
        finally:
            pool.inflight -= 1
            if self._retired:
                await self._close_idle_retired()
        log.debug(
            "%s %s -> %s in %.0f ms (job %s, attempt %d)",
            request.method,
            request.origin,
            response.status,
            (time.monotonic() - started) * 1000,
            ctx.job_id,
            ctx.attempt,
        )
        return _judge(response, request)

    def _pool_for(self, settings: _Settings) -> _Pool:
        """The session for the current policy; a changed policy gets a fresh one.

        Pooled keep-alive connections and cached DNS answers were checked under
        the old policy, so they retire with their session.
        """
        pool = self._pool
        if pool is None:
            raise RuntimeError("WebhookHandler.start() was not called")
        # The identity test settles the usual case without comparing networks.
        if pool.policy is not settings.policy and pool.policy != settings.policy:
            self._retired.append(pool)
            pool = self._pool = _Pool(settings.policy, settings.concurrency)
        return pool

    async def _close_idle_retired(self) -> None:
        idle = [pool for pool in self._retired if pool.inflight == 0]
        self._retired = [pool for pool in self._retired if pool.inflight > 0]
        for pool in idle:
            try:
                await pool.aclose()
            except Exception:
                log.exception("closing a retired webhook session failed")

    def _build(self, job: WebhookJob, ctx: JobContext, policy: NetworkPolicy) -> _Request:
        """Validate the target and assemble the signed request; no I/O."""
        payload = job.payload
        target = _target(payload.url)
        url = target.url
        if url is None:
            raise PermanentFailure(
                "VALIDATION_ERROR", "payload.url is not a valid URL", reached_service=False
            )
        if target.literal:
            _check_literal_host(target, policy)
        try:
            signer = _signer(payload.secret)
            body = encode_body(payload.body)
            headers = _payload_headers(payload.headers)
        except ValueError as exc:
            raise PermanentFailure("VALIDATION_ERROR", str(exc), reached_service=False) from None
        msg_id = webhook_id(ctx.job_id, payload.url)
        signer.add_headers(headers.__setitem__, msg_id, int(time.time()), body)
        headers["User-Agent"] = self._user_agent
        return _Request(
            payload.method, url, target.origin, headers, body, payload.secret, payload.headers
        )


def _payload_headers(given: dict[str, str]) -> dict[str, str]:
    """The job's headers minus those we own; Content-Type defaults to JSON."""
    if not given:  # the usual case
        return {"Content-Type": "application/json"}
    headers: dict[str, str] = {}
    typed = False
    for name, value in given.items():
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"payload.headers has an invalid header name {name[:64]!r}")
        lowered = name.lower()
        if lowered not in _NOT_FROM_PAYLOAD:
            headers[name] = value
            typed = typed or lowered == "content-type"
    if not typed:
        headers["Content-Type"] = "application/json"
    return headers


def _check_literal_host(target: _Target, policy: NetworkPolicy) -> None:
    """Refuse an IP-literal host up front: aiohttp connects to those without resolving.

    Host names are left to GuardedResolver, which checks what they resolve to.
    """
    verdict = _literal_verdict(target.host, policy)
    if verdict == "invalid":
        raise PermanentFailure(
            "VALIDATION_ERROR",
            f"{target.origin}: host is not a canonical IP address",
            reached_service=False,
        )
    if verdict == "refused":
        raise PermanentFailure(
            "SSRF_BLOCKED",
            f"{target.origin}: {target.host} is a private or reserved address",
            reached_service=False,
        )


@functools.lru_cache(maxsize=_CACHE_ENTRIES)
def _literal_verdict(host: str, policy: NetworkPolicy) -> str:
    """ "ok", "refused" or "invalid" for an IP-literal host (cached: the same hosts recur)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return "invalid"
    return "ok" if policy.permits(ip) else "refused"


async def _send(
    session: aiohttp.ClientSession, request: _Request, settings: _Settings
) -> _Response:
    """Send the request and read the head of the response; translate transport errors.

    aiohttp's total timeout (see `_Settings.client_timeout`) is the only
    deadline: it covers every step of the exchange up to and including the
    last body read, and leaving the block cancels any unfinished upload
    before the connection is closed, so no outer timeout is needed.
    """
    try:
        async with session.request(
            request.method,
            request.url,
            data=request.body,
            headers=request.headers,
            allow_redirects=False,
            timeout=settings.client_timeout,
        ) as resp:
            head = await _read_head(resp, settings.max_response_bytes)
            return _Response(resp.status, resp.headers.get("Retry-After"), head)
    except AddressRefused as exc:
        raise PermanentFailure(
            "SSRF_BLOCKED", f"{request.origin}: {exc}", reached_service=False
        ) from None
    except TimeoutError:
        raise RetryLater(
            f"{request.origin}: no answer within {settings.timeout_s * 1000:.0f} ms"
        ) from None
    except aiohttp.InvalidURL:
        raise PermanentFailure(
            "VALIDATION_ERROR", f"{request.origin}: invalid URL", reached_service=False
        ) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise RetryLater(f"{request.origin}: {_describe(exc)}") from None


async def _read_head(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """Read at most `limit` bytes of the body, keeping only the first few.

    The status already decides the outcome, so a body that stalls or breaks
    off only shortens the snippet. An unread rest makes aiohttp close the
    connection instead of returning it to the pool.
    """
    head = bytearray()
    remaining = limit
    content = resp.content
    try:
        # at_eof() spares the read that would only return b"" after a body
        # that arrived whole (and every read of an empty one).
        while remaining > 0 and not content.at_eof():
            chunk = await content.read(min(_READ_CHUNK, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            head += chunk[: max(0, _SNIPPET_BYTES - len(head))]
    except (TimeoutError, aiohttp.ClientError, OSError):
        pass
    return bytes(head)


def _describe(exc: BaseException) -> str:
    """A short name for a transport error; aiohttp's messages may quote the full URL."""
    os_error = getattr(exc, "os_error", exc)
    strerror = getattr(os_error, "strerror", None)
    return f"{type(exc).__name__} ({strerror})" if strerror else type(exc).__name__


def _judge(response: _Response, request: _Request) -> Delivered:
    """What was delivered on 2xx; raise the job's fate otherwise."""
    status = response.status
    head = response.head
    if 200 <= status < 300:
        # Described only if a delivery event asks: most successes never are.
        return Delivered(
            status, describe=lambda: _snippet(head, request.sensitive()) if head else ""
        )
    snippet = _snippet(head, request.sensitive()) if head else ""
    reason = f"HTTP {status} from {request.origin}"
    if 300 <= status < 400:
        reason += " (redirects are not followed)"
    if snippet:
        reason += f": {snippet}"
    if status in _RETRYABLE or 500 <= status < 600:
        raise RetryLater(
            reason, after=parse_retry_after(response.retry_after), status=status, snippet=snippet
        )
    raise PermanentFailure("HTTP_STATUS", reason, status=status, snippet=snippet)


def _snippet(head: bytes, sensitive: tuple[str, ...]) -> str:
    """The start of a response body on one line, with anything we sent that is secret masked."""
    text = head.decode("utf-8", errors="replace")
    for secret in sensitive:
        if secret:
            text = text.replace(secret, "[redacted]")
    return " ".join(text.split())[:_SNIPPET_CHARS]


if TYPE_CHECKING:

    def _conforms(handler: WebhookHandler) -> Handler[WebhookJob]:
        return handler
