"""Topology against the real RabbitMQ: what gets declared, clashes, quorum queues."""

from __future__ import annotations

import asyncio
import json

import aio_pika
import pytest
from aiohttp import web

from formcraftd.amqp.connection import Broker as DaemonBroker
from formcraftd.amqp.topology import WorkerTopology, dead_letter_queue_name, retry_queue_name
from formcraftd.core.errors import BrokerUnreachable, TopologyError
from tests.conftest import DaemonFactory, ReceiverFactory
from tests.support import VHOST, Broker, Names, make_config, rabbitmqctl, webhook_job

pytestmark = [pytest.mark.e2e]


def test_topology_has_one_wait_queue_per_delay_tier(names: Names) -> None:
    """The defaults give wait queues 1000 ... 32000 and 60000, each dead-lettering home."""
    cfg = make_config(names, retry={"initial_delay_ms": 1000, "max_delay_ms": 60000})
    topology = WorkerTopology.build(cfg.workers.webhook, cfg.broker)
    queue = cfg.workers.webhook.queue
    assert [spec.name for spec in topology.retry_queues] == [
        f"{queue}.retry.{delay}" for delay in (1000, 2000, 4000, 8000, 16000, 32000, 60000)
    ]
    wait = topology.retry_queues[0].arguments
    assert wait["x-message-ttl"] == 1000
    assert wait["x-dead-letter-exchange"] == ""
    assert wait["x-dead-letter-routing-key"] == queue
    assert (
        topology.main.arguments["x-dead-letter-exchange"]
        == cfg.workers.webhook.dead_letter_exchange
    )
    assert topology.dead_letter_queue.name == f"dlq.{queue}"


async def test_declare_creates_every_entity(names: Names, amqp: Broker) -> None:
    """After declare, the main queue, the DLQ and every wait queue exist on the broker."""
    cfg = make_config(names)
    amqp.track(cfg)
    broker = DaemonBroker(cfg.broker)
    await broker.connect()
    try:
        topology = WorkerTopology.build(cfg.workers.webhook, cfg.broker)
        await broker.declare(topology)
        await broker.declare(topology)  # idempotent
    finally:
        await broker.aclose()
    for spec in topology.queues():
        assert await amqp.depth(spec.name) == 0


async def test_a_clashing_queue_is_a_clear_start_up_error(
    names: Names, amqp: Broker, start_daemon: DaemonFactory
) -> None:
    """A main queue with another dead-letter exchange names the queue and the argument."""
    cfg = make_config(names)
    amqp.track(cfg)
    channel = await amqp.connection.channel()
    await channel.declare_queue(
        cfg.workers.webhook.queue,
        durable=True,
        arguments={"x-dead-letter-exchange": "somewhere.else"},
    )
    await channel.close()
    with pytest.raises(TopologyError) as caught:
        await start_daemon(cfg)
    message = str(caught.value)
    assert cfg.workers.webhook.queue in message
    assert "x-dead-letter-exchange" in message


async def test_unreachable_broker_raises_after_the_connect_timeout(names: Names) -> None:
    """No broker on the port: BrokerUnreachable once connect_timeout_s has passed."""
    cfg = make_config(
        names, broker={"url": "amqp://guest:secretpw@127.0.0.1:1/", "connect_timeout_s": 0.5}
    )
    broker = DaemonBroker(cfg.broker)
    with pytest.raises(BrokerUnreachable) as caught:
        await broker.connect()
    assert "secretpw" not in str(caught.value)


async def test_quorum_queues_work_end_to_end(
    names: Names, amqp: Broker, receiver_factory: ReceiverFactory, start_daemon: DaemonFactory
) -> None:
    """With queue_type quorum every queue is a quorum queue, and a retry still delivers."""

    async def fail_once(_request: web.Request, n: int) -> web.StreamResponse:
        return web.Response(status=500 if n == 1 else 200)

    receiver = await receiver_factory(fail_once)
    cfg = make_config(names, broker={"queue_type": "quorum"})
    await start_daemon(cfg)
    await amqp.publish(cfg.workers.webhook.queue, webhook_job(receiver.url))
    await receiver.wait_for(2)
    listing = await rabbitmqctl.run_async(
        "list_queues", "-p", VHOST, "name", "type", "--formatter", "json"
    )
    types = {q["name"]: q["type"] for q in json.loads(listing)}
    topology = WorkerTopology.build(cfg.workers.webhook, cfg.broker)
    assert {types[spec.name] for spec in topology.queues()} == {"quorum"}


async def test_dead_letter_ttl_gives_the_dlq_a_message_ttl(names: Names, amqp: Broker) -> None:
    """dead_letter_ttl_ms is declared as the DLQ's x-message-ttl, so old dead letters expire."""
    cfg = make_config(names, webhook={"dead_letter_ttl_ms": 200})
    amqp.track(cfg)
    topology = WorkerTopology.build(cfg.workers.webhook, cfg.broker)
    assert topology.dead_letter_queue.arguments["x-message-ttl"] == 200
    broker = DaemonBroker(cfg.broker)
    await broker.connect()
    try:
        await broker.declare(topology)
    finally:
        await broker.aclose()
    channel = await amqp.connection.channel()
    try:
        exchange = await channel.get_exchange(cfg.workers.webhook.dead_letter_exchange)
        await exchange.publish(aio_pika.Message(b"{}"), routing_key="")
    finally:
        await channel.close()
    assert await amqp.depth(topology.dead_letter_queue.name) == 1
    await asyncio.sleep(0.5)
    assert await amqp.depth(topology.dead_letter_queue.name) == 0


def test_quorum_topology_dead_letters_at_least_once(names: Names) -> None:
    """Quorum main and wait queues use at-least-once dead-lettering and a delivery limit."""
    cfg = make_config(names, broker={"queue_type": "quorum", "delivery_limit": 7})
    topology = WorkerTopology.build(cfg.workers.webhook, cfg.broker)
    for spec in (topology.main, *topology.retry_queues):
        assert spec.arguments["x-queue-type"] == "quorum"
        assert spec.arguments["x-dead-letter-strategy"] == "at-least-once"
        assert spec.arguments["x-overflow"] == "reject-publish"
    assert topology.main.arguments["x-delivery-limit"] == 7
    assert topology.dead_letter_queue.arguments["x-queue-type"] == "quorum"


def test_sheets_single_active_consumer_is_declared(names: Names) -> None:
    """workers.sheets.single_active_consumer sets x-single-active-consumer on its queue only."""
    cfg = make_config(names, sheets={"single_active_consumer": True})
    sheets = WorkerTopology.build(cfg.workers.sheets, cfg.broker)
    webhook = WorkerTopology.build(cfg.workers.webhook, cfg.broker)
    assert sheets.main.arguments["x-single-active-consumer"] is True
    assert "x-single-active-consumer" not in webhook.main.arguments


def test_the_names_of_wait_queues_and_dead_letter_queues() -> None:
    """A wait queue is named after its main queue and delay; a DLQ is `dlq.<queue>`."""
    assert retry_queue_name("webhook_tasks", 1000) == "webhook_tasks.retry.1000"
    assert dead_letter_queue_name("webhook_tasks") == "dlq.webhook_tasks"
