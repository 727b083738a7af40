"""Tests for the webhook worker, against real aiohttp receivers on loopback."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiohappyeyeballs
import pytest
import uvloop
from aiohttp import web

from formcraftd.core.config import WebhookWorkerConfig
from formcraftd.core.errors import ConfigError, PermanentFailure, RetryLater
from formcraftd.core.handler import JobContext
from formcraftd.core.jobs import Metadata, WebhookJob, WebhookPayload
from formcraftd.workers.webhook import handler as webhook_module
from formcraftd.workers.webhook.handler import (
    WebhookHandler,
    breaker_key,
    encode_body,
    parse_retry_after,
    sign,
    signing_key,
    webhook_id,
)
from formcraftd.workers.webhook.netguard import NetworkPolicy

pytestmark = [pytest.mark.webhook, pytest.mark.timeout(10)]

USER_AGENT = "formcraftd/9.9.9"
WHSEC_KEY = b"0123456789abcdef0123456789abcdef"
WHSEC = "whsec_" + base64.b64encode(WHSEC_KEY).decode()
LOOPBACK_ONLY = ("127.0.0.1/32",)
QUICK_TIMEOUT_MS = 300
# How long past its timeout a request may take to end. Generous, so a busy
# machine does not fail the suite: a request that nothing bounds runs into the
# test's own 10 s timeout instead.
SLACK_S = 1.0

Behaviour = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Seen:
    """One request as the receiver saw it."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


async def answer_200(_request: web.Request) -> web.StreamResponse:
    return web.Response(text="ok")


@dataclass
class Receiver:
    """A real aiohttp server on 127.0.0.1 that records requests and answers with `behaviour`."""

    port: int = 0
    behaviour: Behaviour = answer_200
    seen: list[Seen] = field(default_factory=list)

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(
            Seen(request.method, request.path, request.query_string, dict(request.headers), body)
        )
        return await self.behaviour(request)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A running receiver; stopped after the test."""
    recv = Receiver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recv.dispatch)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        recv.port = runner.addresses[0][1]
        yield recv
    finally:
        await runner.cleanup()


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


async def _started(config: WebhookWorkerConfig) -> WebhookHandler:
    handler = WebhookHandler(config, user_agent=USER_AGENT)
    await handler.start()
    return handler


@pytest.fixture
async def handler() -> AsyncIterator[WebhookHandler]:
    """A handler that may reach 127.0.0.1 only, with a 2 s timeout."""
    h = await _started(WebhookWorkerConfig(allowed_networks=LOOPBACK_ONLY, timeout_ms=2000))
    try:
        yield h
    finally:
        await h.aclose()


def quick_config() -> WebhookWorkerConfig:
    """May reach 127.0.0.1, with a 300 ms timeout and a 1 KiB read cap."""
    return WebhookWorkerConfig(
        allowed_networks=LOOPBACK_ONLY, timeout_ms=QUICK_TIMEOUT_MS, max_response_bytes=1024
    )


@pytest.fixture
async def quick_handler() -> AsyncIterator[WebhookHandler]:
    """A handler with :func:`quick_config`."""
    h = await _started(quick_config())
    try:
        yield h
    finally:
        await h.aclose()


@pytest.fixture
async def guarded_handler() -> AsyncIterator[WebhookHandler]:
    """A handler with the default SSRF guard (no private networks at all)."""
    h = await _started(WebhookWorkerConfig(timeout_ms=2000))
    try:
        yield h
    finally:
        await h.aclose()


@pytest.fixture
def no_connections(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[object]]:
    """Fail the test if aiohttp tries to open any TCP connection."""
    attempts: list[object] = []

    async def forbidden(addr_infos: object, *args: Any, **kwargs: Any) -> socket.socket:
        attempts.append(addr_infos)
        raise AssertionError(f"a connection was attempted to {addr_infos}")

    monkeypatch.setattr(aiohappyeyeballs, "start_connection", forbidden)
    yield attempts
    assert attempts == []


def job(
    url: str,
    *,
    body: Any = None,
    secret: str = "",
    headers: dict[str, str] | None = None,
    method: str = "POST",
) -> WebhookJob:
    payload = WebhookPayload(
        url=url,
        method=method,  # type: ignore[arg-type]
        headers=headers or {},
        body=body,
        secret=secret,
    )
    return WebhookJob(payload=payload, metadata=Metadata(form_id="f1", submission_id="s1"))


def ctx(job_id: str = "job-1", attempt: int = 1) -> JobContext:
    return JobContext(job_id=job_id, attempt=attempt, queue="webhook_tasks")


def respond(status: int, text: str = "", **headers: str) -> Behaviour:
    async def behaviour(_request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, text=text, headers=headers)

    return behaviour


def expected_v1(key: bytes, msg_id: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


# --- pure functions ---------------------------------------------------------------


def test_signing_key_decodes_whsec_secrets() -> None:
    """A whsec_ secret's key is the base64-decoded rest."""
    assert signing_key(WHSEC) == WHSEC_KEY


