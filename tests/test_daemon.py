"""End to end: the daemon in this process, the real RabbitMQ, real receivers on loopback."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import time

import aiohttp
import msgspec
import orjson
import pytest
from aiohttp import web

from formcraftd.ops import logs
from formcraftd.ops.http import bound_port
from tests.conftest import DaemonFactory, ReceiverFactory
from tests.support import (
    Broker,
    HealthWatch,
    Names,
    make_config,
    paced,
    rabbitmqctl,
    sequence,
    status,
    webhook_job,
)

pytestmark = [pytest.mark.e2e, pytest.mark.webhook]

SECRET = "whsec_" + base64.b64encode(b"end-to-end-secret").decode()


async def test_delivers_a_signed_webhook_and_acks(
    names: Names, amqp: Broker, receiver_factory: ReceiverFactory, start_daemon: DaemonFactory
) -> None:
    """A job is POSTed once with a signature the receiver can verify, then acked."""
    receiver = await receiver_factory(status(200))
    cfg = make_config(names)
    await start_daemon(cfg)
    await amqp.publish(cfg.workers.webhook.queue, webhook_job(receiver.url, secret=SECRET))
    [request] = await receiver.wait_for(1)
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    signed = f"{request.headers['webhook-id']}.{request.headers['webhook-timestamp']}.".encode()
    expected = base64.b64encode(hmac.new(key, signed + request.body, hashlib.sha256).digest())
    assert request.headers["webhook-signature"] == "v1," + expected.decode()
    assert orjson.loads(request.body) == {"answer": 42}
    await _until(lambda: amqp.depth(cfg.workers.webhook.queue), 0)


async def test_500_then_200_succeeds_on_the_second_try_with_the_same_webhook_id(
    names: Names, amqp: Broker, receiver_factory: ReceiverFactory, start_daemon: DaemonFactory
) -> None:
    """A 500 is retried through the wait queue and the retry keeps its webhook-id."""
    receiver = await receiver_factory(sequence(500, 200))
    cfg = make_config(names)
    await start_daemon(cfg)
    await amqp.publish(cfg.workers.webhook.queue, webhook_job(receiver.url))
    first, second = await receiver.wait_for(2)
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert second.at - first.at >= 0.09
    await asyncio.sleep(0.5)
    assert len(receiver.requests) == 2
    assert await amqp.depth(f"dlq.{cfg.workers.webhook.queue}") == 0


async def test_always_500_is_dead_lettered_after_exactly_attempts_tries(
    names: Names, amqp: Broker, receiver_factory: ReceiverFactory, start_daemon: DaemonFactory
) -> None:
    """Every try fails with 500: `attempts` requests, then RETRIES_EXHAUSTED with all headers."""
    receiver = await receiver_factory(status(500))
    cfg = make_config(names, retry={"attempts": 3})
    daemon = await start_daemon(cfg)
    job_id = await amqp.publish(cfg.workers.webhook.queue, webhook_job(receiver.url))
    [dead] = await amqp.take(f"dlq.{cfg.workers.webhook.queue}", 1)
    assert len(receiver.requests) == 3
    errors = daemon.consumers[cfg.workers.webhook.queue].stats.errors
    deadline = time.monotonic() + 5  # counted once the dead letter's publish is confirmed
    while "RETRIES_EXHAUSTED" not in errors:
        assert time.monotonic() < deadline, errors
        await asyncio.sleep(0.01)
    assert errors == {"HTTP_STATUS": 2, "RETRIES_EXHAUSTED": 1}  # every failed try counted
    headers = dead.headers
    assert headers["x-formcraft-error-code"] == "RETRIES_EXHAUSTED"
    assert headers["x-formcraft-attempts"] == 3
    assert "x-formcraft-attempt" not in headers  # the retry header: one count per dead letter
    assert headers["x-formcraft-last-status"] == 500
    assert headers["x-formcraft-queue"] == cfg.workers.webhook.queue
    assert "T" in str(headers["x-formcraft-failed-at"])
    assert "\n" not in str(headers["x-formcraft-error"])
    assert dead.message_id == job_id
    assert orjson.loads(dead.body)["metadata"]["formId"] == "form-1"
    await asyncio.sleep(0.3)
    assert len(receiver.requests) == 3


async def test_404_is_dead_lettered_after_one_request(
    names: Names, amqp: Broker, receiver_factory: ReceiverFactory, start_daemon: DaemonFactory
) -> None:
    """A 404 is permanent: one request, HTTP_STATUS, last status 404, attempts 1."""
    receiver = await receiver_factory(status(404))
    cfg = make_config(names)
    await start_daemon(cfg)
    await amqp.publish(cfg.workers.webhook.queue, webhook_job(receiver.url))
    [dead] = await amqp.take(f"dlq.{cfg.workers.webhook.queue}", 1)
    assert dead.headers["x-formcraft-error-code"] == "HTTP_STATUS"
    assert dead.headers["x-formcraft-last-status"] == 404
    assert dead.headers["x-formcraft-attempts"] == 1
    assert len(receiver.requests) == 1


async def test_429_retry_after_delays_the_next_try(
    names: Names, amqp: Broker, receiver_factory: ReceiverFactory, start_daemon: DaemonFactory
) -> None:
    """A 429 with Retry-After: 1 is tried again no sooner than a second later."""

    async def throttled(_request: web.Request, n: int) -> web.StreamResponse:
        if n == 1:
            return web.Response(status=429, headers={"Retry-After": "1"})
        return web.Response(status=200)

    receiver = await receiver_factory(throttled)
    cfg = make_config(names, retry={"initial_delay_ms": 100, "max_delay_ms": 2000})
    await start_daemon(cfg)
    await amqp.publish(cfg.workers.webhook.queue, webhook_job(receiver.url))
    first, second = await receiver.wait_for(2)
    assert second.at - first.at >= 1.0


async def test_timeout_is_retried_then_dead_lettered(
    names: Names, amqp: Broker, receiver_factory: ReceiverFactory, start_daemon: DaemonFactory
) -> None:
    """A receiver slower than timeout_ms counts as a failed try each time."""
    receiver = await receiver_factory(paced(3))
    cfg = make_config(names, webhook={"timeout_ms": 300}, retry={"attempts": 2})
    await start_daemon(cfg)
    started = time.monotonic()
    await amqp.publish(cfg.workers.webhook.queue, webhook_job(receiver.url))
    [dead] = await amqp.take(f"dlq.{cfg.workers.webhook.queue}", 1)
    assert dead.headers["x-formcraft-error-code"] == "RETRIES_EXHAUSTED"
    assert len(receiver.requests) == 2
    assert time.monotonic() - started < 3


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"not json at all", "JSON"),
        (b'{"type": "webhook.send", "payload": {}}', "payload"),
        (b'{"type": "fax.send", "payload": {}, "metadata": {}}', "type"),
        (
            b'{"type": "email.send", "payload": {"to": ["a@example.com"], "subject": "s",'
            b' "template": "t"}, "metadata": {"formId": "f", "submissionId": "s"}}',
            "does not belong",
        ),
        (b"\xff\xfe\x00garbage", "JSON"),
        (b'{"x": "' + b"a" * 5000 + b'"}', "byte limit"),
    ],
)
async def test_invalid_bodies_are_dead_lettered_as_validation_errors(
    body: bytes, why: str, names: Names, amqp: Broker, start_daemon: DaemonFactory
) -> None:
    """Bodies that are not valid jobs for this queue go straight to the DLQ, once."""
    cfg = make_config(names, daemon={"max_message_bytes": 4096})
    daemon = await start_daemon(cfg)
    await amqp.publish(cfg.workers.webhook.queue, body)
    [dead] = await amqp.take(f"dlq.{cfg.workers.webhook.queue}", 1)
    assert dead.headers["x-formcraft-error-code"] == "VALIDATION_ERROR"
    assert why in str(dead.headers["x-formcraft-error"])
    assert dead.body == body
    healthy, _ = daemon.health()
    assert healthy


async def test_ssrf_guard_refuses_loopback_without_sending_anything(
    names: Names, amqp: Broker, receiver_factory: ReceiverFactory, start_daemon: DaemonFactory
) -> None:
    """With the default guard, a loopback URL is dead-lettered SSRF_BLOCKED and never called."""
    receiver = await receiver_factory(status(200))
    cfg = make_config(names, webhook={"allowed_networks": []})
    await start_daemon(cfg)
    await amqp.publish(cfg.workers.webhook.queue, webhook_job(receiver.url, secret=SECRET))
    [dead] = await amqp.take(f"dlq.{cfg.workers.webhook.queue}", 1)
    assert dead.headers["x-formcraft-error-code"] == "SSRF_BLOCKED"
    assert SECRET not in str(dead.headers)
    assert receiver.requests == []


async def test_open_breaker_delays_jobs_without_using_their_tries(
    names: Names, amqp: Broker, receiver_factory: ReceiverFactory, start_daemon: DaemonFactory
) -> None:
    """After the breaker opens, later jobs wait it out and are delivered with no try burned."""
    receiver = await receiver_factory(status(500))
    cfg = make_config(
        names,
        retry={"attempts": 2, "initial_delay_ms": 100, "max_delay_ms": 400},
        breaker={"failure_threshold": 2, "reset_timeout_ms": 1500},
    )
    daemon = await start_daemon(cfg)
    await amqp.publish(cfg.workers.webhook.queue, webhook_job(receiver.url, submission_id="a"))
    [dead] = await amqp.take(f"dlq.{cfg.workers.webhook.queue}", 1)
    assert dead.headers["x-formcraft-error-code"] == "RETRIES_EXHAUSTED"
    assert daemon.breakers.snapshot()[f"webhook:127.0.0.1:{receiver.port}"] == "open"
    for sub in ("b", "c"):
        await amqp.publish(cfg.workers.webhook.queue, webhook_job(receiver.url, submission_id=sub))
    await asyncio.sleep(0.8)
    assert len(receiver.requests) == 2  # both waiting, none tried
    receiver.behaviour = status(200)
    await receiver.wait_for(4, timeout=10)
    await asyncio.sleep(0.5)
    assert len(receiver.requests) == 4
    assert await amqp.depth(f"dlq.{cfg.workers.webhook.queue}") == 0
    metrics = daemon.render_metrics().decode()
    assert (
        f'formcraftd_jobs_total{{outcome="delayed",queue="{cfg.workers.webhook.queue}"}}' in metrics
    )


async def test_breaker_open_past_max_job_age_dead_letters_the_job(
    names: Names, amqp: Broker, receiver_factory: ReceiverFactory, start_daemon: DaemonFactory
) -> None:
    """A job that waited on an open breaker longer than max_job_age_ms is BREAKER_OPEN."""
    receiver = await receiver_factory(status(503))
    cfg = make_config(
        names,
        retry={"attempts": 1},
        breaker={"failure_threshold": 1, "reset_timeout_ms": 60000, "max_job_age_ms": 600},
    )
    await start_daemon(cfg)
    await amqp.publish(cfg.workers.webhook.queue, webhook_job(receiver.url, submission_id="a"))
    await amqp.take(f"dlq.{cfg.workers.webhook.queue}", 1)
    await amqp.publish(cfg.workers.webhook.queue, webhook_job(receiver.url, submission_id="b"))
    [dead] = await amqp.take(f"dlq.{cfg.workers.webhook.queue}", 1, timeout=20)
    assert dead.headers["x-formcraft-error-code"] == "BREAKER_OPEN"
    assert dead.headers["x-formcraft-attempts"] == 0
    assert len(receiver.requests) == 1


async def test_healthz_and_metrics_answer(
    names: Names, amqp: Broker, start_daemon: DaemonFactory
) -> None:
    """/healthz is 200 with each queue's state; /metrics has the core metric families."""
    cfg = make_config(names)
    daemon = await start_daemon(cfg)
    assert daemon.http_runner is not None
    base = f"http://127.0.0.1:{bound_port(daemon.http_runner)}"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/healthz") as response:
            assert response.status == 200
            body = await response.json()
        async with session.get(f"{base}/metrics") as response:
            text = await response.text()
    assert body["broker"]["connected"] is True
    assert body["queues"][cfg.workers.webhook.queue]["consuming"] is True
    for family in (
        "formcraftd_jobs_in_flight",
        "formcraftd_concurrency_limit",
        "formcraftd_broker_connected 1.0",
        "formcraftd_build_info",
        "process_resident_memory_bytes",
    ):
        assert family in text


