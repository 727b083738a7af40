"""Job priorities: x-max-priority on the main queue, kept through retries, dead letters, replay."""

from __future__ import annotations

import logging

import aio_pika
import orjson
import pytest
from aiohttp import web

from formcraftd.amqp import dead_letters
from formcraftd.amqp.topology import WorkerTopology, declare_topology, priority_warning
from formcraftd.core.errors import ConfigError, TopologyError
from tests.conftest import DaemonFactory, ReceiverFactory
from tests.support import Broker, Names, make_config, webhook_job

LOW, HIGH = 0, 9
BACKLOG, URGENT = 20, 5


def test_max_priority_gives_the_main_queue_x_max_priority(names: Names) -> None:
    """Only the main queue is a priority queue; wait queues and the DLQ stay plain."""
    cfg = make_config(names, webhook={"max_priority": 9})
    topology = WorkerTopology.build(cfg.workers.webhook, cfg.broker)
    assert topology.main.arguments["x-max-priority"] == 9
    for spec in (topology.dead_letter_queue, *topology.retry_queues):
        assert "x-max-priority" not in spec.arguments
    plain = WorkerTopology.build(make_config(names).workers.webhook, cfg.broker)
    assert "x-max-priority" not in plain.main.arguments


def test_quorum_queues_are_declared_without_x_max_priority_and_a_warning(names: Names) -> None:
    """With quorum queues the argument is left out and the warning names the version needed."""
    cfg = make_config(names, broker={"queue_type": "quorum"}, webhook={"max_priority": 9})
    topology = WorkerTopology.build(cfg.workers.webhook, cfg.broker)
    assert "x-max-priority" not in topology.main.arguments
    warning = priority_warning("webhook", cfg.workers.webhook, cfg.broker)
    assert "workers.webhook.max_priority" in warning
    assert "RabbitMQ 4.0" in warning
    classic = make_config(names, webhook={"max_priority": 9})
    assert priority_warning("webhook", classic.workers.webhook, classic.broker) == ""


@pytest.mark.parametrize("value", [-1, 256])
def test_max_priority_out_of_range_is_a_config_error_naming_the_key(
    names: Names, value: int
) -> None:
    with pytest.raises(ConfigError, match=r"key workers\.email\.max_priority"):
        make_config(names, email={"max_priority": value})


def job_for(url: str, label: str) -> bytes:
    return webhook_job(url, body={"label": label})


@pytest.mark.e2e
async def test_high_priority_jobs_overtake_a_backlog_of_low_ones(
    names: Names, amqp: Broker, receiver_factory: ReceiverFactory, start_daemon: DaemonFactory
) -> None:
    """20 low jobs wait in a paused queue, 5 high ones come after: the high ones go first."""
    receiver = await receiver_factory()
    cfg = make_config(names, webhook={"max_priority": 9, "concurrency": 1})
    daemon = await start_daemon(cfg)
    queue = cfg.workers.webhook.queue
    consumer = daemon.consumers[queue]
    await consumer.pause()
    for n in range(BACKLOG):
        await amqp.publish(queue, job_for(receiver.url, f"low-{n}"), priority=LOW)
    for n in range(URGENT):
        await amqp.publish(queue, job_for(receiver.url, f"high-{n}"), priority=HIGH)
    assert await amqp.depth(queue) == BACKLOG + URGENT
    await consumer.resume()
    received = await receiver.wait_for(BACKLOG + URGENT, timeout=30)
    labels = [orjson.loads(request.body)["label"] for request in received]
    # The paused consumer held nothing, so the broker hands the high ones out first; a
    # prefetched low job could at most have been taken before them.
    first = labels[: URGENT + consumer.prefetch]
    assert {f"high-{n}" for n in range(URGENT)} <= set(first), labels


@pytest.mark.e2e
async def test_the_priority_survives_retries_and_dead_lettering(
    names: Names, amqp: Broker, receiver_factory: ReceiverFactory, start_daemon: DaemonFactory
) -> None:
    """A failing job goes through a wait queue and back, then to the DLQ, priority 7 all along."""

    async def failing(_request: web.Request, _n: int) -> web.StreamResponse:
        return web.Response(status=500)

    receiver = await receiver_factory(failing)
    cfg = make_config(names, webhook={"max_priority": 9}, retry={"attempts": 2})
    await start_daemon(cfg)
    queue = cfg.workers.webhook.queue
    await amqp.publish(queue, webhook_job(receiver.url), priority=7)
    await receiver.wait_for(2)
    [letter] = await amqp.take(f"dlq.{queue}", 1)
    assert letter.priority == 7
    assert letter.headers["x-formcraft-attempts"] == 2