def test_signing_key_uses_plain_secrets_as_utf8() -> None:
    """A secret without the whsec_ prefix is used as its UTF-8 bytes."""
    assert signing_key("plain-sécret") == "plain-sécret".encode()


def test_signing_key_error_does_not_echo_the_secret() -> None:
    """An invalid whsec_ secret raises ValueError whose message omits the secret."""
    with pytest.raises(ValueError, match="base64") as info:
        signing_key("whsec_not*base64*TOPSECRET")
    assert "TOPSECRET" not in str(info.value)


def test_webhook_id_is_stable_for_one_job_and_endpoint() -> None:
    """The same job id and URL always give the same msg_ id."""
    first = webhook_id("job-1", "https://a.example/hook")
    assert first == webhook_id("job-1", "https://a.example/hook")
    assert first.startswith("msg_") and len(first) == 30


def test_webhook_id_differs_per_endpoint_and_job() -> None:
    """Different URLs or jobs give different ids."""
    base = webhook_id("job-1", "https://a.example/hook")
    assert base != webhook_id("job-1", "https://b.example/hook")
    assert base != webhook_id("job-2", "https://a.example/hook")


def test_sign_without_key_sets_only_id_and_timestamp() -> None:
    """An empty key yields webhook-id and webhook-timestamp but no signatures."""
    assert sign(b"", "msg_x", 1700000000, b"{}") == {
        "webhook-id": "msg_x",
        "webhook-timestamp": "1700000000",
    }


def test_sign_matches_reference_hmacs() -> None:
    """Both signatures are HMAC-SHA256 as receivers compute them, for every message."""
    for body in (b'{"a":1}', b"", b"second message"):
        headers = sign(WHSEC_KEY, "msg_x", 1700000000, body)
        assert headers["webhook-signature"] == expected_v1(WHSEC_KEY, "msg_x", "1700000000", body)
        plain = hmac.new(WHSEC_KEY, body, hashlib.sha256).hexdigest()
        assert headers["X-FormCraft-Signature"] == "sha256=" + plain


def test_encode_body_sends_strings_as_is() -> None:
    """A str body is its UTF-8 bytes, not a JSON string."""
    assert encode_body("a=1&b=ü") == "a=1&b=ü".encode()


def test_encode_body_is_compact_json() -> None:
    """Non-string bodies are JSON without spaces."""
    assert encode_body({"a": [1, 2], "b": None}) == b'{"a":[1,2],"b":null}'


def test_encode_body_refuses_unencodable_values() -> None:
    """An integer too large for JSON encoding raises ValueError."""
    with pytest.raises(ValueError, match=r"payload\.body"):
        encode_body({"n": 2**80})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("7", 7.0),
        ("0", 0.0),
        ("-5", 0.0),
        (" 12 ", 12.0),
        ("soon", None),
        ("", None),
        (None, None),
        ("1.5", None),
    ],
)
def test_parse_retry_after_seconds(value: str | None, expected: float | None) -> None:
    """Delta-seconds are parsed, negatives clamped to 0 and garbage ignored."""
    assert parse_retry_after(value) == expected


