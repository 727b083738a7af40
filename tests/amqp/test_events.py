"""Delivery events: one per attempt, right fields, no secrets, never in a job's way."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import aio_pika
import msgspec
import orjson
import pamqp.frame
import pytest
from aiohttp import web

from formcraftd.amqp import events as events_module
from formcraftd.amqp.confirms import ConfirmingPublisher
from formcraftd.core.events import TokenRefreshedEvent, now, routing_key
from tests.conftest import DaemonFactory, ReceiverFactory
from tests.support import (
    AMQP_URL,
    VHOST,
    Broker,
    Names,
    TcpProxy,
    amqp_url,
    paced,
    rabbitmqctl,
    webhook_job,
)
from tests.support.events import (
    EventTap,
    Publishing,
    StubConnection,
    delivery,
    events_config,
    publish_when_routed,
    publishing,
    publishing_batch,
    tail_config,
)
from tests.support.google import CLIENT_SECRET, Failure, FakeGoogle, sheets_job_body
from tests.support.process import run_cli
from tests.support.smtp import SmtpServer, email_body, running_servers

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

SECRET = "whsec_ZXZlbnRzLXRlc3Qtc2VjcmV0"
SMTP_PASSWORD = "smtp-password-never-in-events"


def status(code: int):  # type: ignore[no-untyped-def]
    async def answer(_request: web.Request, _n: int) -> web.StreamResponse:
        return web.Response(status=code, text=f"answer {code}")

    return answer


async def test_each_webhook_attempt_publishes_exactly_one_event(
    names: Names,
    amqp: Broker,
    tap: EventTap,
    receiver_factory: ReceiverFactory,
    start_daemon: DaemonFactory,
) -> None:
    """Succeeded, retrying then dead_lettered, and validation: one event per attempt."""
    ok = await receiver_factory(status(200))
    failing = await receiver_factory(status(500))
    cfg = events_config(names, retry={"attempts": 2})
    await start_daemon(cfg)
    queue = cfg.workers.webhook.queue
    ok_id = await amqp.publish(queue, webhook_job(ok.url, secret=SECRET, form_id="form-ok"))
    bad_id = await amqp.publish(queue, webhook_job(failing.url, secret=SECRET, form_id="form-bad"))
    junk_id = await amqp.publish(queue, b"not json")
    await tap.wait(4)
    await tap.quiet()
    by_job: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for key, event in tap.events:
        by_job.setdefault(event["job_id"], []).append((key, event))
    [(key, event)] = by_job[ok_id]
    assert key == "webhook.succeeded"
    assert event["event"] == "delivery"
    assert (event["form_id"], event["submission_id"], event["attempt"]) == ("form-ok", "sub-1", 1)
    assert event["status_code"] == 200
    assert event["error_code"] is None
    assert event["response_snippet"] == "answer 200"
    assert event["duration_ms"] >= 0
    assert [k for k, _ in by_job[bad_id]] == ["webhook.retrying", "webhook.dead_lettered"]
    retrying, dead = (e for _, e in by_job[bad_id])
    assert (retrying["attempt"], retrying["status_code"]) == (1, 500)
    assert retrying["error_code"] == "HTTP_STATUS"  # a retried attempt says why, too
    assert (dead["attempt"], dead["error_code"]) == (2, "RETRIES_EXHAUSTED")
    assert "answer 500" in dead["response_snippet"]
    [(key, event)] = by_job[junk_id]
    assert (key, event["error_code"], event["form_id"]) == (
        "webhook.dead_lettered",
        "VALIDATION_ERROR",
        None,
    )
    assert len(tap.events) == 4
    assert all(SECRET not in body.decode() for body in tap.raw)


async def test_a_delayed_attempt_publishes_a_delayed_event(
    names: Names,
    amqp: Broker,
    tap: EventTap,
    receiver_factory: ReceiverFactory,
    start_daemon: DaemonFactory,
) -> None:
    """A job held back by an open breaker gives a webhook.delayed event."""
    failing = await receiver_factory(status(503))
    cfg = events_config(
        names,
        retry={"attempts": 1},
        breaker={"failure_threshold": 1, "reset_timeout_ms": 60000},
    )
    await start_daemon(cfg)
    queue = cfg.workers.webhook.queue
    await amqp.publish(queue, webhook_job(failing.url, submission_id="a"))
    await tap.wait(2)  # the breaker opened (endpoint_failing) and the job dead-lettered
    await amqp.publish(queue, webhook_job(failing.url, submission_id="b"))
    events = await tap.wait(3)
    keys = [key for key, _ in events]
    assert sorted(keys[:2]) == ["webhook.dead_lettered", "webhook.endpoint_failing"]
    assert keys[2] == "webhook.delayed"
    assert events[2][1]["attempt"] == 1


async def test_email_events_and_no_smtp_password(
    names: Names, amqp: Broker, tap: EventTap, tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    """A sent mail is email.succeeded; a refused recipient is email.dead_lettered."""
    async with running_servers() as start_smtp:
        server: SmtpServer = await start_smtp()
        server.script.rcpt["gone@example.com"] = ["550 5.1.1 no such user"]
        cfg = events_config(
            names,
            webhook={"enabled": False},
            email={
                "enabled": True,
                "smtp_host": "127.0.0.1",
                "smtp_port": server.port,
                "smtp_password": SMTP_PASSWORD,
                "state_dir": str(tmp_path),
            },
        )
        server.script.rcpt["busy@example.com"] = ["452 4.2.2 mailbox full", "250 ok"]
        await start_daemon(cfg)
        queue = cfg.workers.email.queue
        await amqp.publish(queue, email_body("gone@example.com"))
        await tap.wait(1)
        await amqp.publish(queue, email_body("owner@example.com"))
        await tap.wait(2)
        await amqp.publish(queue, email_body("busy@example.com"))
        events = await tap.wait(4)
    assert [key for key, _ in events] == [
        "email.dead_lettered",
        "email.succeeded",
        "email.retrying",
        "email.succeeded",
    ]
    assert events[0][1]["error_code"] == "RECIPIENT_REJECTED"
    assert (events[2][1]["status_code"], events[3][1]["attempt"]) == (452, 2)
    assert all(SMTP_PASSWORD not in body.decode() for body in tap.raw)


async def test_sheets_events_and_token_refreshed(
    names: Names, amqp: Broker, tap: EventTap, start_daemon: DaemonFactory
) -> None:
    """An expired token is refreshed: sheets.token_refreshed with the new token, then succeeded."""
    google = await FakeGoogle().start()
    try:
        google.add_spreadsheet("sheet-1")
        refresh, _, _ = google.add_user()
        cfg = events_config(
            names, webhook={"enabled": False}, sheets=google.sheets_config(batch_window_ms=0)
        )
        await start_daemon(cfg)
        google.script.append(Failure(503))
        body = sheets_job_body(
            refresh_token=refresh, access_token="stale", expiry_ms=1, form_id="form-s"
        )
        await amqp.publish(cfg.workers.sheets.queue, body)
        events = await tap.wait(3)
    finally:
        await google.stop()
    keys = {key: event for key, event in events}
    assert sorted(keys) == ["sheets.retrying", "sheets.succeeded", "sheets.token_refreshed"]
    assert keys["sheets.retrying"]["status_code"] == 503
    refreshed = keys["sheets.token_refreshed"]
    assert refreshed["event"] == "token_refreshed"
    assert refreshed["form_id"] == "form-s"
    assert refreshed["access_token"] and refreshed["access_token"] != "stale"
    assert refreshed["expiry_date"] > time.time() * 1000
    assert keys["sheets.succeeded"]["form_id"] == "form-s"
    for raw in tap.raw:
        assert refresh not in raw.decode()
        assert CLIENT_SECRET not in raw.decode()


async def test_jobs_succeed_when_the_events_exchange_cannot_be_used(
    names: Names, amqp: Broker, receiver_factory: ReceiverFactory, start_daemon: DaemonFactory
) -> None:
    """An events exchange of the wrong type: events are dropped and counted, jobs go on."""
    channel = await amqp.connection.channel()
    await channel.declare_exchange(f"{names.prefix}.events", aio_pika.ExchangeType.FANOUT)
    await channel.close()
    try:
        receiver = await receiver_factory(status(200))
        daemon = await start_daemon(events_config(names))
        for i in range(5):
            await amqp.publish(
                daemon.config.workers.webhook.queue, webhook_job(receiver.url, submission_id=str(i))
            )
        await receiver.wait_for(5)
        deadline = time.monotonic() + 10
        while daemon.metrics.events_dropped._value.get() < 5:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        channel = await amqp.connection.channel()
        await channel.exchange_delete(f"{names.prefix}.events")
        await channel.close()


@pytest.mark.whole_broker
async def test_jobs_succeed_while_the_broker_blocks_publishers(
    names: Names, amqp: Broker, receiver_factory: ReceiverFactory, start_daemon: DaemonFactory
) -> None:
    """With RabbitMQ's memory alarm on (publishers blocked), jobs are still delivered."""
    receiver = await receiver_factory(status(200))
    daemon = await start_daemon(events_config(names))
    queue = daemon.config.workers.webhook.queue
    for i in range(5):
        await amqp.publish(queue, webhook_job(receiver.url, submission_id=str(i)))
    watermark = await _memory_high_watermark()
    try:
        await rabbitmqctl.run_async("set_vm_memory_high_watermark", "0.000001")
        await receiver.wait_for(5, timeout=20)
    finally:
        await rabbitmqctl.run_async("set_vm_memory_high_watermark", *watermark)
    assert await amqp.depth(queue) == 0


