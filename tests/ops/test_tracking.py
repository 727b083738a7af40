"""Error tracking: reports reach a Sentry ingest with job context and no secret."""

from __future__ import annotations

import asyncio
import gzip
import io
import logging
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
import sentry_sdk
from aiohttp import web

from formcraftd.core.config import LoggingConfig
from formcraftd.ops import logs, tracking
from tests.support import serving

WHSEC = "whsec_c2VudHJ5LXRlc3Qtc2VjcmV0LWtleQ=="
PASSWORD = "hunter2-in-a-url"
SECRETS = (WHSEC, WHSEC.removeprefix("whsec_"), PASSWORD)
QUEUE = "fctest.tracking.webhook_tasks"


@dataclass
class Ingest:
    """A stand-in for Sentry's ingest on 127.0.0.1 that keeps every envelope."""

    port: int = 0
    raw: list[bytes] = field(default_factory=list)
    items: list[tuple[dict[str, Any], bytes]] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def dsn(self) -> str:
        return f"http://publickey@127.0.0.1:{self.port}/1"

    def events(self) -> list[dict[str, Any]]:
        """The payloads of the `event` items received so far."""
        found: list[dict[str, Any]] = []
        for header, payload in self.items:
            if header.get("type") == "event":
                event = orjson.loads(payload)
                assert isinstance(event, dict)
                found.append(event)
        return found

    async def handle(self, request: web.Request) -> web.Response:
        # aiohttp decodes a gzip/deflate/br Content-Encoding itself; a body that is
        # still compressed (an encoding it could not apply) is decoded here.
        body = await request.read()
        if body.startswith(b"\x1f\x8b"):
            body = gzip.decompress(body)
        elif body[:1] == b"\x78":
            body = zlib.decompress(body)
        self.raw.append(body)
        self.items.extend(parse_envelope(body))
        async with self.changed:
            self.changed.notify_all()
        return web.json_response({"id": "0" * 32})


def parse_envelope(body: bytes) -> list[tuple[dict[str, Any], bytes]]:
    """The (item header, payload) pairs of a Sentry envelope."""
    _, _, rest = body.partition(b"\n")
    items: list[tuple[dict[str, Any], bytes]] = []
    while rest.strip():
        line, _, rest = rest.partition(b"\n")
        header = orjson.loads(line)
        length = header.get("length")
        if length is None:
            payload, _, rest = rest.partition(b"\n")
        else:
            payload, rest = rest[:length], rest[length + 1 :]
        items.append((header, payload))
    return items


@pytest.fixture
async def ingest() -> AsyncIterator[Ingest]:
    """A running fake ingest; stopped afterwards."""
    ingest = Ingest()
    app = web.Application()
    app.router.add_post("/api/{project}/envelope/", ingest.handle)
    async with serving(app) as ingest.port:
        yield ingest


@pytest.fixture
async def sentry(ingest: Ingest, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Ingest]:
    """Sentry started by logs.configure() with a DSN at the fake ingest; closed afterwards."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "SENTRY_DSN"):
        monkeypatch.delenv(name, raising=False)
    logs.configure(LoggingConfig(sentry_dsn=ingest.dsn), stream=io.StringIO())
    try:
        assert tracking.enabled()
        yield ingest
    finally:
        logs.reset()
        await asyncio.to_thread(tracking.close, 5.0)
    assert not tracking.enabled()


async def flush(ingest: Ingest, events: int) -> list[dict[str, Any]]:
    """Send what the SDK queued (from a thread: the ingest runs in this loop)."""
    await asyncio.to_thread(sentry_sdk.flush, 5.0)
    async with asyncio.timeout(5), ingest.changed:
        await ingest.changed.wait_for(lambda: len(ingest.events()) >= events)
    return ingest.events()


def assert_no_secret(ingest: Ingest) -> None:
    """No secret appears in anything the ingest received."""
    received = b"".join(ingest.raw).decode()
    for secret in SECRETS:
        assert secret not in received


async def test_dead_letter_is_reported_with_job_context_and_no_secret(sentry: Ingest) -> None:
    """A dead letter is an event tagged with queue, job id and code; secrets are masked."""
    logging.getLogger("formcraftd.webhook").info(
        "calling https://app:%s@hooks.example.com/x with %s", PASSWORD, WHSEC
    )
    tracking.dead_lettered(
        queue=QUEUE,
        job_id="job-42",
        form_id="form-7",
        submission_id="sub-9",
        code="HTTP_STATUS",
        reason=f"POST https://app:{PASSWORD}@hooks.example.com/x answered 410 (key {WHSEC})",
        attempts=3,
    )
    [event] = await flush(sentry, 1)
    assert event["level"] == "warning"
    assert QUEUE in event["message"]
    assert "HTTP_STATUS" in event["message"]
    tags = event["tags"]
    assert tags["queue"] == QUEUE
    assert tags["job_id"] == "job-42"
    assert tags["error_code"] == "HTTP_STATUS"
    assert tags["form_id"] == "form-7"
    assert event["extra"]["attempts"] == 3
    assert event["extra"]["submission_id"] == "sub-9"
    assert "answered 410" in event["extra"]["reason"]
    assert event["fingerprint"] == ["formcraftd.dead_letter", QUEUE, "HTTP_STATUS"]
    crumbs = [crumb.get("message", "") for crumb in event["breadcrumbs"]["values"]]
    assert any("hooks.example.com" in message for message in crumbs)
    assert_no_secret(sentry)


async def test_unexpected_exception_is_reported_with_job_context_and_no_secret(
    sentry: Ingest,
) -> None:
    """An unexpected handler error is an exception event tagged with the job; secrets masked."""
    try:
        raise RuntimeError(f"boom at amqp://app:{PASSWORD}@rabbit/ signing with {WHSEC}")
    except RuntimeError as exc:
        tracking.unexpected(exc, queue=QUEUE, job_id="job-43")
    [event] = await flush(sentry, 1)
    [exception] = event["exception"]["values"]
    assert exception["type"] == "RuntimeError"
    assert "boom at amqp://app:***@rabbit/" in exception["value"]
    assert event["tags"]["queue"] == QUEUE
    assert event["tags"]["job_id"] == "job-43"
    assert event["level"] == "error"
    assert_no_secret(sentry)


async def test_unexpected_then_logged_exception_is_reported_once(sentry: Ingest) -> None:
    """Reporting first, then logging the same exception, gives one event (the tagged one)."""
    try:
        raise ValueError("handler bug")
    except ValueError as exc:
        tracking.unexpected(exc, queue=QUEUE, job_id="job-44")
        logging.getLogger("formcraftd.consumer").exception("handler raised unexpectedly")
    events = await flush(sentry, 1)
    await asyncio.sleep(0.2)
    assert len(sentry.events()) == 1
    assert events[0]["tags"]["job_id"] == "job-44"


async def test_reports_are_no_ops_without_a_dsn() -> None:
    """With no Sentry client running, the reports return at once and raise nothing."""
    assert not tracking.enabled()
    tracking.dead_lettered(
        queue=QUEUE,
        job_id="job-45",
        form_id=None,
        submission_id=None,
        code="VALIDATION_ERROR",
        reason="not JSON",
        attempts=0,
    )
    tracking.unexpected(RuntimeError("x"), queue=QUEUE, job_id="job-45")
