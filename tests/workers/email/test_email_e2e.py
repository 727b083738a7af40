"""End to end: the daemon in this process, the real RabbitMQ, aiosmtpd on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from formcraftd.core.config import Config
from formcraftd.daemon import Daemon
from tests.conftest import DaemonFactory
from tests.support import Broker, Names, make_config
from tests.support.smtp import (
    Certificate,
    SmtpFactory,
    SmtpServer,
    email_body,
    make_certificate,
)

pytestmark = [pytest.mark.e2e, pytest.mark.email, pytest.mark.timeout(60)]


def email_config(names: Names, server: SmtpServer, state_dir: Path, **email: Any) -> Config:
    """Only the email worker, sending to `server`; breakers out of the way."""
    section = {
        "enabled": True,
        "smtp_host": "127.0.0.1",
        "smtp_port": server.port,
        "smtp_timeout_s": 5,
        "state_dir": str(state_dir),
        **email,
    }
    return make_config(
        names, webhook={"enabled": False}, email=section, breaker={"failure_threshold": 1000}
    )


async def until(probe: Callable[[], Awaitable[int]], expected: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while (value := await probe()) != expected:
        assert time.monotonic() < deadline, f"{value} != {expected} after {timeout} s"
        await asyncio.sleep(0.05)


async def test_an_email_job_is_delivered_and_acked(
    names: Names,
    amqp: Broker,
    smtp_server: SmtpServer,
    start_daemon: DaemonFactory,
    tmp_path: Path,
) -> None:
    """A published job becomes one mail with the job's Message-ID; the queue empties."""
    cfg = email_config(names, smtp_server, tmp_path)
    await start_daemon(cfg)
    await amqp.publish(cfg.workers.email.queue, email_body(), message_id="e2e-1")
    [received] = await smtp_server.wait_for(1)
    assert received.message["Message-ID"] == "<e2e-1@localhost>"
    assert received.message["Subject"] == "New submission: Contact us"
    await until(lambda: amqp.depth(cfg.workers.email.queue), 0)


async def test_a_452_recipient_is_retried_alone_and_nobody_gets_the_mail_twice(
    names: Names,
    amqp: Broker,
    smtp_server: SmtpServer,
    start_daemon: DaemonFactory,
    tmp_path: Path,
) -> None:
    """The first try reaches the accepted recipient; the retry goes to the deferred one only."""
    smtp_server.script.rcpt["busy@example.com"] = ["452 4.2.2 mailbox full", "250 OK"]
    cfg = email_config(names, smtp_server, tmp_path)
    await start_daemon(cfg)
    body = email_body("ok@example.com", "busy@example.com")
    await amqp.publish(cfg.workers.email.queue, body, message_id="e2e-452")
    first, second = await smtp_server.wait_for(2)
    assert first.rcpt_tos == ["ok@example.com"]
    assert second.rcpt_tos == ["busy@example.com"]
    assert first.message["Message-ID"] == second.message["Message-ID"]
    await asyncio.sleep(0.5)
    assert len(smtp_server.received) == 2
    assert await amqp.depth(f"dlq.{cfg.workers.email.queue}") == 0


async def test_a_template_error_is_dead_lettered_without_contacting_smtp(
    names: Names,
    amqp: Broker,
    smtp_server: SmtpServer,
    start_daemon: DaemonFactory,
    tmp_path: Path,
) -> None:
    """A job naming a missing template goes to the DLQ as TEMPLATE_ERROR after one try."""
    cfg = email_config(names, smtp_server, tmp_path)
    await start_daemon(cfg)
    await amqp.publish(cfg.workers.email.queue, email_body(template="nope"))
    [dead] = await amqp.take(f"dlq.{cfg.workers.email.queue}", 1)
    assert dead.headers["x-formcraft-error-code"] == "TEMPLATE_ERROR"
    assert dead.headers["x-formcraft-attempts"] == 1
    assert smtp_server.connections == 0


async def test_a_connection_dropped_during_data_is_retried_and_delivered_once(
    names: Names,
    amqp: Broker,
    smtp_server: SmtpServer,
    start_daemon: DaemonFactory,
    tmp_path: Path,
) -> None:
    """The server hangs up mid-transaction: the job is retried and the mail arrives once."""
    smtp_server.script.drop_at_data = 1
    cfg = email_config(names, smtp_server, tmp_path)
    await start_daemon(cfg)
    await amqp.publish(cfg.workers.email.queue, email_body())
    await smtp_server.wait_for(1)
    await until(lambda: amqp.depth(cfg.workers.email.queue), 0)
    await asyncio.sleep(0.3)
    assert len(smtp_server.received) == 1
    assert smtp_server.connections == 2
    assert await amqp.depth(f"dlq.{cfg.workers.email.queue}") == 0


async def test_a_suppressed_address_stays_suppressed_after_a_daemon_restart(
    names: Names, amqp: Broker, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    """A 550 puts the address on the list; a new daemon on the same state_dir skips it."""
    smtp_server.script.rcpt["gone@example.com"] = ["550 5.1.1 no such user"]
    cfg = email_config(names, smtp_server, tmp_path / "state")
    amqp.track(cfg)
    dlq = f"dlq.{cfg.workers.email.queue}"
    async with running_daemon(cfg):
        await amqp.publish(cfg.workers.email.queue, email_body("gone@example.com"))
        [first] = await amqp.take(dlq, 1)
    assert first.headers["x-formcraft-error-code"] == "RECIPIENT_REJECTED"
    assert first.headers["x-formcraft-last-status"] == 550
    async with running_daemon(cfg):
        await amqp.publish(cfg.workers.email.queue, email_body("Gone@Example.com"))
        [second] = await amqp.take(dlq, 1)
    assert second.headers["x-formcraft-error-code"] == "SUPPRESSED"
    assert smtp_server.rcpt_commands == ["gone@example.com"]


async def test_starttls_end_to_end(
    names: Names,
    amqp: Broker,
    smtp_factory: SmtpFactory,
    start_daemon: DaemonFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With smtp_security=starttls, jobs go out over TLS on a kept-open connection."""
    certificate: Certificate = make_certificate(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate.cert))
    server = await smtp_factory(tls_context=certificate.server_context(), require_starttls=True)
    cfg = email_config(names, server, tmp_path / "state", smtp_security="starttls", concurrency=1)
    await start_daemon(cfg)
    for i in range(3):
        await amqp.publish(cfg.workers.email.queue, email_body(submission_id=f"s{i}"))
    received = await server.wait_for(3)
    assert all(r.tls for r in received)
    assert server.connections == 1


@contextlib.asynccontextmanager
async def running_daemon(cfg: Config) -> AsyncIterator[Daemon]:
    """A daemon run for the length of an `async with` block, then shut down."""
    daemon = Daemon(cfg)
    task = asyncio.create_task(daemon.run())
    try:
        async with asyncio.timeout(20):
            await daemon.started.wait()
        yield daemon
    finally:
        daemon.request_shutdown()
        await asyncio.wait_for(task, timeout=30)