@pytest.mark.e2e
async def test_replay_keeps_the_priority_of_a_dead_letter(names: Names, amqp: Broker) -> None:
    """A dead letter replayed to its main queue keeps its AMQP priority."""
    cfg = make_config(names, webhook={"max_priority": 9})
    amqp.track(cfg)
    queue = cfg.workers.webhook.queue
    channel = await amqp.connection.channel(publisher_confirms=True)
    try:
        await declare_topology(channel, WorkerTopology.build(cfg.workers.webhook, cfg.broker))
        await channel.default_exchange.publish(
            aio_pika.Message(
                webhook_job("https://example.invalid/hook"),
                message_id="job-1",
                priority=6,
                headers={"x-formcraft-error-code": "HTTP_STATUS"},
            ),
            routing_key=f"dlq.{queue}",
        )
        result = await dead_letters.replay(channel, queue)
    finally:
        await channel.close()
    assert result.replayed == 1
    [job] = await amqp.take(queue, 1)
    assert (job.message_id, job.priority) == ("job-1", 6)
    assert "x-formcraft-error-code" not in (job.headers or {})


async def predeclare(amqp: Broker, queue: str, dead_letter_exchange: str, priority: int) -> None:
    """The main queue as the app's QueueConfig declares it, with `maxPriority`."""
    channel = await amqp.connection.channel()
    try:
        await channel.declare_queue(
            queue,
            durable=True,
            arguments={"x-dead-letter-exchange": dead_letter_exchange, "x-max-priority": priority},
        )
    finally:
        await channel.close()


@pytest.mark.e2e
async def test_a_queue_declared_first_with_the_same_max_priority_is_accepted(
    names: Names, amqp: Broker, start_daemon: DaemonFactory
) -> None:
    cfg = make_config(names, webhook={"max_priority": 5})
    amqp.track(cfg)
    webhook = cfg.workers.webhook
    await predeclare(amqp, webhook.queue, webhook.dead_letter_exchange, 5)
    daemon = await start_daemon(cfg)
    assert daemon.consumers[webhook.queue].state == "consuming"


@pytest.mark.e2e
@pytest.mark.parametrize("configured", [9, 0])
async def test_a_queue_declared_first_with_another_max_priority_is_a_start_up_error(
    names: Names, amqp: Broker, start_daemon: DaemonFactory, configured: int
) -> None:
    """The one-line error names the queue and x-max-priority, and says what to do."""
    cfg = make_config(names, webhook={"max_priority": configured})
    amqp.track(cfg)
    webhook = cfg.workers.webhook
    await predeclare(amqp, webhook.queue, webhook.dead_letter_exchange, 5)
    with pytest.raises(TopologyError) as caught:
        await start_daemon(cfg)
    message = str(caught.value)
    assert "\n" not in message
    assert repr(webhook.queue) in message
    assert "x-max-priority" in message
    assert "max_priority" in message.split("x-max-priority", 1)[1]


@pytest.mark.e2e
async def test_a_classic_priority_queue_under_a_quorum_config_points_to_the_migration(
    names: Names, amqp: Broker, start_daemon: DaemonFactory
) -> None:
    cfg = make_config(names, broker={"queue_type": "quorum"}, webhook={"max_priority": 5})
    amqp.track(cfg)
    webhook = cfg.workers.webhook
    await predeclare(amqp, webhook.queue, webhook.dead_letter_exchange, 5)
    with pytest.raises(TopologyError, match=r"migrate it as docs/scaling\.md describes"):
        await start_daemon(cfg)


@pytest.mark.e2e
async def test_quorum_with_max_priority_starts_and_logs_one_warning(
    names: Names, start_daemon: DaemonFactory, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = make_config(names, broker={"queue_type": "quorum"}, webhook={"max_priority": 9})
    with caplog.at_level(logging.WARNING, logger="formcraftd"):
        daemon = await start_daemon(cfg)
    warnings = [r.getMessage() for r in caplog.records if "max_priority" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert daemon.consumers[cfg.workers.webhook.queue].state == "consuming"
