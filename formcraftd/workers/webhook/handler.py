"""The webhook worker: signed HTTP delivery of `webhook.send` jobs.

A job is one request (Standard Webhooks signing, no redirects, a bounded
response read). 2xx returns; network errors, timeouts, 408/425/429 and 5xx
raise :class:`RetryLater`; every other status raises :class:`PermanentFailure`.

The SSRF guard checks the address that is actually connected: hostnames go
through the resolver of :mod:`~formcraftd.workers.webhook.netguard`, which
drops refused addresses before the connector sees them; IP literals (which
aiohttp never resolves) are checked by :mod:`~formcraftd.workers.webhook.targets`
before the request. Reasons name only the URL's origin, never its path or query
(webhook URLs often carry tokens there), and never a secret or signature.

With `proxy_url`, requests not in `no_proxy` go through the egress proxy
(:mod:`~formcraftd.workers.webhook.egress`); `[[workers.webhook.tls]]` entries
give a host its own SSL context (:mod:`~formcraftd.workers.webhook.tls`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp

from formcraftd.core.config import WebhookWorkerConfig
from formcraftd.core.errors import PermanentFailure, RetryLater
from formcraftd.core.events import Emit
from formcraftd.core.handler import Delivered, JobContext
from formcraftd.core.jobs import WebhookJob
from formcraftd.core.redaction import mask_url
from formcraftd.core.retry import parse_retry_after
from formcraftd.core.text import one_line
from formcraftd.workers.webhook.egress import EgressProxy, is_proxy_answer
from formcraftd.workers.webhook.netguard import AddressRefused, GuardedResolver, NetworkPolicy
from formcraftd.workers.webhook.outcomes import (
    SNIPPET_BYTES,
    Response,
    describe,
    gone,
    judge,
    transport_failure,
)
from formcraftd.workers.webhook.rates import destination_limits, reconfigure_limits
from formcraftd.workers.webhook.request import WebhookRequest, encode_body, payload_headers
from formcraftd.workers.webhook.signing import signer_for, webhook_id
from formcraftd.workers.webhook.targets import check_literal_host, target_of
from formcraftd.workers.webhook.tls import TlsContexts

if TYPE_CHECKING:
    from formcraftd.core.handler import Handler

__all__ = ["WebhookHandler"]

log = logging.getLogger("formcraftd.webhook")

_READ_CHUNK = 65_536
_SLOW_DOWN = frozenset({429, 503})  # answers that lower the destination's rate


class _Pool:
    """One keep-alive ClientSession whose connector is bound to one policy and proxy."""

    def __init__(
        self, policy: NetworkPolicy, concurrency: int, proxy: tuple[str, int] | None
    ) -> None:
        self.policy = policy
        self.proxy = proxy
        self.inflight = 0
        # The proxy's own address is the operator's choice: the guard lets it through.
        self.resolver = GuardedResolver(policy, exempt=proxy)
        # No per-host limit: the consumer's limiter already bounds concurrency. The
        # DNS cache only ever holds answers the resolver has checked.
        connector = aiohttp.TCPConnector(
            limit=max(100, concurrency * 2),
            limit_per_host=0,
            ttl_dns_cache=10,
            resolver=self.resolver,
        )
        # trust_env=False: HTTP(S)_PROXY and NO_PROXY are never read; only proxy_url.
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
    proxy: EgressProxy | None
    tls: TlsContexts
    # total bounds the whole exchange: waiting for a pooled connection,
    # resolving, connecting, sending and reading the response, body included
    # (every body read checks it), so a receiver dribbling bytes cannot stretch
    # a request past timeout_ms. It is the only deadline: sock_connect and
    # sock_read would start later and so never fire first, while sock_read
    # costs a timer reset per chunk received. aiohttp rounds a total of 5 s or
    # more up to the next whole second of the loop clock; an infinite
    # ceil_threshold turns that off, so a request ends at timeout_ms.
    client_timeout: aiohttp.ClientTimeout

    @classmethod
    def from_config(cls, config: WebhookWorkerConfig) -> _Settings:
        t = config.timeout_ms / 1000
        return cls(
            t,
            config.max_response_bytes,
            NetworkPolicy.from_config(config),
            config.concurrency,
            EgressProxy.from_config(config),
            TlsContexts.from_config(config),
            aiohttp.ClientTimeout(total=t, ceil_threshold=math.inf),
        )

    @property
    def proxy_endpoint(self) -> tuple[str, int] | None:
        """The proxy's (host, port), which the SSRF guard lets through."""
        return None if self.proxy is None else (self.proxy.host, self.proxy.port)


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
        self._emit = emit
        self.rate_limits = destination_limits(config)
        self._pool: _Pool | None = None
        self._retired: list[_Pool] = []

    async def start(self) -> None:
        """Open the shared session."""
        if self._pool is None:
            settings = self._settings
            self._pool = _Pool(settings.policy, settings.concurrency, settings.proxy_endpoint)

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

    @staticmethod
    def check(config: WebhookWorkerConfig) -> None:
        """Raise :class:`ConfigError` if `config` cannot be used (check-config, start, reload)."""
        _Settings.from_config(config)

    def prepare(self, config: WebhookWorkerConfig) -> Callable[[], None]:
        """Validate and build new live settings; the returned call swaps them in."""
        settings = _Settings.from_config(config)

        def apply() -> None:
            self._settings = settings
            reconfigure_limits(self.rate_limits, config)

        return apply

    def reconfigure(self, config: WebhookWorkerConfig) -> None:
        """Swap in new live settings; raises :class:`ConfigError` and changes nothing if bad."""
        self.prepare(config)()

    def breaker_key(self, job: WebhookJob) -> str:
        """`webhook:<host>:<port>` of the job's URL."""
        return target_of(job.payload.url).breaker_key

    async def handle(self, job: WebhookJob, ctx: JobContext) -> Delivered:
        """Deliver once: return on 2xx, else raise PermanentFailure or RetryLater."""
        settings = self._settings  # one read: a reload mid-request does not mix settings
        request = self._build(job, ctx, settings.policy)
        pool = self._pool_for(settings)
        pool.inflight += 1
        started = time.monotonic()
        # The span's traceparent goes to the receiver: the signature covers only
        # the id, the timestamp and the body, so a header added here is safe.
        try:
            with ctx.trace.client(
                request.method, lambda: _span_attributes(request), carrier=request.headers
            ) as span:
                response = await _send(pool, request, settings)
                span.set_attribute("http.response.status_code", response.status)
                if response.status >= 400:
                    span.failed(str(response.status))
        finally:
            pool.inflight -= 1
            if self._retired:
                await self._close_idle_retired()
        if response.status in _SLOW_DOWN:
            self.rate_limits.slow_down(
                self.breaker_key(job),
                status=response.status,
                retry_after_s=parse_retry_after(response.retry_after),
            )
        log.debug(
            "%s %s -> %s in %.0f ms (job %s, attempt %d)",
            request.method,
            request.origin,
            response.status,
            (time.monotonic() - started) * 1000,
            ctx.job_id,
            ctx.attempt,
        )
        if response.status == 410 and self._emit is not None:
            self._emit(gone(job, ctx))
        return judge(response, request)

    def _pool_for(self, settings: _Settings) -> _Pool:
        """The session for the current policy; a changed policy gets a fresh one.

        Pooled keep-alive connections and cached DNS answers were checked under
        the old policy (and its proxy exemption), so they retire with their session.
        """
        pool = self._pool
        if pool is None:
            raise RuntimeError("WebhookHandler.start() was not called")
        # The identity test settles the usual case without comparing networks.
        proxy = settings.proxy_endpoint
        if (pool.policy is not settings.policy and pool.policy != settings.policy) or (
            pool.proxy != proxy
        ):
            self._retired.append(pool)
            pool = self._pool = _Pool(settings.policy, settings.concurrency, proxy)
        return pool

    async def _close_idle_retired(self) -> None:
        idle = [pool for pool in self._retired if pool.inflight == 0]
        self._retired = [pool for pool in self._retired if pool.inflight > 0]
        for pool in idle:
            try:
                await pool.aclose()
            except Exception:
                log.exception("closing a retired webhook session failed")

    def _build(self, job: WebhookJob, ctx: JobContext, policy: NetworkPolicy) -> WebhookRequest:
        """Validate the target and assemble the signed request; no I/O."""
        payload = job.payload
        target = target_of(payload.url)
        url = target.url
        if url is None:
            raise PermanentFailure(
                "VALIDATION_ERROR", "payload.url is not a valid URL", reached_service=False
            )
        if target.literal:
            check_literal_host(target, policy)
        try:
            signer = signer_for(payload.secret)
            body = encode_body(payload.body)
            headers = payload_headers(payload.headers)
        except ValueError as exc:
            raise PermanentFailure("VALIDATION_ERROR", str(exc), reached_service=False) from None
        if url.raw_user is not None and any(n.lower() == "authorization" for n in headers):
            raise PermanentFailure(
                "VALIDATION_ERROR",
                "payload.url carries credentials and payload.headers an Authorization header; "
                "give one of them",
                reached_service=False,
            )
        msg_id = webhook_id(ctx.job_id, payload.url)
        signer.add_headers(headers.__setitem__, msg_id, int(time.time()), body)
        headers["User-Agent"] = self._user_agent
        return WebhookRequest(
            payload.method, url, target.origin, headers, body, payload.secret, payload.headers
        )