async def _memory_high_watermark() -> list[str]:
    """The node's memory high watermark, as `set_vm_memory_high_watermark` arguments."""
    status = json.loads(await rabbitmqctl.run_async("status", "--formatter", "json"))
    [(kind, value)] = status["vm_memory_high_watermark_setting"].items()
    return [str(value)] if kind == "relative" else ["absolute", str(value)]


async def test_events_tail_prints_events_as_they_arrive(
    tmp_path: Path,
    names: Names,
    amqp: Broker,
    receiver_factory: ReceiverFactory,
    start_daemon: DaemonFactory,
) -> None:
    """`formcraftd events tail --filter 'webhook.*'` prints each event as one JSON line."""
    receiver = await receiver_factory(status(200))
    cfg = events_config(names)
    await start_daemon(cfg)
    config_file = tail_config(tmp_path, names, enabled=True)
    tail = asyncio.create_task(
        asyncio.to_thread(
            run_cli,
            "events",
            "tail",
            "--filter",
            "webhook.*",
            "--count",
            "1",
            "--config",
            str(config_file),
        )
    )
    await asyncio.sleep(2)  # the temporary queue is bound by now
    await amqp.publish(cfg.workers.webhook.queue, webhook_job(receiver.url, form_id="tail"))
    result = await asyncio.wait_for(tail, 60)
    assert result.returncode == 0, result.stderr
    event = orjson.loads(result.stdout.splitlines()[0])
    assert (event["kind"], event["outcome"], event["form_id"]) == ("webhook", "succeeded", "tail")


