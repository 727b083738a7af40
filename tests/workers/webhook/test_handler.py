"""Tests for the webhook handler, against real aiohttp receivers on loopback."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
import uvloop
from aiohttp import web

from formcraftd.core.config import WebhookWorkerConfig
from formcraftd.core.errors import ConfigError, PermanentFailure, RetryLater
from formcraftd.workers.webhook import WebhookHandler
from formcraftd.workers.webhook import signing as signing_module
from formcraftd.workers.webhook import targets as targets_module
from tests.workers.webhook.support import (
    LOOPBACK_ONLY,
    WHSEC,
    Behaviour,
    Receiver,
    ctx,
    job,
    started_handler,
)

pytestmark = [pytest.mark.webhook, pytest.mark.timeout(10)]

QUICK_TIMEOUT_MS = 300
# How long past its timeout a request may take to end. Generous, so a busy
# machine does not fail the suite: a request that nothing bounds runs into the
# test's own 10 s timeout instead.
SLACK_S = 1.0

OnConnect = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServers:
    """Raw asyncio TCP servers on 127.0.0.1; closing them cancels their connections' handlers."""

    def __init__(self) -> None:
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, on_connect: OnConnect) -> int:
        """Serve `on_connect` on a new port and return the port."""

        async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._tasks.add(task)
            try:
                await on_connect(reader, writer)
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(tracked, "127.0.0.1", 0)
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening, then end every connection still being served."""
        for server in self._servers:
            server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[OnConnect], Awaitable[int]]]:
    """Start raw asyncio TCP servers on 127.0.0.1 with a given connection callback."""
    servers = RawServers()
    try:
        yield servers.start
    finally:
        await servers.close()


@contextlib.contextmanager
def full_backlog() -> Iterator[int]:
    """A loopback port whose connects never complete.

    The listener's accept queue holds one connection, taken by a socket that
    is never accepted; Linux drops further SYNs while the queue is full, so a
    client waits for a SYN-ACK that never comes, as with a slow or lossy path.
    """
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        filler.connect(("127.0.0.1", port))
        yield port


def quick_config() -> WebhookWorkerConfig:
    """May reach 127.0.0.1, with a 300 ms timeout and a 1 KiB read cap."""
    return WebhookWorkerConfig(
        allowed_networks=LOOPBACK_ONLY, timeout_ms=QUICK_TIMEOUT_MS, max_response_bytes=1024
    )


@pytest.fixture
async def quick_handler() -> AsyncIterator[WebhookHandler]:
    """A handler with :func:`quick_config`."""
    h = await started_handler(quick_config())
    try:
        yield h
    finally:
        await h.aclose()


def respond(status: int, text: str = "", **headers: str) -> Behaviour:
    async def behaviour(_request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, text=text, headers=headers)

    return behaviour


# --- settings and caches -----------------------------------------------------------


async def test_reconfigure_with_a_bad_network_changes_nothing(
    receiver: Receiver, handler: WebhookHandler
) -> None:
    """A failed reconfigure raises and the previous settings keep delivering."""
    with pytest.raises(ConfigError):
        handler.reconfigure(WebhookWorkerConfig(allowed_networks=("nope",)))
    await handler.handle(job(receiver.url()), ctx())
    assert len(receiver.seen) == 1


async def test_url_and_secret_are_worked_out_once(
    receiver: Receiver, handler: WebhookHandler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many jobs to one URL with one secret parse the URL and decode the secret once."""
    parsed: list[str] = []
    decoded: list[str] = []
    real_url, real_signing_key = targets_module.URL, signing_module.signing_key

    def counting_url(raw: str) -> Any:
        parsed.append(raw)
        return real_url(raw)

    def counting_signing_key(secret: str) -> bytes:
        decoded.append(secret)
        return real_signing_key(secret)

    monkeypatch.setattr(targets_module, "URL", counting_url)
    monkeypatch.setattr(signing_module, "signing_key", counting_signing_key)
    url = receiver.url("/worked-out-once")  # a URL and secret no other test uses
    secret = "whsec_" + base64.b64encode(b"worked-out-once-key").decode()
    for i in range(3):
        the_job = job(url, body={"n": i}, secret=secret)
        assert handler.breaker_key(the_job) == f"webhook:127.0.0.1:{receiver.port}"
        await handler.handle(the_job, ctx(f"job-{i}"))
    assert parsed == [url] and decoded == [secret] and len(receiver.seen) == 3


# --- classification ----------------------------------------------------------------


async def test_200_is_success(receiver: Receiver, handler: WebhookHandler) -> None:
    """A 200 returns normally."""
    await handler.handle(job(receiver.url()), ctx())
    assert len(receiver.seen) == 1


