"""Fixtures of the email tests: aiosmtpd servers on loopback and started EmailHandlers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from formcraftd.workers.email.handler import EmailHandler
from tests.support import Names, make_config
from tests.support.bounces import MakePolicy, policy_factory
from tests.support.smtp import HandlerFactory, SmtpFactory, SmtpServer, running_servers


@pytest.fixture
async def smtp_factory() -> AsyncIterator[SmtpFactory]:
    """Starts aiosmtpd servers on loopback; all are stopped afterwards."""
    async with running_servers() as start:
        yield start


@pytest.fixture
async def smtp_server(smtp_factory: SmtpFactory) -> SmtpServer:
    """A plain SMTP server that accepts everything."""
    return await smtp_factory()


@pytest.fixture
async def make_handler(tmp_path: Path) -> AsyncIterator[HandlerFactory]:
    """Started EmailHandlers pointed at a test server; closed afterwards."""
    handlers: list[EmailHandler] = []

    async def make(server: SmtpServer | None, /, **settings: Any) -> EmailHandler:
        options = {
            k: settings.pop(k)
            for k in ("idle_timeout_s", "render_timeout_s", "emit")
            if k in settings
        }
        section = {
            "enabled": True,
            "smtp_host": "127.0.0.1",
            "smtp_port": server.port if server else 1,
            "smtp_timeout_s": 5,
            "state_dir": str(tmp_path / "var"),
            **settings,
        }
        cfg = make_config(Names(), email=section).workers.email
        handler = EmailHandler(cfg, user_agent="formcraftd/test", **options)
        await handler.start()
        handlers.append(handler)
        return handler

    yield make
    for handler in handlers:
        await handler.aclose()


@pytest.fixture
def alerts() -> Iterator[list[logging.LogRecord]]:
    """Records logged by the email worker."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("formcraftd.email")
    collector = Collect(logging.DEBUG)
    logger.addHandler(collector)
    yield records
    logger.removeHandler(collector)


@pytest.fixture
async def make_policy(tmp_path: Path) -> AsyncIterator[MakePolicy]:
    """Opened BouncePolicies over `tmp_path/var` (settings as keyword arguments); closed after."""
    async with policy_factory(tmp_path / "var") as make:
        yield make
