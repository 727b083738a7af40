"""End to end: the daemon with bounce handling, the real RabbitMQ, aiosmtpd and Dovecot."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from formcraftd.daemon import Daemon
from formcraftd.ops.http import bound_port
from tests.conftest import DaemonFactory
from tests.support import Broker, Names, make_config
from tests.support import bounces as samples
from tests.support.imap import PASSWORD, USER, Dovecot, running_dovecot
from tests.support.smtp import SmtpServer, email_body

pytestmark = [pytest.mark.e2e, pytest.mark.email, pytest.mark.timeout(90)]

TOKEN = "admin-token-for-bounce-tests"
POSTMARK_PASSWORD = "postmark-password-for-e2e"


@pytest.fixture
async def dovecot(tmp_path: Path) -> AsyncIterator[Dovecot]:
    async with running_dovecot(tmp_path / "dovecot") as server:
        yield server


async def admin(daemon: Daemon, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    assert daemon.http_runner is not None
    url = f"http://127.0.0.1:{bound_port(daemon.http_runner)}{path}"
    headers = kwargs.pop("headers", {"Authorization": f"Bearer {TOKEN}"})
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, headers=headers, **kwargs) as response,
    ):
        if response.content_type == "application/json":
            return response.status, await response.json()
        return response.status, await response.text()


async def test_a_dsn_in_the_bounce_mailbox_suppresses_the_recipient_of_a_sent_job(
    names: Names,
    amqp: Broker,
    smtp_server: SmtpServer,
    dovecot: Dovecot,
    start_daemon: DaemonFactory,
    tmp_path: Path,
) -> None:
    """Job sent with a VERP return path; its DSN arrives over IMAP; the admin API shows and
    removes the entry; /metrics counts it; a Postmark complaint goes the same way."""
    bounces = {
        "imap_host": "127.0.0.1",
        "imap_port": dovecot.port,
        "imap_security": "none",
        "imap_username": USER,
        "imap_password": PASSWORD,
        "imap_idle_s": 2,
        "postmark_password": POSTMARK_PASSWORD,
    }
    section = {
        "enabled": True,
        "smtp_host": "127.0.0.1",
        "smtp_port": smtp_server.port,
        "smtp_timeout_s": 5,
        "state_dir": str(tmp_path / "var"),
        "return_path": samples.RETURN_PATH,
        "bounces": bounces,
    }
    config = make_config(
        names,
        webhook={"enabled": False},
        email=section,
        http={"admin_token": TOKEN},
        breaker={"failure_threshold": 1000},
    )
    daemon = await start_daemon(config)
    await amqp.publish(config.workers.email.queue, email_body("ada@dest.example"), message_id="b-1")
    [received] = await smtp_server.wait_for(1)
    assert received.mail_from == samples.verp("b-1")

    await dovecot.append(samples.postfix_dsn("b-1", "ada@dest.example"))
    async with asyncio.timeout(20):
        while True:
            status, listed = await admin(daemon, "GET", "/admin/suppression?reason=hard_bounce")
            assert status == 200
            if listed["entries"]:
                break
            await asyncio.sleep(0.1)
    [entry] = listed["entries"]
    assert (entry["address"], entry["source"], entry["job_id"]) == (
        "ada@dest.example",
        "imap",
        "b-1",
    )
    _, text = await admin(daemon, "GET", "/metrics")
    assert 'formcraftd_bounces_total{source="imap",type="hard"} 1.0' in text
    assert (await admin(daemon, "DELETE", "/admin/suppression/ada@dest.example"))[0] == 200

    basic = base64.b64encode(f"postmark:{POSTMARK_PASSWORD}".encode()).decode()
    complaint = {"RecordType": "SpamComplaint", "Type": "SpamComplaint", "Email": "b@dest.example"}
    status, answer = await admin(
        daemon,
        "POST",
        "/bounces/postmark",
        json=complaint,
        headers={"Authorization": f"Basic {basic}"},
    )
    assert (status, answer["result"]) == (200, "applied")
    status, listed = await admin(daemon, "GET", "/admin/suppression")
    assert [e["address"] for e in listed["entries"]] == ["b@dest.example"]
    status, body = await admin(daemon, "GET", "/admin/status")
    assert body["bounce_mailbox"]["connected"] is True
    assert PASSWORD not in str(body) and POSTMARK_PASSWORD not in str(body)
