"""SIGKILL in the middle of 1000 jobs: after a restart every job has been delivered."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from formcraftd.amqp.connection import Broker as DaemonBroker
from formcraftd.amqp.topology import WorkerTopology
from formcraftd.workers.webhook.signing import webhook_id
from tests.conftest import ReceiverFactory
from tests.support import Broker, Names, make_config, paced, webhook_job
from tests.support.process import free_port, spawn, wait_exit, wait_healthy, write_config

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.timeout(240)]

JOBS = 1000


async def test_sigkill_mid_stream_loses_nothing(
    tmp_path: Path, names: Names, amqp: Broker, receiver_factory: ReceiverFactory
) -> None:
    """Kill -9 with jobs in flight, start again: all 1000 arrive, duplicates counted."""
    receiver = await receiver_factory(paced(0.005))
    cfg = make_config(names)
    amqp.track(cfg)
    port = free_port()
    config_file = write_config(tmp_path / "config.toml", names, port=port, concurrency=16)
    broker = DaemonBroker(cfg.broker)
    await broker.connect()
    try:
        await broker.declare(WorkerTopology.build(cfg.workers.webhook, cfg.broker))
    finally:
        await broker.aclose()
    ids = [
        await amqp.publish(
            cfg.workers.webhook.queue, webhook_job(receiver.url, submission_id=str(i))
        )
        for i in range(JOBS)
    ]
    first = spawn("run", "--config", str(config_file), log=tmp_path / "first.log")
    try:
        await receiver.wait_for(JOBS // 3, timeout=60)
        first.send_signal(signal.SIGKILL)
        assert await wait_exit(first, 10) == -signal.SIGKILL
    finally:
        if first.poll() is None:
            first.kill()
        first.wait()
    before_restart = len(receiver.requests)
    second = spawn("run", "--config", str(config_file), log=tmp_path / "second.log")
    try:
        await wait_healthy(port)
        wanted = {webhook_id(job_id, receiver.url) for job_id in ids}
        for _ in range(1200):
            if wanted <= {r.headers["webhook-id"] for r in receiver.requests}:
                break
            await asyncio.sleep(0.05)
        second.send_signal(signal.SIGTERM)
        assert await wait_exit(second, 30) == 0
    finally:
        if second.poll() is None:
            second.kill()
        second.wait()
    got = [request.headers["webhook-id"] for request in receiver.requests]
    lost = wanted - set(got)
    duplicates = len(got) - len(set(got))
    print(
        f"\ncrash test: {JOBS} sent, {len(set(got))} delivered, {duplicates} duplicates, "
        f"{len(lost)} lost ({before_restart} requests before the kill)"
    )
    assert not lost
    assert duplicates <= 2 * 16  # at most the unacked window (prefetch) of the killed process
    assert await amqp.depth(cfg.workers.webhook.queue) == 0
