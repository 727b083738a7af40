"""The embedded HTTP server: /healthz and /metrics (admin endpoints come later).

It runs inside the daemon's event loop with `AppRunner(handle_signals=False)`:
the daemon, not aiohttp, owns the signals.
"""

from __future__ import annotations

from typing import Any, Protocol

from aiohttp import web

from formcraftd.metrics import CONTENT_TYPE


class StatusSource(Protocol):
    """What the HTTP server asks the daemon."""

    def health(self) -> tuple[bool, dict[str, Any]]: ...

    def render_metrics(self) -> bytes: ...


SOURCE_KEY = web.AppKey("source", StatusSource)


async def healthz(request: web.Request) -> web.Response:
    healthy, body = request.app[SOURCE_KEY].health()
    return web.json_response(body, status=200 if healthy else 503)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[SOURCE_KEY].render_metrics()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def build_app(source: StatusSource) -> web.Application:
    app = web.Application()
    app[SOURCE_KEY] = source
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


async def start_server(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Start serving `app` on host:port; the caller must `await runner.cleanup()`."""
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port the server listens on (useful when configured as 0)."""
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    raise RuntimeError("the HTTP server is not listening")
