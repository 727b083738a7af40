"""Redeliveries: a lost ack does not resend, and poison messages stop looping."""

from __future__ import annotations

import asyncio

import pytest

from formcraftd.amqp import acks as acks_module
from formcraftd.amqp.connection import Broker as DaemonBroker
from formcraftd.amqp.topology import WorkerTopology
from formcraftd.core.config import Config
from tests.conftest import DaemonFactory, ReceiverFactory
from tests.support import Broker, Names, make_config, rabbitmqctl, webhook_job

pytestmark = [pytest.mark.faults, pytest.mark.e2e]


async def test_a_job_whose_ack_was_lost_is_not_sent_again(
    names: Names,
    amqp: Broker,
    receiver_factory: ReceiverFactory,
    start_daemon: DaemonFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Work done, ack lost with the connection: the redelivery is acked, not re-sent."""
    lost: list[bool] = []
    real_ack = acks_module.Acks.ack

    def lose_first_ack(self: acks_module.Acks, delivery: acks_module.Delivery) -> None:
        if not lost:
            lost.append(True)  # never sent: the delivery stays unacked on its channel
            return
        real_ack(self, delivery)

    monkeypatch.setattr(acks_module.Acks, "ack", lose_first_ack)
    receiver = await receiver_factory()
    cfg = make_config(names)
    daemon = await start_daemon(cfg)
    await amqp.publish(cfg.workers.webhook.queue, webhook_job(receiver.url))
    await receiver.wait_for(1)
    assert lost
    try:
        await rabbitmqctl.close_connections("formcraftd fault test")
    finally:
        await amqp.connection.connected.wait()
    queue = cfg.workers.webhook.queue
    for _ in range(200):
        if f'formcraftd_duplicates_skipped_total{{queue="{queue}"}} 1.0' in (
            daemon.render_metrics().decode()
        ):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the redelivered job was never recognised")
    assert len(receiver.requests) == 1
    assert await amqp.depth(queue) == 0


async def _redeliver(amqp: Broker, queue: str, body: bytes, headers: dict[str, object]) -> None:
    """Publish a job and bounce it once so RabbitMQ flags it as redelivered."""
    await amqp.publish(queue, body, headers=headers)
    channel = await amqp.connection.channel()
    try:
        q = await channel.declare_queue(queue, passive=True)
        message = None
        for _ in range(100):
            message = await q.get(no_ack=False, fail=False)
            if message is not None:
                break
            await asyncio.sleep(0.05)
        assert message is not None
        await message.nack(requeue=True)
    finally:
        await channel.close()


async def test_classic_queue_dead_letters_a_message_redelivered_too_often(
    names: Names, amqp: Broker, receiver_factory: ReceiverFactory, start_daemon: DaemonFactory
) -> None:
    """A message already redelivered max_redeliveries times is dead-lettered, not run."""
    receiver = await receiver_factory()
    cfg = make_config(names, daemon={"max_redeliveries": 3})
    amqp.track(cfg)
    await _declare(cfg)
    queue = cfg.workers.webhook.queue
    await _redeliver(amqp, queue, webhook_job(receiver.url), {"x-formcraft-redeliveries": 3})
    await start_daemon(cfg)
    [dead] = await amqp.take(f"dlq.{queue}", 1)
    assert dead.headers["x-formcraft-error-code"] == "RETRIES_EXHAUSTED"
    assert "redelivered 4 times" in str(dead.headers["x-formcraft-error"])
    assert receiver.requests == []


async def test_classic_queue_counts_a_redelivery_and_still_delivers(
    names: Names, amqp: Broker, receiver_factory: ReceiverFactory, start_daemon: DaemonFactory
) -> None:
    """A redelivered message under the limit is counted, moved to the tail and delivered."""
    receiver = await receiver_factory()
    cfg = make_config(names)
    amqp.track(cfg)
    await _declare(cfg)
    queue = cfg.workers.webhook.queue
    await _redeliver(amqp, queue, webhook_job(receiver.url), {})
    await start_daemon(cfg)
    await receiver.wait_for(1)
    await asyncio.sleep(0.3)
    assert len(receiver.requests) == 1
    assert await amqp.depth(f"dlq.{queue}") == 0


async def _declare(cfg: Config) -> None:
    broker = DaemonBroker(cfg.broker)
    await broker.connect()
    try:
        await broker.declare(WorkerTopology.build(cfg.workers.webhook, cfg.broker))
    finally:
        await broker.aclose()


async def test_quorum_delivery_limit_stops_a_poison_message(names: Names, amqp: Broker) -> None:
    """On quorum queues RabbitMQ itself dead-letters a message past x-delivery-limit."""
    cfg = make_config(names, broker={"queue_type": "quorum", "delivery_limit": 2})
    amqp.track(cfg)
    await _declare(cfg)
    queue = cfg.workers.webhook.queue
    await amqp.publish(queue, b'{"poison": true}')
    channel = await amqp.connection.channel()
    try:
        q = await channel.declare_queue(queue, passive=True)
        bounced = 0
        for _ in range(400):
            message = await q.get(no_ack=False, fail=False)
            if message is None:
                if await amqp.depth(f"dlq.{queue}") == 1:
                    break
                await asyncio.sleep(0.05)
                continue
            bounced += 1
            await message.nack(requeue=True)  # as if the process died on it
    finally:
        await channel.close()
    assert bounced == 3  # the first delivery and two redeliveries
    [dead] = await amqp.take(f"dlq.{queue}", 1)
    assert dead.body == b'{"poison": true}'
    assert isinstance(dead.headers.get("x-death"), list | tuple)
