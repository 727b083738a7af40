"""The status page, rendered by headless Chromium, shows what /admin/status says."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from formcraftd.daemon import Daemon
from formcraftd.ops.http import bound_port
from tests.conftest import DaemonFactory, ReceiverFactory
from tests.support import Broker, Names, make_config, ok, serving, webhook_job

pytestmark = [pytest.mark.e2e]

TOKEN = "status-page-admin-token"
JOBS = 3
CHROMIUM_TIMEOUT_S = 60
VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta"})


def chromium() -> str:
    """The Chromium binary; the test fails (never skips) when it is missing."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail(
            "chromium is not installed: the status page test needs Debian's `chromium` "
            "package (sudo apt-get install chromium; `make test` run as root installs it)",
            pytrace=False,
        )
    return found


async def render(url: str, profile: Path) -> str:
    """The DOM of `url` after its scripts ran, as headless Chromium dumps it."""
    process = await asyncio.create_subprocess_exec(
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(CHROMIUM_TIMEOUT_S):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    assert process.returncode == 0, stderr.decode(errors="replace")[-2000:]
    return stdout.decode()


class PageFields(HTMLParser):
    """The text of every element with a `data-field`, by (data-queue, data-field)."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[tuple[str | None, str], str] = {}
        self.by_id: dict[str, dict[str, str | None]] = {}
        self.body: dict[str, str | None] = {}
        self.tags: set[str] = set()
        self._open: list[tuple[str, tuple[str | None, str] | None]] = []
        self._text: dict[tuple[str | None, str], list[str]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self.tags.add(tag)
        if tag == "body":
            self.body = found
        if found.get("id"):
            self.by_id[str(found["id"])] = found
        if tag in VOID:
            return
        field = found.get("data-field")
        key = (found.get("data-queue"), field) if field else None
        if key is not None:
            self._text[key] = []
        self._open.append((tag, key))

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            open_tag, key = self._open.pop()
            if key is not None:
                self.fields[key] = " ".join("".join(self._text.pop(key)).split())
            if open_tag == tag:
                return

    def handle_data(self, data: str) -> None:
        for _, key in self._open:
            if key is not None:
                self._text[key].append(data)


def page_fields(dom: str) -> PageFields:
    parser = PageFields()
    parser.feed(dom)
    parser.close()
    return parser


async def finished(daemon: Daemon, queue: str, count: int, timeout: float = 15.0) -> None:
    """Wait until `queue` finished `count` jobs, none in flight, depth polled."""
    deadline = time.monotonic() + timeout
    while True:
        entry = daemon.status()["queues"][queue]
        if entry["finished"] >= count and entry["in_flight"] == 0 and entry["depth"] == 0:
            return
        assert time.monotonic() < deadline, f"queue never settled: {entry}"
        await asyncio.sleep(0.05)


async def admin_status(base: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with session.get(f"{base}/admin/status", headers=headers) as response:
            assert response.status == 200
            body: dict[str, Any] = await response.json()
    return body


async def test_status_page_shows_the_numbers_of_admin_status(
    names: Names,
    amqp: Broker,
    receiver_factory: ReceiverFactory,
    start_daemon: DaemonFactory,
    tmp_path: Path,
) -> None:
    """After a few jobs, the rendered page shows the version, queue and counts /admin/status has."""
    chromium()
    receiver = await receiver_factory(ok)
    cfg = make_config(
        names,
        http={"admin_token": TOKEN},
        webhook={"concurrency": 4},
        monitoring={"enabled": True, "interval_ms": 200},
    )
    daemon = await start_daemon(cfg)
    queue = cfg.workers.webhook.queue
    for i in range(JOBS):
        await amqp.publish(queue, webhook_job(receiver.url, submission_id=f"s{i}"))
    await receiver.wait_for(JOBS)
    await finished(daemon, queue, JOBS)
    assert daemon.http_runner is not None
    base = f"http://127.0.0.1:{bound_port(daemon.http_runner)}"

    page = page_fields(await render(f"{base}/", tmp_path / "chromium"))
    status = await admin_status(base)

    assert page.body.get("data-state") == "ok", page.fields.get((None, "error"))
    assert "hidden" in page.by_id["error"]
    assert page.fields[(None, "version")] == status["version"]
    assert page.fields[(None, "broker")] == "connected"
    entry = status["queues"][queue]
    shown = {
        field: page.fields[(queue, field)]
        for field in (
            "name",
            "kind",
            "state",
            "in_flight",
            "concurrency",
            "finished",
            "failed",
            "depth",
            "dead_letter_depth",
        )
    }
    assert shown == {
        "name": queue,
        "kind": "webhook",
        "state": entry["state"],
        "in_flight": str(entry["in_flight"]),
        "concurrency": str(entry["concurrency"]),
        "finished": str(entry["finished"]),
        "failed": str(entry["failed"]),
        "depth": str(entry["depth"]),
        "dead_letter_depth": str(entry["dead_letter_depth"]),
    }
    assert (entry["finished"], entry["concurrency"], entry["in_flight"]) == (JOBS, 4, 0)
    assert entry["depth_at"] is not None
    assert status["monitoring"] == {
        "alerts_enabled": True,
        "rates_over_s": 0.2,
        "error_rate_min_jobs": 10,
        "depths_every_s": 0.2,
    }
    note = page.fields[(None, "rates_note")]
    assert "cover the last 0.2 s" in note
    assert "at least 10 jobs" in note


@contextlib.asynccontextmanager
async def page_server(
    status: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    """The packaged status page on a loopback server whose status.json answers with `status`."""
    page = resources.files("formcraftd.ops").joinpath("static/status.html").read_bytes()

    async def index(_request: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/html", charset="utf-8")

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/status.json", status)
    async with serving(app) as port:
        yield f"http://127.0.0.1:{port}/"


async def test_status_page_shows_an_error_banner_when_the_fetch_fails(tmp_path: Path) -> None:
    """When status.json answers 503 the page shows a visible error banner naming the status."""
    chromium()

    async def unavailable(_request: web.Request) -> web.Response:
        return web.json_response({"error": "down"}, status=503)

    async with page_server(unavailable) as url:
        page = page_fields(await render(url, tmp_path / "chromium"))
    assert page.body.get("data-state") == "error"
    assert "hidden" not in page.by_id["error"]
    assert "HTTP 503" in page.fields[(None, "error")]


async def test_status_page_renders_data_as_text_never_as_markup(tmp_path: Path) -> None:
    """Markup inside status.json values is shown as text and never becomes elements."""
    chromium()
    queue = "<b>q</b>"
    detail = '<img src="x" onerror="document.title=1">backlog'
    key = "webhook:<script>alert(1)</script>:443"
    status = {
        "version": "<i>1.0</i>",
        "uptime_s": 12.0,
        "config_source": "test",
        "broker": {"connected": True, "reconnects": 0},
        "queues": {
            queue: {
                "state": "consuming",
                "consuming": True,
                "in_flight": 0,
                "concurrency": 2,
                "kind": "webhook",
                "depth": 0,
                "dead_letter_depth": 0,
                "rate_per_s": 0.0,
                "error_rate": 0.0,
                "finished": 7,
                "failed": 0,
            }
        },
        "breakers": {key: "open"},
        "alerts": [{"alert": f"queue_size:{queue}", "detail": detail, "since": "now"}],
        "endpoints": {
            "failing": [
                {
                    "host": "<b>h</b>",
                    "port": 443,
                    "consecutive_failures": 5,
                    "last_error_code": "TIMEOUT",
                    "last_status": None,
                    "since": "then",
                }
            ],
            "gone": [],
        },
        "last_reload": None,
    }

    async def answer(_request: web.Request) -> web.Response:
        return web.json_response(status)

    async with page_server(answer) as url:
        dom = await render(url, tmp_path / "chromium")
    page = page_fields(dom)
    assert page.body.get("data-state") == "ok", page.fields.get((None, "error"))
    assert not page.tags & {"b", "i", "img"}
    assert dom.count("<script") == 1  # the page's own script only
    assert page.fields[(queue, "name")] == queue
    assert page.fields[(queue, "finished")] == "7"
    assert page.fields[(None, "version")] == "<i>1.0</i>"
    assert page.fields[(None, "alert_detail")] == detail
    assert page.fields[(None, "breaker_key")] == key
    assert page.fields[(None, "endpoint")] == "<b>h</b>:443"
    assert page.fields[(None, "endpoint_state")] == "failing"