async def _send(pool: _Pool, request: WebhookRequest, settings: _Settings) -> Response:
    """Send the request and read the head of the response; translate transport errors.

    aiohttp's total timeout (see `_Settings.client_timeout`) is the only
    deadline: it covers every step of the exchange up to and including the
    last body read, and leaving the block cancels any unfinished upload
    before the connection is closed, so no outer timeout is needed.
    """
    url = request.url
    host = url.raw_host or ""
    proxy, headers = _route(request, settings.proxy)
    try:
        if proxy is not None:
            await pool.resolver.check_host(host)
        async with pool.session.request(
            request.method,
            url,
            data=request.body,
            headers=headers,
            allow_redirects=False,
            timeout=settings.client_timeout,
            proxy=None if proxy is None else proxy.url,
            ssl=settings.tls.for_host(host) or True,
        ) as resp:
            head = await _read_head(resp, settings.max_response_bytes)
            from_proxy = (
                proxy is not None
                and url.scheme == "http"
                and is_proxy_answer(resp.status, resp.headers)
            )
            return Response(resp.status, resp.headers.get("Retry-After"), head, from_proxy)
    except AddressRefused as exc:
        raise PermanentFailure(
            "SSRF_BLOCKED", f"{request.origin}: {exc}", reached_service=False
        ) from None
    except TimeoutError:
        raise RetryLater(
            "TIMEOUT", f"{request.origin}: no answer within {settings.timeout_s * 1000:.0f} ms"
        ) from None
    except aiohttp.InvalidURL:
        raise PermanentFailure(
            "VALIDATION_ERROR", f"{request.origin}: invalid URL", reached_service=False
        ) from None
    except aiohttp.ClientSSLError as exc:  # a certificate error is a ValueError too
        raise RetryLater("TLS_ERROR", f"{request.origin}: {describe(exc)}") from None
    except ValueError as exc:  # what the client refuses to send, e.g. a header it cannot frame
        raise PermanentFailure(
            "VALIDATION_ERROR",
            f"{request.origin}: the request cannot be sent: {one_line(exc)}",
            reached_service=False,
        ) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise transport_failure(exc, request.origin, proxy) from None


def _route(
    request: WebhookRequest, proxy: EgressProxy | None
) -> tuple[EgressProxy | None, dict[str, str]]:
    """The proxy this request goes through (None: direct) and the headers to send."""
    url = request.url
    if proxy is None or not proxy.used_for(url.raw_host or "", url.port or 0):
        return None, request.headers
    if url.scheme == "http":
        # A fresh proxy connection per plain-http request: some proxies check,
        # and strip Proxy-Authorization from, only the first request of a
        # connection (proxy.py 2.4 relays later ones as they are).
        return proxy, {**request.headers, "Connection": "close"}
    return proxy, request.headers


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
            head += chunk[: max(0, SNIPPET_BYTES - len(head))]
    except (TimeoutError, aiohttp.ClientError, OSError):
        pass
    return bytes(head)


def _span_attributes(request: WebhookRequest) -> dict[str, str | int]:
    """The HTTP client span's attributes; the URL's path and query may hold tokens."""
    url = request.url
    return {
        "http.request.method": request.method,
        "server.address": url.host or "",
        "server.port": url.port or 0,
        "url.full": mask_url(str(url), hide_path=True),
    }


if TYPE_CHECKING:

    def _conforms(handler: WebhookHandler) -> Handler[WebhookJob]:
        return handler
