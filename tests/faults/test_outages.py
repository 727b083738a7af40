"""The SMTP relay or Google goes away for a while: jobs wait, then all are delivered."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from tests.conftest import DaemonFactory
from tests.support import Broker, Names, TcpProxy, make_config
from tests.support.google import FakeGoogle, sheets_job_body
from tests.support.smtp import email_payload, running_servers

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.timeout(120)]

JOBS = 12
OUTAGE_S = 3.0
# Fast breakers and short waits, with the default three tries: an outage must
# not use them up, because jobs wait out an open breaker (and a failed probe
# waits again) without spending a try.
BREAKER = {"failure_threshold": 2, "reset_timeout_ms": 500, "max_job_age_ms": 60000}
RETRY = {"attempts": 3, "initial_delay_ms": 100, "max_delay_ms": 800}


@pytest.mark.email
async def test_smtp_outage_delays_mail_and_loses_none(
    names: Names, amqp: Broker, tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    """The relay vanishes, jobs pile up behind the breaker, it returns: every mail arrives once."""
    async with running_servers() as start_smtp:
        server = await start_smtp()
        proxy = await TcpProxy(target_port=server.port).start()
        try:
            cfg = make_config(
                names,
                webhook={"enabled": False},
                retry=RETRY,
                breaker=BREAKER,
                email={
                    "enabled": True,
                    "smtp_host": "127.0.0.1",
                    "smtp_port": proxy.port,
                    "smtp_timeout_s": 2,
                    "state_dir": str(tmp_path),
                },
            )
            await start_daemon(cfg)
            queue = cfg.workers.email.queue
            await proxy.kill()
            for i in range(JOBS):
                body = email_payload([f"user{i}@example.com"], submission_id=f"s{i}")
                await amqp.publish(queue, orjson.dumps(body))
            await asyncio.sleep(OUTAGE_S)
            assert server.received == []
            await proxy.start()
            await server.wait_for(JOBS, timeout=60)
        finally:
            await proxy.kill()
    recipients = sorted(r for received in server.received for r in received.rcpt_tos)
    assert recipients == sorted(f"user{i}@example.com" for i in range(JOBS))
    assert await amqp.depth(f"dlq.{queue}") == 0


@pytest.mark.sheets
async def test_google_outage_delays_rows_and_loses_none(
    names: Names, amqp: Broker, start_daemon: DaemonFactory
) -> None:
    """The Sheets API vanishes for a while: rows wait behind the breaker and all arrive."""
    google = await FakeGoogle().start()
    proxy = await TcpProxy(target_port=google.port).start()
    try:
        google.add_spreadsheet("sheet-1")
        refresh, access, expiry = google.add_user()
        sheets = google.sheets_config(
            api_root_url=f"http://127.0.0.1:{proxy.port}/",
            token_url=f"http://127.0.0.1:{proxy.port}/token",
            batch_window_ms=50,
        )
        cfg = make_config(
            names, webhook={"enabled": False}, retry=RETRY, breaker=BREAKER, sheets=sheets
        )
        await start_daemon(cfg)
        queue = cfg.workers.sheets.queue
        await proxy.kill()
        for i in range(JOBS):
            body = sheets_job_body(
                refresh_token=refresh,
                access_token=access,
                expiry_ms=expiry,
                values=[[i]],
                submission_id=f"s{i}",
            )
            await amqp.publish(queue, body)
        await asyncio.sleep(OUTAGE_S)
        assert google.rows("sheet-1", "Sheet1!A:C") == []
        await proxy.start()
        await google.wait_for(lambda g: len(g.rows("sheet-1", "Sheet1!A:C")) >= JOBS, timeout=60)
        await asyncio.sleep(0.5)
    finally:
        await proxy.kill()
        await google.stop()
    assert sorted(google.rows("sheet-1", "Sheet1!A:C")) == [[i] for i in range(JOBS)]
    assert await amqp.depth(f"dlq.{queue}") == 0
