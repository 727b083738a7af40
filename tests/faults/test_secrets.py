"""Every failure path of every worker, then a grep: no secret in logs, DLQs or admin output."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path

import aio_pika
import aiohttp
import msgspec
import pytest
from aiohttp import web

from formcraftd.ops import logs
from formcraftd.ops.http import bound_port
from tests.conftest import DaemonFactory, ReceiverFactory
from tests.support import Broker, Names, make_config, webhook_job
from tests.support.google import CLIENT_SECRET, Failure, FakeGoogle, sheets_job_body
from tests.support.smtp import PASSWORD, email_body, running_servers

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
            await amqp.publish(cfg.workers.email.queue, email_body("gone@example.com"))
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


USER_PASSWORD = "userinfo-pw-9a9a"
ECHOED_TOKEN = "query-token-in-url-4b4b"


async def test_urls_and_what_receivers_echo_never_leak(
    names: Names,
    amqp: Broker,
    receiver_factory: ReceiverFactory,
    start_daemon: DaemonFactory,
) -> None:
    """Query tokens, URL userinfo and the Basic header built from it, echoed back: masked.

    A receiver echoes the whole request (path and query, headers) into a 400; a fake
    Google echoes the access token as {"error": "<token>"}. Neither reaches a log line,
    a dead-letter header, a delivery event or the admin API's view of the DLQ.
    """

    async def echo(request: web.Request, _n: int) -> web.StreamResponse:
        return web.Response(status=400, text=f"{request.path_qs} {dict(request.headers)}")

    receiver = await receiver_factory(echo)
    google = await FakeGoogle().start()
    stream = io.StringIO()
    events_queue = f"{names.prefix}.events.tap"
    refresh, access, expiry = google.add_user()
    google.add_spreadsheet("sheet-echo")
    google.always = Failure(400, message=f"bad request with token {access}", bare=True)
    cfg = make_config(
        names,
        http={"admin_token": ADMIN_TOKEN},
        events={"enabled": True, "exchange": f"{names.prefix}.events"},
        sheets=google.sheets_config(batch_window_ms=0),
    )
    channel = await amqp.connection.channel()
    exchange = await channel.declare_exchange(
        f"{names.prefix}.events", aio_pika.ExchangeType.TOPIC, durable=True
    )
    tap = await channel.declare_queue(events_queue, exclusive=True)
    await tap.bind(exchange, "#")
    logs.configure(msgspec.structs.replace(cfg.logging, debug_workers=("*",)), stream=stream)
    try:
        daemon = await start_daemon(cfg)
        port = receiver.url.split(":")[2].split("/")[0]
        url = f"http://user:{USER_PASSWORD}@127.0.0.1:{port}/hook?token={ECHOED_TOKEN}"
        await amqp.publish(cfg.workers.webhook.queue, webhook_job(url, secret=WEBHOOK_SECRET))
        await amqp.publish(
            cfg.workers.sheets.queue,
            sheets_job_body(
                refresh_token=refresh,
                access_token=access,
                expiry_ms=expiry,
                spreadsheet_id="sheet-echo",
            ),
        )
        webhook_dlq = f"dlq.{cfg.workers.webhook.queue}"
        async with asyncio.timeout(30):
            while await amqp.depth(webhook_dlq) < 1:  # noqa: ASYNC110 - the broker sends no event
                await asyncio.sleep(0.05)
        base = f"http://127.0.0.1:{bound_port(daemon.http_runner)}"  # type: ignore[arg-type]
        async with (
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as session,
            session.get(f"{base}/admin/dlq/{cfg.workers.webhook.queue}") as response,
        ):
            peek = await response.text()
        dead = [
            *await amqp.take(webhook_dlq, 1, timeout=30),
            *await amqp.take(f"dlq.{cfg.workers.sheets.queue}", 1, timeout=30),
        ]
        events = [await tap.get(no_ack=True, timeout=10) for _ in range(2)]
    finally:
        logs.reset()
        await google.stop()
        await channel.exchange_delete(f"{names.prefix}.events")
        await channel.close()
    assert [m.headers["x-formcraft-error-code"] for m in dead] == [
        "HTTP_STATUS",
        "SHEETS_REQUEST_REJECTED",
    ]
    basic = base64.b64encode(f"user:{USER_PASSWORD}".encode()).decode()
    written = "\n".join(
        [
            stream.getvalue(),
            *(str(message.headers) for message in dead),
            *(event.body.decode() for event in events),
            peek,
        ]
    )
    assert "token=***" in peek  # the job's URL is shown, its query masked
    for secret in (USER_PASSWORD, ECHOED_TOKEN, basic, access, WEBHOOK_SECRET):
        assert secret not in written, f"{secret[:6]}... leaked"


ROTATED_SECRETS = [
    "whsec_" + base64.b64encode(b"rotation-current-secret-1a1a").decode(),
    "whsk_" + base64.b64encode(bytes(range(7, 39))).decode(),  # an Ed25519 private key
    "rotation-old-plain-secret-2b2b",
]


async def test_no_secret_of_a_rotation_list_leaks(
    names: Names,
    amqp: Broker,
    receiver_factory: ReceiverFactory,
    start_daemon: DaemonFactory,
) -> None:
    """A list of secrets, echoed back by a receiver or refused as invalid: masked everywhere.

    One job's receiver echoes its headers and the secrets into a 404; another job's
    second secret is no Ed25519 key. No secret of either list (nor its base64 part)
    reaches a log line, a dead-letter header or the admin API's view of the DLQ.
    """
    secrets = ROTATED_SECRETS

    async def echo(request: web.Request, _n: int) -> web.StreamResponse:
        return web.Response(status=404, text=f"{dict(request.headers)} {' '.join(secrets)}")

    receiver = await receiver_factory(echo)
    stream = io.StringIO()
    cfg = make_config(names, http={"admin_token": ADMIN_TOKEN})
    invalid = [secrets[0], "whsk_" + base64.b64encode(b"rotation-bad-key-3c3c").decode()]
    logs.configure(msgspec.structs.replace(cfg.logging, debug_workers=("*",)), stream=stream)
    try:
        daemon = await start_daemon(cfg)
        queue = cfg.workers.webhook.queue
        await amqp.publish(queue, webhook_job(receiver.url, secret=secrets))
        await amqp.publish(queue, webhook_job(receiver.url, secret=invalid))
        async with asyncio.timeout(30):
            while await amqp.depth(f"dlq.{queue}") < 2:  # noqa: ASYNC110 - the broker sends no event
                await asyncio.sleep(0.05)
        base = f"http://127.0.0.1:{bound_port(daemon.http_runner)}"  # type: ignore[arg-type]
        async with (
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as session,
            session.get(f"{base}/admin/dlq/{queue}") as response,
        ):
            peek = await response.text()
        dead = await amqp.take(f"dlq.{queue}", 2, timeout=30)
    finally:
        logs.reset()
    codes = sorted(str(message.headers["x-formcraft-error-code"]) for message in dead)
    assert codes == ["HTTP_STATUS", "VALIDATION_ERROR"]
    assert "payload.secret[1]" in str([m.headers for m in dead])
    written = "\n".join([stream.getvalue(), *(str(m.headers) for m in dead), peek])
    assert "job " in stream.getvalue()
    for secret in (*secrets, *invalid):
        for part in (secret, secret.removeprefix("whsec_").removeprefix("whsk_")):
            assert part not in written, f"{part[:6]}... leaked"