async def test_concurrency_limit_is_never_exceeded(
    names: Names, amqp: Broker, receiver_factory: ReceiverFactory, start_daemon: DaemonFactory
) -> None:
    """With concurrency 3, the receiver never sees more than 3 requests at once."""
    active = 0
    peak = 0

    async def slow(_request: web.Request, _n: int) -> web.StreamResponse:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.05)
        active -= 1
        return web.Response(status=200)

    receiver = await receiver_factory(slow)
    cfg = make_config(names, webhook={"concurrency": 3})
    await start_daemon(cfg)
    for i in range(30):
        await amqp.publish(
            cfg.workers.webhook.queue, webhook_job(receiver.url, submission_id=str(i))
        )
    await receiver.wait_for(30)
    assert peak == 3


async def _until(probe, expected, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while (value := await probe()) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"{value!r} != {expected!r} after {timeout} s")
        await asyncio.sleep(0.05)


async def test_no_secret_reaches_logs_or_dead_letter_headers(
    names: Names, amqp: Broker, receiver_factory: ReceiverFactory, start_daemon: DaemonFactory
) -> None:
    """At debug level, across success, retry, dead letter and SSRF, no secret is written."""
    stream = io.StringIO()
    cfg = make_config(names, retry={"attempts": 2})
    logs.configure(msgspec.structs.replace(cfg.logging, debug_workers=("*",)), stream=stream)
    try:
        ok = await receiver_factory(status(200))
        failing = await receiver_factory(status(500))
        await start_daemon(cfg)
        queue = cfg.workers.webhook.queue
        sensitive_url = f"{failing.url}?token=querysecret"
        await amqp.publish(queue, webhook_job(ok.url, secret=SECRET))
        await amqp.publish(queue, webhook_job(sensitive_url, secret=SECRET))
        await amqp.publish(queue, webhook_job("http://10.1.2.3/hook", secret=SECRET))
        dead = await amqp.take(f"dlq.{queue}", 2)
        await ok.wait_for(1)
    finally:
        logs.reset()
    key = SECRET.removeprefix("whsec_")
    signature = ok.requests[0].headers["webhook-signature"].removeprefix("v1,")
    written = stream.getvalue() + "".join(str(message.headers) for message in dead)
    assert "job " in stream.getvalue()
    for secret in (SECRET, key, signature, "querysecret"):
        assert secret not in written