def test_events_tail_with_events_off_and_no_exchange_says_so_and_exits_1(
    tmp_path: Path, names: Names
) -> None:
    """`events tail` with `[events] enabled = false` and no exchange: one line, exit 1."""
    config_file = tail_config(tmp_path, names, enabled=False)
    result = run_cli("events", "tail", "--config", str(config_file))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert "delivery events are off" in result.stderr
    assert "set enabled = true under [events]" in result.stderr


async def test_events_tail_with_events_off_tails_an_exchange_that_exists(
    tmp_path: Path, names: Names, amqp: Broker
) -> None:
    """With events off but the exchange declared by another daemon, tail goes on and says so."""
    channel = await amqp.connection.channel(publisher_confirms=True, on_return_raises=True)
    exchange = await channel.declare_exchange(
        f"{names.prefix}.events", aio_pika.ExchangeType.TOPIC, durable=True
    )
    config_file = tail_config(tmp_path, names, enabled=False)
    try:
        tail = asyncio.create_task(
            asyncio.to_thread(
                run_cli, "events", "tail", "--count", "1", "--config", str(config_file)
            )
        )
        await publish_when_routed(
            exchange, aio_pika.Message(b'{"kind": "webhook"}'), "webhook.succeeded"
        )
        result = await asyncio.wait_for(tail, 30)
    finally:
        await channel.exchange_delete(f"{names.prefix}.events")
        await channel.close()
    assert result.returncode == 0, result.stderr
    assert result.stdout == '{"kind": "webhook"}\n'
    assert "delivery events are off" in result.stderr