async def test_204_is_success(receiver: Receiver, handler: WebhookHandler) -> None:
    """A 204 without a body returns normally, with an empty snippet."""
    receiver.behaviour = respond(204)
    delivered = await handler.handle(job(receiver.url(), secret=WHSEC), ctx())
    assert delivered.status == 204 and delivered.snippet == ""


async def test_500_retries_with_status(receiver: Receiver, handler: WebhookHandler) -> None:
    """A 500 raises RetryLater carrying the status and a body snippet."""
    receiver.behaviour = respond(500, "database\nis down")
    with pytest.raises(RetryLater) as info:
        await handler.handle(job(receiver.url()), ctx())
    assert info.value.status == 500 and info.value.after is None
    assert info.value.code == "HTTP_STATUS"
    assert "database is down" in info.value.reason and "\n" not in info.value.reason


async def test_429_retry_after_seconds(receiver: Receiver, handler: WebhookHandler) -> None:
    """A 429 with Retry-After: 7 retries after 7 seconds."""
    receiver.behaviour = respond(429, **{"Retry-After": "7"})
    with pytest.raises(RetryLater) as info:
        await handler.handle(job(receiver.url()), ctx())
    assert info.value.status == 429 and info.value.after == 7
    assert info.value.code == "RATE_LIMITED"


async def test_503_retry_after_http_date(receiver: Receiver, handler: WebhookHandler) -> None:
    """A Retry-After HTTP date becomes the seconds until that date."""
    when = datetime.now(UTC) + timedelta(seconds=120)
    receiver.behaviour = respond(503, **{"Retry-After": format_datetime(when, usegmt=True)})
    with pytest.raises(RetryLater) as info:
        await handler.handle(job(receiver.url()), ctx())
    assert info.value.after is not None and 110 <= info.value.after <= 120


@pytest.mark.parametrize("status", [408, 425])
async def test_408_and_425_retry(receiver: Receiver, handler: WebhookHandler, status: int) -> None:
    """408 and 425 are retryable."""
    receiver.behaviour = respond(status)
    with pytest.raises(RetryLater) as info:
        await handler.handle(job(receiver.url()), ctx())
    assert info.value.status == status
    assert info.value.code == "HTTP_STATUS"


async def test_404_is_permanent(receiver: Receiver, handler: WebhookHandler) -> None:
    """A 404 is a permanent HTTP_STATUS failure with the status."""
    receiver.behaviour = respond(404, "no such hook")
    with pytest.raises(PermanentFailure) as info:
        await handler.handle(job(receiver.url()), ctx())
    assert info.value.code == "HTTP_STATUS" and info.value.status == 404
    assert info.value.reached_service


async def test_redirect_is_not_followed(receiver: Receiver, handler: WebhookHandler) -> None:
    """A 302 fails permanently and its target is never requested."""

    async def redirect(request: web.Request) -> web.StreamResponse:
        if request.path == "/target":
            return web.Response(text="should not be reached")
        raise web.HTTPFound("/target")

    receiver.behaviour = redirect
    with pytest.raises(PermanentFailure) as info:
        await handler.handle(job(receiver.url("/start")), ctx())
    assert info.value.code == "HTTP_STATUS" and info.value.status == 302
    assert [s.path for s in receiver.seen] == ["/start"]


async def test_reason_omits_query_userinfo_and_secret(
    receiver: Receiver, handler: WebhookHandler
) -> None:
    """Failure reasons carry neither the query string, userinfo nor the secret."""
    receiver.behaviour = respond(500)
    url = receiver.url("/hook?token=abc").replace("127.0.0.1", "bob:pw9@127.0.0.1")
    with pytest.raises(RetryLater) as info:
        await handler.handle(job(url, secret="s3cr3t-value"), ctx())
    reason = info.value.reason
    assert "abc" not in reason and "pw9" not in reason and "s3cr3t" not in reason
    assert receiver.seen[0].query == "token=abc"


async def test_echoed_request_is_redacted_from_reason(
    receiver: Receiver, handler: WebhookHandler
) -> None:
    """A receiver echoing our headers back cannot leak the secret or signature via the reason."""

    async def echo(request: web.Request) -> web.StreamResponse:
        return web.Response(status=400, text=json.dumps(dict(request.headers)))

    receiver.behaviour = echo
    with pytest.raises(PermanentFailure) as info:
        await handler.handle(
            job(receiver.url(), secret=WHSEC, headers={"Authorization": "Bearer sk_live_123456"}),
            ctx(),
        )
    sent = receiver.seen[0].headers
    signature = sent["webhook-signature"].removeprefix("v1,")
    reason = info.value.reason
    assert signature not in reason and sent["X-FormCraft-Signature"][7:] not in reason
    assert "sk_live_123456" not in reason and len(reason) < 700


