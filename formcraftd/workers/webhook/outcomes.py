"""What an answer, or a request that got none, means for a webhook job.

2xx is delivered; 408, 425, 429 (`RATE_LIMITED`) and 5xx are retried as
`HTTP_STATUS`; every other status is dead-lettered as `HTTP_STATUS`. A request
that got no answer is retried with the code of what went wrong (`TIMEOUT`,
`CONNECTION_ERROR`, `DNS_ERROR`, `TLS_ERROR`, `PROXY_ERROR`). A 410 Gone also
yields `webhook.endpoint_gone` for the app. Reasons name only the URL's origin,
and response snippets have whatever secret the request carried masked.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass

import aiohttp

from formcraftd.core.errors import PermanentFailure, RetryCode, RetryLater
from formcraftd.core.events import EndpointGoneEvent, now
from formcraftd.core.handler import Delivered, JobContext
from formcraftd.core.jobs import WebhookJob
from formcraftd.core.redaction import mask_url, redact
from formcraftd.core.retry import parse_retry_after
from formcraftd.core.text import one_line
from formcraftd.workers.webhook.egress import EgressProxy
from formcraftd.workers.webhook.request import WebhookRequest
from formcraftd.workers.webhook.targets import host_and_port, target_of

SNIPPET_CHARS = 512
SNIPPET_BYTES = SNIPPET_CHARS * 4  # enough UTF-8 for 512 characters
_RETRYABLE = frozenset({408, 425, 429})


@dataclass(slots=True)
class Response:
    status: int
    retry_after: str | None
    head: bytes
    from_proxy: bool = False  # an error the proxy wrote itself (plain http through it)


def transport_failure(exc: BaseException, origin: str, proxy: EgressProxy | None) -> RetryLater:
    """The retry of a request that got no HTTP answer from the destination."""
    if isinstance(exc, aiohttp.ClientHttpProxyError):  # the proxy refused CONNECT (https)
        return proxy_failure(f"{origin}: the egress proxy answered {exc.status} to CONNECT")
    code = _transport_code(exc)
    if (
        proxy is not None
        and isinstance(exc, aiohttp.ClientConnectorError)
        and exc.host.lower() == proxy.host
    ):
        code = "PROXY_ERROR"  # e.g. the proxy's host name does not resolve
    if code == "PROXY_ERROR":
        return proxy_failure(f"{origin}: the egress proxy: {describe(exc)}")
    return RetryLater(code, f"{origin}: {describe(exc)}")


def proxy_failure(reason: str, status: int | None = None) -> RetryLater:
    """PROXY_ERROR, retried, and not held against the destination's breaker.

    A proxy outage would otherwise open every destination's breaker and
    report each endpoint as failing.
    """
    return RetryLater("PROXY_ERROR", reason, status=status, counts_for_breaker=False)


# aiohttp 3.11+ raises ClientConnectorDNSError for a failed lookup; older ones a
# ClientConnectorError around the resolver's socket.gaierror.
_DNS_ERRORS: tuple[type[BaseException], ...] = tuple(
    error for error in (getattr(aiohttp, "ClientConnectorDNSError", None),) if error is not None
)


def _transport_code(exc: BaseException) -> RetryCode:
    """The error code of a request that got no HTTP answer (aiohttp's public exceptions)."""
    if isinstance(exc, aiohttp.ClientProxyConnectionError | aiohttp.ClientHttpProxyError):
        return "PROXY_ERROR"
    # Under TLS 1.3 a receiver refuses a (missing) client certificate after the
    # handshake: its alert ends the first read, as a ClientOSError from an SSLError.
    tls = (aiohttp.ClientSSLError, aiohttp.ServerFingerprintMismatch, ssl.SSLError)
    if isinstance(exc, tls) or isinstance(exc.__cause__, ssl.SSLError):
        return "TLS_ERROR"
    if isinstance(exc, _DNS_ERRORS) or (
        isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, socket.gaierror)
    ):
        return "DNS_ERROR"
    return "CONNECTION_ERROR"


def describe(exc: BaseException) -> str:
    """A short name for a transport error; aiohttp's messages may quote the full URL."""
    os_error = getattr(exc, "os_error", exc)
    strerror = getattr(os_error, "strerror", None)
    return f"{type(exc).__name__} ({strerror})" if strerror else type(exc).__name__


def gone(job: WebhookJob, ctx: JobContext) -> EndpointGoneEvent:
    """`webhook.endpoint_gone` for a 410: the app may disable the integration."""
    where = host_and_port(target_of(job.payload.url).breaker_key)
    assert where is not None, "a request was sent, so the URL is valid"
    host, port = where
    return EndpointGoneEvent(
        url=mask_url(job.payload.url),
        host=host,
        port=port,
        job_id=ctx.job_id,
        form_id=job.metadata.form_id,
        submission_id=job.metadata.submission_id,
        at=now(),
    )


def judge(response: Response, request: WebhookRequest) -> Delivered:
    """What was delivered on 2xx; raise the job's fate otherwise."""
    status = response.status
    head = response.head
    if response.from_proxy:
        # Retried like a proxy that cannot be reached, whatever the status.
        raise proxy_failure(f"the egress proxy answered HTTP {status} for {request.origin}", status)
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
            "RATE_LIMITED" if status == 429 else "HTTP_STATUS",
            reason,
            after=parse_retry_after(response.retry_after),
            status=status,
            snippet=snippet,
        )
    raise PermanentFailure("HTTP_STATUS", reason, status=status, snippet=snippet)


def _snippet(head: bytes, sensitive: tuple[str, ...]) -> str:
    """The start of a response body on one line, with anything we sent that is secret masked."""
    text = head.decode("utf-8", errors="replace")
    for secret in sensitive:
        text = text.replace(secret, "[redacted]")
    return one_line(redact(text), SNIPPET_CHARS)