async def test_a_burst_of_jobs_loses_no_event(
    names: Names,
    amqp: Broker,
    tap: EventTap,
    receiver_factory: ReceiverFactory,
    start_daemon: DaemonFactory,
) -> None:
    """300 jobs at once: 300 events arrive and none is dropped (they go out in batches)."""
    receiver = await receiver_factory(status(200))
    daemon = await start_daemon(events_config(names, webhook={"concurrency": 32}))
    channel = await amqp.connection.channel(publisher_confirms=True)
    try:
        await asyncio.gather(
            *(
                channel.default_exchange.publish(
                    aio_pika.Message(webhook_job(receiver.url, submission_id=str(i))),
                    routing_key=daemon.config.workers.webhook.queue,
                )
                for i in range(300)
            )
        )
    finally:
        await channel.close()
    await tap.wait(300, timeout=30)
    assert daemon.metrics.events_dropped._value.get() == 0
    assert {event["submission_id"] for _, event in tap.events} == {str(i) for i in range(300)}


async def test_the_events_of_jobs_finished_during_shutdown_are_published(
    names: Names,
    amqp: Broker,
    tap: EventTap,
    receiver_factory: ReceiverFactory,
    start_daemon: DaemonFactory,
) -> None:
    """A job that completes while the daemon drains still gets its event out."""
    receiver = await receiver_factory(paced(0.5))
    daemon = await start_daemon(events_config(names))
    await amqp.publish(daemon.config.workers.webhook.queue, webhook_job(receiver.url))
    await receiver.wait_for(1)
    daemon.request_shutdown()
    [(key, _)] = await tap.wait(1, timeout=10)
    assert key == "webhook.succeeded"


# --- the publisher itself, against the real broker -----------------------------------


async def test_events_go_out_with_their_properties(names: Names, tap: EventTap) -> None:
    """Routing key, JSON body, persistent, type = routing key, a message id of its own each.

    One event is larger than the broker's frame_max, so its body spans several frames.
    """
    token = TokenRefreshedEvent(form_id="form-1", access_token="ya29.new", expiry_date=1, at=now())
    large = delivery(2, outcome="dead_lettered", response_snippet="x" * 300_000)
    events = [delivery(1), large, token, delivery(3, kind="email", outcome="retrying")]
    async with publishing(names) as running:
        await running.emit(*events)
        assert (running.publisher.published, running.dropped()) == (4, 0)
    messages = [await tap.queue.get(no_ack=True, timeout=5) for _ in events]
    assert [m.routing_key for m in messages] == [routing_key(e) for e in events]
    assert [m.body for m in messages] == [msgspec.json.encode(e) for e in events]
    for message in messages:
        assert message.content_type == "application/json"
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert message.type == message.routing_key
        assert message.headers == {}
    ids = [m.message_id or "" for m in messages]
    assert len(set(ids)) == 4 and all(re.fullmatch("[0-9a-f]{32}", i) for i in ids)


async def test_nacked_events_are_dropped_counted_and_warned_about_once(
    names: Names, amqp: Broker, tap: EventTap, caplog: pytest.LogCaptureFixture
) -> None:
    """What a full queue refuses (Basic.Nack) is dropped and counted, with one warning."""
    channel = await amqp.connection.channel()
    full = await channel.declare_queue(
        exclusive=True, arguments={"x-max-length": 2, "x-overflow": "reject-publish"}
    )
    await full.bind(f"{names.prefix}.events", routing_key="#")
    with caplog.at_level(logging.WARNING, logger="formcraftd.events"):
        async with publishing(names) as running:
            await running.emit(*(delivery(n) for n in range(5)))
            assert (running.publisher.published, running.dropped()) == (2, 3)
            await running.emit(*(delivery(n) for n in range(5, 10)))
            assert (running.publisher.published, running.dropped()) == (2, 8)
    [warning] = [r for r in caplog.records if r.name == "formcraftd.events"]
    assert warning.getMessage().startswith("dropped 3 delivery events (unconfirmed)")
    await channel.close()