async def test_broker_connection_loss_turns_health_503_and_back(
    names: Names, amqp: Broker, receiver_factory: ReceiverFactory, start_daemon: DaemonFactory
) -> None:
    """When RabbitMQ drops the connection, health fails, the daemon reconnects and delivers."""
    receiver = await receiver_factory(status(200))
    cfg = make_config(names)
    daemon = await start_daemon(cfg)
    try:
        async with HealthWatch(daemon) as health:
            await rabbitmqctl.close_connections("formcraftd connection test")
            await health.went_down_and_up()
    finally:
        # whatever happened, wait for our own robust connection to be back
        await amqp.connection.connected.wait()
    await amqp.publish(cfg.workers.webhook.queue, webhook_job(receiver.url))
    await receiver.wait_for(1)
    assert "formcraftd_reconnects_total 1.0" in daemon.render_metrics().decode()


async def test_a_consumer_cancelled_by_the_broker_subscribes_again(
    names: Names, amqp: Broker, receiver_factory: ReceiverFactory, start_daemon: DaemonFactory
) -> None:
    """The main queue deleted under the daemon: it is declared again and consumed again."""
    receiver = await receiver_factory(status(200))
    cfg = make_config(names)
    daemon = await start_daemon(cfg)
    queue = cfg.workers.webhook.queue
    channel = await amqp.connection.channel()
    try:
        await channel.queue_delete(queue)  # the broker sends basic.cancel to our consumer
    finally:
        await channel.close()
    consumer = daemon.consumers[queue]
    for _ in range(100):
        if not consumer.consuming:
            break
        await asyncio.sleep(0.05)
    assert not consumer.consuming  # /healthz says so while it is not consuming
    for _ in range(300):
        if consumer.consuming:
            break
        await asyncio.sleep(0.05)
    assert consumer.consuming
    await amqp.publish(queue, webhook_job(receiver.url))
    await receiver.wait_for(1)
    await _until(lambda: amqp.depth(queue), 0)