def test_parse_retry_after_http_date() -> None:
    """An HTTP date gives the seconds until it; a past date gives 0."""
    now = datetime(2024, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("Mon, 01 Jan 2024 12:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Mon, 01 Jan 2024 11:00:00 GMT", now=now) == 0.0


@pytest.mark.parametrize(
    ("url", "key"),
    [
        ("https://Hooks.Example.COM/x?y=1", "webhook:hooks.example.com:443"),
        ("http://example.com/x", "webhook:example.com:80"),
        ("http://user:pw@example.com:8080/x", "webhook:example.com:8080"),
        ("https://[2001:DB8::1]/x", "webhook:[2001:db8::1]:443"),
    ],
)
def test_breaker_key_fills_default_ports(url: str, key: str) -> None:
    """The breaker key is the lowercased host and the effective port."""
    assert breaker_key(url) == key


@pytest.mark.parametrize(
    "url", ["http://host:99999/x", "http:///x", "http://[::1/x", "not a url at all"]
)
def test_breaker_key_of_an_invalid_url(url: str) -> None:
    """Every URL without a usable host and port shares one breaker key."""
    assert breaker_key(url) == "webhook:invalid-url"
    assert breaker_key(url) == "webhook:invalid-url"  # the same again, from the cache


def test_breaker_key_of_a_very_long_url() -> None:
    """A URL too long to be cached gets the same key as a short one."""
    assert breaker_key("https://Example.com/" + "a" * 5000) == "webhook:example.com:443"


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "fd12::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "64:ff9b::a00:1",
        "2002:a00:1::1",
        "fec0::1",
    ],
)
def test_policy_refuses_non_public_addresses(address: str) -> None:
    """The default policy refuses loopback, private, link-local, CGNAT and reserved ranges."""
    assert not NetworkPolicy().permits(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"])
def test_policy_permits_public_addresses(address: str) -> None:
    """Global unicast addresses are permitted."""
    assert NetworkPolicy().permits(address)


def test_policy_allowed_networks_cover_mapped_addresses() -> None:
    """An allowed IPv4 network also admits its IPv4-mapped IPv6 form."""
    policy = NetworkPolicy(allowed=(ipaddress.ip_network("127.0.0.1/32"),))
    assert policy.permits("127.0.0.1") and policy.permits("::ffff:127.0.0.1")
    assert not policy.permits("127.0.0.2")


def test_invalid_allowed_network_is_a_config_error() -> None:
    """A bad CIDR raises ConfigError naming the key."""
    with pytest.raises(ConfigError, match=r"workers\.webhook\.allowed_networks"):
        WebhookHandler(WebhookWorkerConfig(allowed_networks=("10.0.0.0/33",)), user_agent="x")


async def test_reconfigure_with_a_bad_network_changes_nothing(
    receiver: Receiver, handler: WebhookHandler
) -> None:
    """A failed reconfigure raises and the previous settings keep delivering."""
    with pytest.raises(ConfigError):
        handler.reconfigure(WebhookWorkerConfig(allowed_networks=("nope",)))
    await handler.handle(job(receiver.url()), ctx())
    assert len(receiver.seen) == 1


# --- signing and request shape ----------------------------------------------------


async def test_whsec_signature_verifies(receiver: Receiver, handler: WebhookHandler) -> None:
    """The v1 signature and X-FormCraft-Signature verify with the decoded whsec_ key."""
    await handler.handle(job(receiver.url(), body={"a": 1}, secret=WHSEC), ctx())
    seen = receiver.seen[0]
    h = seen.headers
    assert h["webhook-signature"] == expected_v1(
        WHSEC_KEY, h["webhook-id"], h["webhook-timestamp"], seen.body
    )
    assert (
        h["X-FormCraft-Signature"]
        == "sha256=" + hmac.new(WHSEC_KEY, seen.body, hashlib.sha256).hexdigest()
    )


async def test_plain_secret_signature_verifies(receiver: Receiver, handler: WebhookHandler) -> None:
    """A plain secret signs with its UTF-8 bytes."""
    await handler.handle(job(receiver.url(), body="x", secret="plain-secret"), ctx())
    h = receiver.seen[0].headers
    assert h["webhook-signature"] == expected_v1(
        b"plain-secret", h["webhook-id"], h["webhook-timestamp"], b"x"
    )


async def test_no_secret_sends_no_signature(receiver: Receiver, handler: WebhookHandler) -> None:
    """Without a secret the id and timestamp are sent but no signature headers."""
    await handler.handle(job(receiver.url()), ctx())
    h = receiver.seen[0].headers
    assert "webhook-id" in h and "webhook-timestamp" in h
    assert "webhook-signature" not in h and "X-FormCraft-Signature" not in h


async def test_webhook_id_is_the_same_on_every_try(
    receiver: Receiver, handler: WebhookHandler
) -> None:
    """Two tries of one job carry the same webhook-id."""
    the_job = job(receiver.url(), secret=WHSEC)
    await handler.handle(the_job, ctx(attempt=1))
    await handler.handle(the_job, ctx(attempt=2))
    assert receiver.seen[0].headers["webhook-id"] == receiver.seen[1].headers["webhook-id"]


async def test_webhook_id_differs_for_another_endpoint(
    receiver: Receiver, handler: WebhookHandler
) -> None:
    """The same job sent to two URLs carries two different webhook-ids."""
    await handler.handle(job(receiver.url("/a")), ctx())
    await handler.handle(job(receiver.url("/b")), ctx())
    assert receiver.seen[0].headers["webhook-id"] != receiver.seen[1].headers["webhook-id"]


async def test_webhook_timestamp_is_fresh(receiver: Receiver, handler: WebhookHandler) -> None:
    """webhook-timestamp is the current unix time in seconds."""
    await handler.handle(job(receiver.url()), ctx())
    assert abs(int(receiver.seen[0].headers["webhook-timestamp"]) - time.time()) <= 2


async def test_user_agent_wins_over_payload(receiver: Receiver, handler: WebhookHandler) -> None:
    """User-Agent is ours even when the payload tries to set it."""
    await handler.handle(job(receiver.url(), headers={"user-agent": "evil"}), ctx())
    assert receiver.seen[0].headers["User-Agent"] == USER_AGENT


async def test_payload_cannot_forge_signature_headers(
    receiver: Receiver, handler: WebhookHandler
) -> None:
    """A payload's webhook-* headers are replaced by ours."""
    headers = {"Webhook-Id": "forged", "webhook-signature": "v1,forged"}
    await handler.handle(job(receiver.url(), headers=headers, secret="s3cret-key"), ctx())
    h = receiver.seen[0].headers
    assert h["webhook-id"].startswith("msg_") and h["webhook-signature"] != "v1,forged"


async def test_payload_headers_are_passed(receiver: Receiver, handler: WebhookHandler) -> None:
    """Custom payload headers reach the receiver."""
    await handler.handle(
        job(receiver.url(), headers={"X-Custom": "yes", "Authorization": "B t"}), ctx()
    )
    h = receiver.seen[0].headers
    assert h["X-Custom"] == "yes" and h["Authorization"] == "B t"


async def test_method_put_is_used(receiver: Receiver, handler: WebhookHandler) -> None:
    """payload.method is the request method."""
    await handler.handle(job(receiver.url(), method="PUT"), ctx())
    assert receiver.seen[0].method == "PUT"


async def test_string_body_is_sent_as_is(receiver: Receiver, handler: WebhookHandler) -> None:
    """A string body arrives byte for byte, with the payload's Content-Type."""
    headers = {"content-type": "application/x-www-form-urlencoded"}
    await handler.handle(job(receiver.url(), body="a=1&b=2", headers=headers), ctx())
    seen = receiver.seen[0]
    assert seen.body == b"a=1&b=2"
    assert seen.headers["Content-Type"] == "application/x-www-form-urlencoded"


async def test_json_body_is_compact(receiver: Receiver, handler: WebhookHandler) -> None:
    """An object body arrives as compact JSON with Content-Type application/json."""
    await handler.handle(job(receiver.url(), body={"name": "Ada", "n": [1, 2]}), ctx())
    seen = receiver.seen[0]
    assert seen.body == b'{"name":"Ada","n":[1,2]}'
    assert seen.headers["Content-Type"] == "application/json"
    assert json.loads(seen.body) == {"name": "Ada", "n": [1, 2]}


async def test_invalid_whsec_secret_is_a_validation_error(
    receiver: Receiver, handler: WebhookHandler
) -> None:
    """A whsec_ secret that is not base64 fails permanently without a request or the secret.

    Every time: a secret that failed is not remembered as if it had worked.
    """
    for _ in range(2):
        with pytest.raises(PermanentFailure) as info:
            await handler.handle(job(receiver.url(), secret="whsec_***TOPSECRET***"), ctx())
        assert info.value.code == "VALIDATION_ERROR" and not info.value.reached_service
        assert "TOPSECRET" not in info.value.reason and receiver.seen == []


async def test_one_secret_signs_every_job(receiver: Receiver, handler: WebhookHandler) -> None:
    """Jobs sharing a secret each carry signatures that verify for their own body."""
    for i in range(3):
        await handler.handle(job(receiver.url(), body={"n": i}, secret=WHSEC), ctx(f"job-{i}"))
    for seen in receiver.seen:
        h = seen.headers
        assert h["webhook-signature"] == expected_v1(
            WHSEC_KEY, h["webhook-id"], h["webhook-timestamp"], seen.body
        )
        plain = hmac.new(WHSEC_KEY, seen.body, hashlib.sha256).hexdigest()
        assert h["X-FormCraft-Signature"] == "sha256=" + plain
    assert len({s.headers["webhook-signature"] for s in receiver.seen}) == 3


async def test_url_and_secret_are_worked_out_once(
    receiver: Receiver, handler: WebhookHandler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many jobs to one URL with one secret parse the URL and decode the secret once."""
    parsed: list[str] = []
    decoded: list[str] = []
    real_url, real_signing_key = webhook_module.URL, webhook_module.signing_key

    def counting_url(raw: str) -> Any:
        parsed.append(raw)
        return real_url(raw)

    def counting_signing_key(secret: str) -> bytes:
        decoded.append(secret)
        return real_signing_key(secret)

    monkeypatch.setattr(webhook_module, "URL", counting_url)
    monkeypatch.setattr(webhook_module, "signing_key", counting_signing_key)
    url = receiver.url("/worked-out-once")  # a URL and secret no other test uses
    secret = "whsec_" + base64.b64encode(b"worked-out-once-key").decode()
    for i in range(3):
        the_job = job(url, body={"n": i}, secret=secret)
        assert handler.breaker_key(the_job) == f"webhook:127.0.0.1:{receiver.port}"
        await handler.handle(the_job, ctx(f"job-{i}"))
    assert parsed == [url] and decoded == [secret] and len(receiver.seen) == 3


async def test_very_long_url_is_delivered(receiver: Receiver, handler: WebhookHandler) -> None:
    """A URL too long to be cached is parsed per job and delivered all the same."""
    path = "/" + "a" * 5000
    for _ in range(2):
        the_job = job(receiver.url(path + "?token=t0k3n"))
        assert handler.breaker_key(the_job) == f"webhook:127.0.0.1:{receiver.port}"
        await handler.handle(the_job, ctx())
    assert [(s.path, s.query) for s in receiver.seen] == [(path, "token=t0k3n")] * 2


async def test_very_long_secret_signs(receiver: Receiver, handler: WebhookHandler) -> None:
    """A secret too long to be cached signs every job all the same."""
    secret = "s" * 3000
    for i in range(2):
        await handler.handle(job(receiver.url(), body={"n": i}, secret=secret), ctx(f"job-{i}"))
    for seen in receiver.seen:
        h = seen.headers
        assert h["webhook-signature"] == expected_v1(
            secret.encode(), h["webhook-id"], h["webhook-timestamp"], seen.body
        )


async def test_request_repr_hides_what_is_secret(handler: WebhookHandler) -> None:
    """A built request's repr shows neither the secret, a signature, a header nor the body."""
    the_job = job(
        "http://127.0.0.1:9/hook",
        body={"card": "4111111111111111"},
        secret=WHSEC,
        headers={"Authorization": "Bearer sk_live_123456"},
    )
    request = handler._build(the_job, ctx(), handler._settings.policy)
    text = repr(request)
    signature = request.headers["webhook-signature"].removeprefix("v1,")
    for hidden in (WHSEC, WHSEC.removeprefix("whsec_"), signature, "sk_live", "4111"):
        assert hidden not in text
    assert "127.0.0.1:9" in text


async def test_payload_cannot_set_framing_headers(
    receiver: Receiver, handler: WebhookHandler
) -> None:
    """Host, Content-Length and Connection from a payload are dropped; JSON stays the default."""
    headers = {"Host": "evil.example", "Content-Length": "1", "Connection": "close"}
    await handler.handle(job(receiver.url(), body={"a": 1}, headers=headers), ctx())
    seen = receiver.seen[0]
    assert seen.headers["Host"] == f"127.0.0.1:{receiver.port}"
    assert seen.body == b'{"a":1}' and seen.headers["Content-Type"] == "application/json"


async def test_invalid_header_name_is_a_validation_error(
    receiver: Receiver, handler: WebhookHandler
) -> None:
    """A payload header name that is not an HTTP token fails permanently without a request."""
    with pytest.raises(PermanentFailure) as info:
        await handler.handle(job(receiver.url(), headers={"X Bad": "1"}), ctx())
    assert info.value.code == "VALIDATION_ERROR" and receiver.seen == []


# --- classification -----------------------------------------------------------------


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
    assert "database is down" in info.value.reason and "\n" not in info.value.reason


async def test_429_retry_after_seconds(receiver: Receiver, handler: WebhookHandler) -> None:
    """A 429 with Retry-After: 7 retries after 7 seconds."""
    receiver.behaviour = respond(429, **{"Retry-After": "7"})
    with pytest.raises(RetryLater) as info:
        await handler.handle(job(receiver.url()), ctx())
    assert info.value.status == 429 and info.value.after == 7


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
        handler = await _started(quick_config())
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


@pytest.mark.timeout(20)
async def test_long_timeouts_are_not_rounded_up(raw_server: Any) -> None:
    """A timeout of 5 s or more ends on time, not at the next whole second.

    aiohttp rounds such total deadlines up to a whole second of the loop clock
    unless told not to. A dribbled body keeps resetting sock_read, so only the
    total deadline ends the request; started just after a whole second,
    rounding would add more than 0.9 s.
    """
    port = await raw_server(dribbles_body)
    h = await _started(WebhookWorkerConfig(allowed_networks=LOOPBACK_ONLY, timeout_ms=5000))
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


# --- SSRF guard ----------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_guard_refuses_loopback(
    receiver: Receiver, guarded_handler: WebhookHandler, host: str, no_connections: list[object]
) -> None:
    """The default config refuses loopback targets before any request is sent."""
    with pytest.raises(PermanentFailure) as info:
        await guarded_handler.handle(job(receiver.url(host=host), secret="guard-secret-1"), ctx())
    assert info.value.code == "SSRF_BLOCKED" and not info.value.reached_service
    assert "guard-secret-1" not in info.value.reason
    assert receiver.seen == []


@pytest.mark.parametrize(
    "url",
    [
        "http://[::1]/",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/",
        "https://192.168.0.1:8443/",
        "http://[::ffff:10.0.0.1]/",
        "http://100.64.1.1/",
        "http://[fe80::1]/",
    ],
)
async def test_guard_refuses_private_literals_without_traffic(
    guarded_handler: WebhookHandler, url: str, no_connections: list[object]
) -> None:
    """Private and link-local IP literals are refused with no connection attempt."""
    with pytest.raises(PermanentFailure) as info:
        await guarded_handler.handle(job(url), ctx())
    assert info.value.code == "SSRF_BLOCKED" and not info.value.reached_service


@pytest.mark.parametrize("url", ["http://127.1/", "http://2130706433/", "http://0x7f000001/"])
async def test_guard_refuses_legacy_ip_forms(
    guarded_handler: WebhookHandler, url: str, no_connections: list[object]
) -> None:
    """Numeric shorthands for loopback never reach a connection."""
    with pytest.raises(PermanentFailure) as info:
        await guarded_handler.handle(job(url), ctx())
    assert not info.value.reached_service


async def test_allowed_network_lets_loopback_through(
    receiver: Receiver, handler: WebhookHandler
) -> None:
    """allowed_networks=["127.0.0.1/32"] admits 127.0.0.1 by literal and by name."""
    await handler.handle(job(receiver.url(host="127.0.0.1")), ctx())
    await handler.handle(job(receiver.url(host="localhost")), ctx())
    assert len(receiver.seen) == 2


async def test_reconfigure_to_the_guard_drops_pooled_connections(receiver: Receiver) -> None:
    """After a reload turns the guard on, a host reached before is refused."""
    h = await _started(WebhookWorkerConfig(allow_private_networks=True, timeout_ms=2000))
    try:
        await h.handle(job(receiver.url(host="localhost")), ctx())
        h.reconfigure(WebhookWorkerConfig(timeout_ms=2000))
        with pytest.raises(PermanentFailure) as info:
            await h.handle(job(receiver.url(host="localhost")), ctx())
        assert info.value.code == "SSRF_BLOCKED" and len(receiver.seen) == 1
    finally:
        await h.aclose()


@pytest.mark.parametrize(
    ("url", "code", "words"),
    [
        ("http://host:99999/", "VALIDATION_ERROR", "not a valid URL"),
        ("http://256.1.1.1/", "VALIDATION_ERROR", "canonical IP address"),
        ("http://10.1.2.3/", "SSRF_BLOCKED", "private or reserved"),
    ],
)
async def test_unusable_targets_fail_the_same_way_every_time(
    handler: WebhookHandler, no_connections: list[object], url: str, code: str, words: str
) -> None:
    """A URL that is invalid or refused is refused again on the next job, without traffic."""
    reasons: list[str] = []
    for _ in range(2):
        with pytest.raises(PermanentFailure) as info:
            await handler.handle(job(url), ctx())
        assert info.value.code == code and not info.value.reached_service
        reasons.append(info.value.reason)
    assert words in reasons[0] and reasons[0] == reasons[1]


async def test_reload_changes_the_verdict_on_a_literal(receiver: Receiver) -> None:
    """An IP literal admitted before a reload is refused after it, and again admitted after."""
    allow = WebhookWorkerConfig(allowed_networks=LOOPBACK_ONLY, timeout_ms=2000)
    h = await _started(allow)
    try:
        url = receiver.url(host="127.0.0.1")
        await h.handle(job(url), ctx())
        h.reconfigure(WebhookWorkerConfig(timeout_ms=2000))
        with pytest.raises(PermanentFailure) as info:
            await h.handle(job(url), ctx())
        assert info.value.code == "SSRF_BLOCKED" and len(receiver.seen) == 1
        h.reconfigure(allow)
        await h.handle(job(url), ctx())
        assert len(receiver.seen) == 2
    finally:
        await h.aclose()


async def test_breaker_key_of_a_job(handler: WebhookHandler) -> None:
    """The handler's breaker key comes from the job's URL."""
    assert handler.breaker_key(job("https://Example.com/x")) == "webhook:example.com:443"
