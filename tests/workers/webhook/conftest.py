"""Fixtures of the webhook tests: a receiver and handlers started on loopback."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohappyeyeballs
import pytest
from aiohttp import web

from formcraftd.core.config import WebhookWorkerConfig
from formcraftd.workers.webhook import WebhookHandler
from tests.support import serving
from tests.workers.webhook.support import LOOPBACK_ONLY, Receiver, started_handler


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A running receiver; stopped after the test."""
    recv = Receiver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recv.dispatch)
    async with serving(app, shutdown_timeout=0.1) as recv.port:
        yield recv


@pytest.fixture
async def handler() -> AsyncIterator[WebhookHandler]:
    """A handler that may reach 127.0.0.1 only, with a 2 s timeout."""
    h = await started_handler(WebhookWorkerConfig(allowed_networks=LOOPBACK_ONLY, timeout_ms=2000))
    try:
        yield h
    finally:
        await h.aclose()


@pytest.fixture
async def guarded_handler() -> AsyncIterator[WebhookHandler]:
    """A handler with the default SSRF guard (no private networks at all)."""
    h = await started_handler(WebhookWorkerConfig(timeout_ms=2000))
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
