"""The broker goes away mid-stream: the daemon reconnects by itself and loses nothing."""

from __future__ import annotations

import asyncio
import time

import pytest

from formcraftd.daemon import Daemon
from formcraftd.workers.webhook.signing import webhook_id
from tests.conftest import DaemonFactory, ReceiverFactory
from tests.support import Broker, HealthWatch, Names, make_config, paced, rabbitmqctl, webhook_job

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.timeout(240)]

JOBS = 300


async def wait_health(daemon: Daemon, healthy: bool, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while daemon.health()[0] != healthy:
        assert time.monotonic() < deadline, f"health never became {healthy}"
        await asyncio.sleep(0.02)


async def publish_all(amqp: Broker, queue: str, url: str) -> list[str]:
    return [await amqp.publish(queue, webhook_job(url, submission_id=str(i))) for i in range(JOBS)]


async def assert_all_delivered(receiver_requests: list, ids: list[str], url: str) -> int:  # type: ignore[type-arg]
    """Every job arrived at least once; the number of duplicates."""
    got = [request.headers["webhook-id"] for request in receiver_requests]
    wanted = {webhook_id(job_id, url) for job_id in ids}
    lost = len(wanted - set(got))
    duplicates = len(got) - len(set(got))
    print(f"\n{len(ids)} sent, {len(set(got))} delivered, {duplicates} duplicates, {lost} lost")
    assert not lost, f"{lost} jobs lost"
    return duplicates


async def test_connections_closed_mid_stream(
    names: Names, amqp: Broker, receiver_factory: ReceiverFactory, start_daemon: DaemonFactory
) -> None:
    """The broker closes the connections while jobs flow: 503 then 200, a reconnect
    counted, all delivered."""
    receiver = await receiver_factory(paced(0.01))
    cfg = make_config(names, webhook={"concurrency": 8})
    daemon = await start_daemon(cfg)
    ids = await publish_all(amqp, cfg.workers.webhook.queue, receiver.url)
    await receiver.wait_for(JOBS // 4)
    try:
        async with HealthWatch(daemon) as health:
            await rabbitmqctl.close_connections("fault test")
            await health.went_down_and_up()
    finally:
        await amqp.connection.connected.wait()
    await receiver.wait_for(JOBS, timeout=60)
    await asyncio.sleep(0.5)
    duplicates = await assert_all_delivered(receiver.requests, ids, receiver.url)
    assert duplicates <= 2 * 8 * 2  # at most the unacked window of one channel
    metrics = daemon.render_metrics().decode()
    assert "formcraftd_reconnects_total 1.0" in metrics
    assert "formcraftd_broker_connected 1.0" in metrics


@pytest.mark.whole_broker
async def test_broker_application_stopped_and_started(
    names: Names, amqp: Broker, receiver_factory: ReceiverFactory, start_daemon: DaemonFactory
) -> None:
    """stop_app / start_app mid-stream: the daemon waits, reconnects and delivers every job."""
    receiver = await receiver_factory(paced(0.01))
    cfg = make_config(names, webhook={"concurrency": 8})
    daemon = await start_daemon(cfg)
    ids = await publish_all(amqp, cfg.workers.webhook.queue, receiver.url)
    await receiver.wait_for(JOBS // 4)
    try:
        await rabbitmqctl.run_async("stop_app", timeout=120)
        await wait_health(daemon, False, 20)
        await asyncio.sleep(2)
        assert not daemon.health()[0]
    finally:
        await rabbitmqctl.run_async("start_app", timeout=120)
        await rabbitmqctl.run_async("await_startup", timeout=120)
    await wait_health(daemon, True, 60)
    await amqp.connection.connected.wait()
    await receiver.wait_for(JOBS, timeout=90)
    await asyncio.sleep(0.5)
    await assert_all_delivered(receiver.requests, ids, receiver.url)
    assert await amqp.depth(f"dlq.{cfg.workers.webhook.queue}") == 0