async def test_publishing_resumes_after_the_exchange_is_deleted(
    names: Names, amqp: Broker, tap: EventTap
) -> None:
    """A publish to a deleted exchange closes the channel: that event is dropped, the next
    batch declares the exchange again."""
    exchange = f"{names.prefix}.events"
    async with publishing(names) as running:
        await running.emit(delivery(1))
        channel = await amqp.connection.channel()
        await channel.exchange_delete(exchange)
        await running.emit(delivery(2))
        assert (running.publisher.published, running.dropped()) == (1, 1)
        await running.emit(delivery(3))
        assert (running.publisher.published, running.dropped()) == (2, 1)
        await channel.declare_exchange(exchange, passive=True)  # declared again
        await tap.queue.bind(exchange, routing_key="#")
        await running.emit(delivery(4))
        await channel.close()
    # job-3 went out before the tap's queue was bound to the new exchange
    assert [event["job_id"] for _, event in await tap.wait(2)] == ["job-1", "job-4"]


async def test_publishing_resumes_after_the_connection_is_lost(
    names: Names, tap: EventTap, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker vanishes mid-burst: what it did not confirm is dropped and counted, and
    events emitted after the loss wait for the reconnection and go out."""
    proxy = await TcpProxy().start()
    try:
        with caplog.at_level(logging.WARNING, logger="formcraftd.events"):
            async with publishing(names, amqp_url(proxy.port)) as running:
                await running.emit(delivery(0))
                for n in range(1, 3001):
                    running.publisher.emit(delivery(n))
                await asyncio.sleep(0)  # the first batch is written, its confirms awaited
                await proxy.kill()
                await proxy.start()
                async with asyncio.timeout(30):
                    await running.publisher.drained()
                published = running.publisher.published
                assert running.dropped() > 0
                assert published + running.dropped() == 3001
                await running.emit(*(delivery(n) for n in range(3001, 3011)))
                assert running.publisher.published == published + 10
                assert published + running.dropped() == 3001
    finally:
        await proxy.kill()
    assert len([r for r in caplog.records if r.name == "formcraftd.events"]) == 1
    await tap.quiet(0.2)
    job_ids = {event["job_id"] for _, event in tap.events}
    assert {f"job-{n}" for n in range(3001, 3011)} <= job_ids
    assert len(job_ids) == published + 10


async def test_publishing_resumes_after_the_broker_closes_the_connection(
    names: Names, tap: EventTap
) -> None:
    """RabbitMQ closes the events connection (only that one): the next batch goes out
    once the connection is back."""
    proxy = await TcpProxy().start()
    try:
        async with publishing(names, amqp_url(proxy.port)) as running:
            await running.emit(delivery(1))
            await _close_connections_through(proxy)
            await running.emit(delivery(2))
            assert (running.publisher.published, running.dropped()) == (2, 0)
    finally:
        await proxy.kill()
    assert [event["job_id"] for _, event in await tap.wait(2)] == ["job-1", "job-2"]


async def _close_connections_through(proxy: TcpProxy) -> None:
    """Have RabbitMQ close the connections that come through `proxy`, and nothing else."""
    ports = {writer.get_extra_info("sockname")[1] for writer in proxy._writers} - {proxy.port}
    listing = await rabbitmqctl.run_async(
        "list_connections", "--no-table-headers", "pid", "peer_port", "vhost"
    )
    pids = [
        pid
        for pid, port, vhost in (line.split("\t") for line in listing.splitlines() if line)
        if int(port) in ports and vhost == VHOST
    ]
    assert pids, f"no connection from ports {ports}"
    for pid in pids:
        await rabbitmqctl.run_async(
            "close_connection", pid, "test: the events connection goes away"
        )


async def test_confirms_in_any_order_count_each_ack_once() -> None:
    """Single and multiple acks and nacks, out of order: a batch ends with its last confirm."""
    publisher = ConfirmingPublisher(StubConnection(), "fc.events")  # type: ignore[arg-type]
    task = await publishing_batch(publisher, 5)
    publisher._confirm(2, multiple=True, acked=True)
    publisher._confirm(4, multiple=False, acked=True)
    publisher._confirm(3, multiple=False, acked=False)
    assert not task.done()
    publisher._confirm(5, multiple=True, acked=True)
    assert await task == 4
    publisher._confirm(5, multiple=True, acked=True)  # a late duplicate changes nothing


async def test_a_batch_that_times_out_counts_only_what_was_acked() -> None:
    """Unconfirmed when the time is up: dropped for good, later acks ignored."""
    publisher = ConfirmingPublisher(StubConnection(), "fc.events")  # type: ignore[arg-type]
    task = await publishing_batch(publisher, 3, within_s=0.2)
    publisher._confirm(1, multiple=False, acked=True)
    assert await task == 1
    publisher._confirm(3, multiple=True, acked=True)
    next_batch = await publishing_batch(publisher, 1)
    publisher._confirm(4, multiple=False, acked=True)
    assert await next_batch == 1


async def test_a_lost_connection_ends_the_batch_with_what_was_acked() -> None:
    """The connection goes after one ack: the batch returns at once with that one."""
    publisher = ConfirmingPublisher(StubConnection(), "fc.events")  # type: ignore[arg-type]
    task = await publishing_batch(publisher, 3)
    publisher._confirm(1, multiple=False, acked=True)
    publisher._fail_all(ConnectionResetError("gone"))
    assert await task == 1


async def test_each_message_is_the_frames_pamqp_reads_back() -> None:
    """Publish, content header and body frames that pamqp unmarshals to what was sent."""
    connection = StubConnection()
    connection.frame_max = 64  # a body longer than one frame is split
    publisher = ConfirmingPublisher(connection, "fc.events")  # type: ignore[arg-type]
    body = b'{"job": "' + b"x" * 110 + b'"}'  # 121 bytes: three frames of up to 56
    sending = asyncio.create_task(
        publisher.publish([("email.retrying", body, "a" * 32)], within_s=0.1)
    )
    assert await sending == 0
    frames, data = [], connection.written
    while data:
        consumed, _channel, frame = pamqp.frame.unmarshal(data)
        frames.append(frame)
        data = data[consumed:]
    publish, header, *chunks = frames
    assert (publish.exchange, publish.routing_key) == ("fc.events", "email.retrying")
    assert header.body_size == len(body)
    assert header.properties.message_id == "a" * 32
    assert header.properties.message_type == "email.retrying"
    assert header.properties.delivery_mode == 2
    assert b"".join(chunk.value for chunk in chunks) == body
    assert len(chunks) == 3


async def test_emit_drops_and_counts_past_the_buffer_size(names: Names) -> None:
    """The buffer holds BUFFER_SIZE events; more are dropped and counted, not queued."""
    running = Publishing(names, AMQP_URL)
    for n in range(events_module.BUFFER_SIZE + 3):
        running.publisher.emit(delivery(n))
    assert running.dropped() == 3
    assert len(running.publisher._buffer) == events_module.BUFFER_SIZE


async def test_events_emitted_before_the_publisher_runs_are_waited_for(
    names: Names, amqp: Broker
) -> None:
    """`drained()` does not return while an event waits for the publisher to start."""
    amqp.track_exchange(f"{names.prefix}.events")  # the publisher declares it
    running = Publishing(names, AMQP_URL)
    running.publisher.emit(delivery(1))
    drained = asyncio.create_task(running.publisher.drained())
    await asyncio.sleep(0.05)
    assert not drained.done()
    task = asyncio.create_task(running.publisher.run())
    try:
        async with asyncio.timeout(30):
            await drained
        assert (running.publisher.published, running.dropped()) == (1, 0)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
