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

import asyncio
import base64
import functools
import hashlib
import hmac
import ipaddress
import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from yarl import URL

from formcraftd.config import WebhookWorkerConfig
from formcraftd.errors import PermanentFailure, RetryLater
from formcraftd.jobs import Delivered, JobContext, WebhookJob
from formcraftd.netguard import AddressRefused, GuardedResolver, NetworkPolicy
from formcraftd.retry import parse_retry_after

if TYPE_CHECKING:
    from formcraftd.jobs import Handler

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
_BACKSTOP_S = 0.5  # aiohttp's own total timeout should always fire first
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
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(timestamp)}
    if key:
        signed = f"{msg_id}.{timestamp}.".encode() + body
        v1 = base64.b64encode(hmac.digest(key, signed, hashlib.sha256)).decode()
        headers["webhook-signature"] = f"v1,{v1}"
        headers["X-FormCraft-Signature"] = "sha256=" + hmac.new(key, body, "sha256").hexdigest()
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
    try:
        parsed = URL(url)
        host, port = parsed.raw_host, parsed.port
    except ValueError:
        return "webhook:invalid-url"
    if not host:
        return "webhook:invalid-url"
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
    # sock_read bounds each read and total bounds the whole exchange, body
    # included, so a receiver dribbling bytes cannot stretch it past timeout_ms.
    client_timeout: aiohttp.ClientTimeout

    @classmethod
    def from_config(cls, config: WebhookWorkerConfig) -> _Settings:
        t = config.timeout_ms / 1000
        return cls(
            t,
            config.max_response_bytes,
            NetworkPolicy.from_config(config),
            config.concurrency,
            aiohttp.ClientTimeout(total=t, sock_connect=t, sock_read=t),
        )


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    url: URL
    origin: str  # for reasons and logs: no userinfo, path or query
    headers: dict[str, str]
    body: bytes
    sensitive: tuple[str, ...]  # strings a receiver might echo back that must not leak


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    retry_after: str | None
    head: bytes


class WebhookHandler:
    """Delivers webhook jobs over one shared keep-alive session."""

    kind = "webhook"
    job_type = WebhookJob
    batching = False

    def __init__(self, config: WebhookWorkerConfig, *, user_agent: str) -> None:
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
        return breaker_key(job.payload.url)

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
        if self._pool is None:
            raise RuntimeError("WebhookHandler.start() was not called")
        if self._pool.policy != settings.policy:
            self._retired.append(self._pool)
            self._pool = _Pool(settings.policy, settings.concurrency)
        return self._pool

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
        url, origin = _parse_target(payload.url)
        _check_literal_host(url, origin, policy)
        try:
            key = signing_key(payload.secret)
            body = encode_body(payload.body)
            headers = _payload_headers(payload.headers)
        except ValueError as exc:
            raise PermanentFailure("VALIDATION_ERROR", str(exc), reached_service=False) from None
        signed = sign(key, webhook_id(ctx.job_id, payload.url), int(time.time()), body)
        headers |= signed
        headers["User-Agent"] = self._user_agent
        # A receiver may echo the request back; the snippet must not carry it out.
        signatures = [
            v.split(",", 1)[-1].removeprefix("sha256=")
            for k, v in signed.items()
            if "signature" in k.lower()
        ]
        long_values = [v for v in payload.headers.values() if len(v) >= 8]
        sensitive = (
            payload.secret,
            payload.secret.removeprefix("whsec_"),
            *signatures,
            *long_values,
        )
        return _Request(payload.method, url, origin, headers, body, sensitive)


def _payload_headers(given: dict[str, str]) -> dict[str, str]:
    """The job's headers minus those we own; Content-Type defaults to JSON."""
    for name in given:
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"payload.headers has an invalid header name {name[:64]!r}")
    headers = {k: v for k, v in given.items() if k.lower() not in _NOT_FROM_PAYLOAD}
    if not any(k.lower() == "content-type" for k in headers):
        headers["Content-Type"] = "application/json"
    return headers


def _parse_target(raw: str) -> tuple[URL, str]:
    """The URL to request and its printable origin; a malformed one is invalid."""
    try:
        url = URL(raw)
        origin = str(url.origin())
    except ValueError:
        raise PermanentFailure(
            "VALIDATION_ERROR", "payload.url is not a valid URL", reached_service=False
        ) from None
    return url, origin


def _check_literal_host(url: URL, origin: str, policy: NetworkPolicy) -> None:
    """Refuse an IP-literal host up front: aiohttp connects to those without resolving.

    The test mirrors aiohttp's own (`":" in host` or digits and dots), so
    every host aiohttp will not resolve is checked here.
    """
    host = url.raw_host or ""
    if ":" not in host and not host.replace(".", "").isdigit():
        return  # a name: GuardedResolver checks what it resolves to
    verdict = _literal_verdict(host, policy)
    if verdict == "invalid":
        raise PermanentFailure(
            "VALIDATION_ERROR",
            f"{origin}: host is not a canonical IP address",
            reached_service=False,
        )
    if verdict == "refused":
        raise PermanentFailure(
            "SSRF_BLOCKED",
            f"{origin}: {host} is a private or reserved address",
            reached_service=False,
        )


@functools.lru_cache(maxsize=4096)
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
    """Send the request and read the head of the response; translate transport errors."""
    t = settings.timeout_s
    timeout = settings.client_timeout
    try:
        async with asyncio.timeout(t + _BACKSTOP_S):
            async with session.request(
                request.method,
                request.url,
                data=request.body,
                headers=request.headers,
                allow_redirects=False,
                timeout=timeout,
            ) as resp:
                head = await _read_head(resp, settings.max_response_bytes)
                return _Response(resp.status, resp.headers.get("Retry-After"), head)
    except AddressRefused as exc:
        raise PermanentFailure(
            "SSRF_BLOCKED", f"{request.origin}: {exc}", reached_service=False
        ) from None
    except TimeoutError:
        raise RetryLater(f"{request.origin}: no answer within {t * 1000:.0f} ms") from None
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
    try:
        while remaining > 0:
            chunk = await resp.content.read(min(_READ_CHUNK, remaining))
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
    snippet = _snippet(response.head, request.sensitive)
    if 200 <= status < 300:
        return Delivered(status, snippet)
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