async def test_echo_on_success_is_redacted_from_snippet(
    receiver: Receiver, handler: WebhookHandler
) -> None:
    """A 2xx echoing our headers reports a snippet without the secret or signatures."""

    async def echo(request: web.Request) -> web.StreamResponse:
        return web.Response(text=json.dumps(dict(request.headers)))

    receiver.behaviour = echo
    secret = "plain-secret-value"
    delivered = await handler.handle(
        job(receiver.url(), secret=secret, headers={"X-Api-Key": "key-0123456789"}), ctx()
    )
    sent = receiver.seen[0].headers
    snippet = delivered.snippet or ""
    assert "[redacted]" in snippet and secret not in snippet and "key-0123456789" not in snippet
    assert sent["webhook-signature"].removeprefix("v1,") not in snippet
    assert sent["X-FormCraft-Signature"].removeprefix("sha256=") not in snippet


# --- transport failures and bounds ---------------------------------------------------
#
# aiohttp's own total timeout is the only deadline on a request: each way a
# receiver can hold one open must end it within the timeout, on the loop the
# tests run on and on uvloop, the loop the daemon runs on.


async def never_answers(reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
    """Read the request, then send nothing."""
    await reader.read(65536)
    await asyncio.sleep(30)


async def never_reads(_reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
    """Accept the connection and neither read nor send."""
    await asyncio.sleep(30)


async def dribbles_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Send a 503's headers at once, then its body a byte per 100 ms."""
    await reader.read(65536)
    writer.write(b"HTTP/1.1 503 Busy\r\nContent-Length: 100000\r\n\r\n")
    while True:
        writer.write(b"z")
        await writer.drain()
        await asyncio.sleep(0.1)


async def dribbles_headers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Send the status line and headers a byte per 100 ms."""
    await reader.read(65536)
    for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"y" * 1000:
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(0.1)


@dataclass(frozen=True)
class Hang:
    """A receiver that holds a request open, and what the job sends and fails with."""

    serve: OnConnect | None  # None: the TCP handshake never completes
    status: int | None = None  # RetryLater.status expected
    body: Any = None


HANGS = [
    pytest.param(Hang(never_answers), id="reads the request, never answers"),
    # More than loopback's socket buffers take, so the upload itself stalls
    # (aiohttp warns about sending a body this large from bytes).
    pytest.param(
        Hang(never_reads, body="x" * 16_000_000),
        id="never reads a 16 MB request body",
        marks=pytest.mark.filterwarnings("ignore:Sending a large body:ResourceWarning"),
    ),
    pytest.param(Hang(dribbles_body, status=503), id="sends headers, then a body byte per 100 ms"),
    pytest.param(Hang(dribbles_headers), id="sends the status line a byte per 100 ms"),
    pytest.param(Hang(None), id="never completes the TCP handshake"),
]


async def deliver_to_hang(hang: Hang) -> None:
    """Deliver one job to `hang` with a 300 ms timeout: RetryLater, well in time."""
    servers = RawServers()
    with contextlib.ExitStack() as stack:
        if hang.serve is None:
            port = stack.enter_context(full_backlog())
        else:
            port = await servers.start(hang.serve)
        handler = await started_handler(quick_config())
        try:
            started = time.monotonic()
            with pytest.raises(RetryLater) as info:
                await handler.handle(job(f"http://127.0.0.1:{port}/", body=hang.body), ctx())
            elapsed = time.monotonic() - started
        finally:
            await handler.aclose()
            await servers.close()
    assert elapsed < QUICK_TIMEOUT_MS / 1000 + SLACK_S
    assert info.value.status == hang.status
    if hang.status is None:
        assert info.value.reason.endswith(f"no answer within {QUICK_TIMEOUT_MS} ms")


@pytest.mark.parametrize("hang", HANGS)
async def test_hung_receiver_ends_within_timeout(hang: Hang) -> None:
    """Every way of holding a request open ends in RetryLater soon after timeout_ms."""
    await deliver_to_hang(hang)


@pytest.mark.parametrize("hang", HANGS)
def test_hung_receiver_ends_within_timeout_on_uvloop(hang: Hang) -> None:
    """The same bounds hold on uvloop."""
    uvloop.run(deliver_to_hang(hang))


async def test_slow_receiver_times_out(receiver: Receiver, quick_handler: WebhookHandler) -> None:
    """An aiohttp receiver slower than timeout_ms gives RetryLater soon after the timeout."""

    async def slow(_request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(3)
        return web.Response()

    receiver.behaviour = slow
    started = time.monotonic()
    with pytest.raises(RetryLater) as info:
        await quick_handler.handle(job(receiver.url()), ctx())
    assert time.monotonic() - started < QUICK_TIMEOUT_MS / 1000 + SLACK_S
    assert info.value.status is None
    assert info.value.code == "TIMEOUT"


async def test_a_closed_port_is_a_connection_error(handler: WebhookHandler) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        with pytest.raises(RetryLater) as info:
            await handler.handle(job(f"http://127.0.0.1:{port}/hook"), ctx())
    assert info.value.code == "CONNECTION_ERROR"
    assert "Connect" in info.value.reason


async def test_a_name_that_does_not_resolve_is_a_dns_error() -> None:
    """`.invalid` never resolves (RFC 2606): DNS_ERROR, retried."""
    h = await started_handler(WebhookWorkerConfig(allow_private_networks=True, timeout_ms=5000))
    try:
        with pytest.raises(RetryLater) as info:
            await h.handle(job("http://no-such-host.invalid/hook"), ctx())
    finally:
        await h.aclose()
    assert info.value.code == "DNS_ERROR"


async def test_a_tls_failure_is_a_tls_error(receiver: Receiver, handler: WebhookHandler) -> None:
    """HTTPS to a plain-HTTP receiver: the handshake fails, TLS_ERROR."""
    with pytest.raises(RetryLater) as info:
        await handler.handle(job(receiver.url().replace("http://", "https://")), ctx())
    assert info.value.code == "TLS_ERROR"


@pytest.mark.timeout(20)
async def test_long_timeouts_are_not_rounded_up(raw_server: Any) -> None:
    """A timeout of 5 s or more ends on time, not at the next whole second.

    aiohttp rounds such total deadlines up to a whole second of the loop clock
    unless told not to. A dribbled body never lets the receiver go quiet, so
    only the total deadline ends the request; started just after a whole
    second, rounding would add more than 0.9 s.
    """
    port = await raw_server(dribbles_body)
    h = await started_handler(WebhookWorkerConfig(allowed_networks=LOOPBACK_ONLY, timeout_ms=5000))
    try:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(1.05 - loop.time() % 1)  # to just after a whole second
        started = time.monotonic()
        with pytest.raises(RetryLater) as info:
            await h.handle(job(f"http://127.0.0.1:{port}/"), ctx())
        assert time.monotonic() - started < 5.0 + 0.5
        assert info.value.status == 503
    finally:
        await h.aclose()


async def test_connection_refused_retries(handler: WebhookHandler) -> None:
    """A closed port gives RetryLater."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        with pytest.raises(RetryLater) as info:
            await handler.handle(job(f"http://127.0.0.1:{port}/"), ctx())
    assert info.value.status is None


async def test_connection_reset_retries(raw_server: Any, handler: WebhookHandler) -> None:
    """A peer that resets the connection mid-request gives RetryLater."""

    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    port = await raw_server(reset)
    with pytest.raises(RetryLater):
        await handler.handle(job(f"http://127.0.0.1:{port}/"), ctx())


async def test_oversize_response_is_classified_by_status(
    receiver: Receiver, quick_handler: WebhookHandler
) -> None:
    """A 10 MB error body is cut short and the status still decides."""
    receiver.behaviour = respond(404, "x" * 10_000_000)
    started = time.monotonic()
    with pytest.raises(PermanentFailure) as info:
        await quick_handler.handle(job(receiver.url()), ctx())
    assert info.value.status == 404 and time.monotonic() - started < 1.0
    assert len(info.value.reason) < 700


async def test_endless_response_is_not_read_to_the_end(
    raw_server: Any, quick_handler: WebhookHandler
) -> None:
    """A 200 with an endless chunked body succeeds after reading max_response_bytes."""
    written: list[int] = [0]

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 65536
        while True:
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
            written[0] += len(chunk)

    port = await raw_server(endless)
    started = time.monotonic()
    await quick_handler.handle(job(f"http://127.0.0.1:{port}/"), ctx())
    assert time.monotonic() - started < 0.5


async def test_keep_alive_reuses_the_connection(
    receiver: Receiver, handler: WebhookHandler
) -> None:
    """Two deliveries to one receiver share a pooled connection."""
    peers: list[object] = []

    async def note_peer(request: web.Request) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        return web.Response()

    receiver.behaviour = note_peer
    await handler.handle(job(receiver.url()), ctx())
    await handler.handle(job(receiver.url()), ctx())
    assert peers[0] == peers[1]
