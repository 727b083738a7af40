"""Every failure path of every worker, then a grep: no secret in logs, DLQs or admin output."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import aiohttp
import msgspec
import orjson
import pytest
from aiohttp import web

from formcraftd.ops import logs
from formcraftd.ops.http import bound_port
from tests.conftest import DaemonFactory, ReceiverFactory
from tests.support import Broker, Names, make_config, webhook_job
from tests.support.google import CLIENT_SECRET, FakeGoogle, sheets_job_body
from tests.support.smtp import PASSWORD, email_payload, running_servers

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.timeout(120)]

WEBHOOK_SECRET = "whsec_c2VjcmV0cy1ncmVwLXdlYmhvb2s="
SMTP_PASSWORD = PASSWORD  # the password the test server accepts
ADMIN_TOKEN = "admin-token-7d1e2b"
QUERY_TOKEN = "querytoken-55ab"
HEADER_TOKEN = "headertoken-0c0c0c"


async def test_no_secret_anywhere_after_every_failure_path(
    names: Names,
    amqp: Broker,
    receiver_factory: ReceiverFactory,
    tmp_path: Path,
    start_daemon: DaemonFactory,
) -> None:
    """Webhook 500/404/SSRF/bad secret, SMTP 550, Sheets invalid_grant and 404: nothing leaks."""

    async def answer(request: web.Request, _n: int) -> web.StreamResponse:
        code = int(request.query.get("code", "200"))
        # a receiver that echoes what it got (including our signature) in its error body
        return web.Response(status=code, text=json.dumps(dict(request.headers)))

    receiver = await receiver_factory(answer)
    google = await FakeGoogle().start()
    stream = io.StringIO()
    async with running_servers() as start_smtp:
        smtp = await start_smtp()
        smtp.script.rcpt["gone@example.com"] = ["550 5.1.1 no such user"]
        google.add_spreadsheet("sheet-1")
        refresh, access, expiry = google.add_user()
        cfg = make_config(
            names,
            http={"admin_token": ADMIN_TOKEN},
            retry={"attempts": 2},
            email={
                "enabled": True,
                "smtp_host": "127.0.0.1",
                "smtp_port": smtp.port,
                "smtp_password": SMTP_PASSWORD,
                "state_dir": str(tmp_path),
            },
            sheets=google.sheets_config(batch_window_ms=0),
        )
        logs.configure(msgspec.structs.replace(cfg.logging, debug_workers=("*",)), stream=stream)
        try:
            daemon = await start_daemon(cfg)
            webhooks = [
                f"{receiver.url}?code=500&token={QUERY_TOKEN}",
                f"{receiver.url}?code=404&token={QUERY_TOKEN}",
                f"http://10.9.8.7/hook?token={QUERY_TOKEN}",
            ]
            for url in webhooks:
                await amqp.publish(
                    cfg.workers.webhook.queue,
                    webhook_job(
                        url,
                        secret=WEBHOOK_SECRET,
                        headers={"Authorization": f"Bearer {HEADER_TOKEN}"},
                    ),
                )
            await amqp.publish(
                cfg.workers.webhook.queue, webhook_job(receiver.url, secret="whsec_not*base64!")
            )
            await amqp.publish(
                cfg.workers.email.queue, orjson.dumps(email_payload(["gone@example.com"]))
            )
            await amqp.publish(
                cfg.workers.sheets.queue,
                sheets_job_body(
                    refresh_token="1//revoked-refresh-token", access_token="", expiry_ms=0
                ),
            )
            await amqp.publish(
                cfg.workers.sheets.queue,
                sheets_job_body(
                    refresh_token=refresh,
                    access_token=access,
                    expiry_ms=expiry,
                    spreadsheet_id="missing-sheet",
                ),
            )
            dead = [
                *await amqp.take(f"dlq.{cfg.workers.webhook.queue}", 4, timeout=30),
                *await amqp.take(f"dlq.{cfg.workers.email.queue}", 1, timeout=30),
                *await amqp.take(f"dlq.{cfg.workers.sheets.queue}", 2, timeout=30),
            ]
            base = f"http://127.0.0.1:{bound_port(daemon.http_runner)}"  # type: ignore[arg-type]
            admin_output = []
            async with aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
            ) as session:
                for path in (
                    "/admin/status",
                    "/status.json",
                    "/healthz",
                    "/metrics",
                    f"/admin/dlq/{cfg.workers.webhook.queue}",
                    f"/admin/dlq/{cfg.workers.sheets.queue}",
                ):
                    async with session.get(base + path) as response:
                        admin_output.append(await response.text())
        finally:
            logs.reset()
            await google.stop()
    codes = sorted(str(message.headers["x-formcraft-error-code"]) for message in dead)
    assert codes == sorted(
        [
            "RETRIES_EXHAUSTED",
            "HTTP_STATUS",
            "SSRF_BLOCKED",
            "VALIDATION_ERROR",
            "RECIPIENT_REJECTED",
            "AUTH_REVOKED",
            "SHEETS_REQUEST_REJECTED",
        ]
    )
    written = "\n".join(
        [
            stream.getvalue(),
            *(str(message.headers) for message in dead),
            *admin_output,
        ]
    )
    assert "job " in stream.getvalue()
    secrets = [
        WEBHOOK_SECRET,
        WEBHOOK_SECRET.removeprefix("whsec_"),
        SMTP_PASSWORD,
        ADMIN_TOKEN,
        QUERY_TOKEN,
        HEADER_TOKEN,
        refresh,
        access,
        "1//revoked-refresh-token",
        CLIENT_SECRET,
    ]
    for secret in secrets:
        assert secret not in written, f"{secret[:6]}... leaked"
    await asyncio.sleep(0)
