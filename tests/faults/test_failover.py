"""Several broker URLs: when the node in use goes away for good, the daemon moves on."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conftest import DaemonFactory, ReceiverFactory
from tests.support import (
    AMQP_URL,
    BROKER_URL,
    Broker,
    Names,
    TcpProxy,
    amqp_url,
    make_config,
    webhook_job,
)

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.timeout(120)]


async def test_the_daemon_fails_over_to_the_next_node(
    names: Names, amqp: Broker, receiver_factory: ReceiverFactory, start_daemon: DaemonFactory
) -> None:
    """Node 1 (a proxy) dies mid-stream; the daemon reconnects through node 2 and delivers all."""
    proxy = await TcpProxy().start()
    receiver = await receiver_factory()
    nodes = f"{amqp_url(proxy.port)},{AMQP_URL}"
    cfg = make_config(names, broker={"url": nodes})
    daemon = await start_daemon(cfg)
    assert daemon.broker.connection.url.port == proxy.port
    queue = cfg.workers.webhook.queue
    for i in range(20):
        await amqp.publish(queue, webhook_job(receiver.url, submission_id=str(i)))
    await receiver.wait_for(20)
    try:
        await proxy.kill()
        deadline = time.monotonic() + 30
        while not (daemon.health()[0] and daemon.broker.connection.url.port == BROKER_URL.port):
            assert time.monotonic() < deadline, "the daemon never moved to the second node"
            await asyncio.sleep(0.1)
    finally:
        await proxy.kill()
    for i in range(20, 40):
        await amqp.publish(queue, webhook_job(receiver.url, submission_id=str(i)))
    await receiver.wait_for(40)
    assert "formcraftd_reconnects_total 1.0" in daemon.render_metrics().decode()
