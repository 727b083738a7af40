"""Several events per message (`[events] events_per_message` > 1): JSON arrays, one routing
key each, in emit order, counted by event when the broker does not take them."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pamqp.frame
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from formcraftd.amqp.confirms import ConfirmingPublisher, Outgoing
from formcraftd.core.events import BATCH_HEADER, Event, routing_key, schema
from tests.conftest import DaemonFactory, ReceiverFactory
from tests.support import Broker, Names, make_config, status, webhook_job
from tests.support.events import (
    EventTap,
    StubConnection,
    delivery,
    events_config,
    publish_when_routed,
    publishing,
    publishing_batch,
    tail_config,
)
from tests.support.process import run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

WEBHOOK, EMAIL = "webhook.succeeded", "email.retrying"


async def received(queue: AbstractQueue, quiet_s: float = 0.5) -> list[AbstractIncomingMessage]:
    """Every message in `queue` once nothing more arrives for `quiet_s`."""
    messages: list[AbstractIncomingMessage] = []
    await asyncio.sleep(quiet_s)
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        messages.append(message)
    return messages


def interleaved(count: int) -> list[Event]:
    """`count` events, every third an email one, the rest webhook ones."""
    return [
        delivery(n, kind="email", outcome="retrying") if n % 3 == 2 else delivery(n)
        for n in range(count)
    ]


async def test_one_event_per_message_by_default(
    names: Names,
    tap: EventTap,
) -> None:
    """`events_per_message = 1`: the body is the event's object, no batch header."""
    async with publishing(names) as running:
        await running.emit(delivery(1), delivery(2))
    messages = await received(tap.queue)
    assert [orjson.loads(m.body)["job_id"] for m in messages] == ["job-1", "job-2"]
    assert all(BATCH_HEADER not in (m.headers or {}) for m in messages)


async def test_events_go_out_as_arrays_grouped_by_routing_key_in_emit_order(
    names: Names,
    tap: EventTap,
) -> None:
    """25 events of two routing keys, 10 a message: arrays of at most 10, one key each,
    in the order emitted, the header counting them, each with a message id of its own."""
    events = interleaved(25)
    async with publishing(names, events_per_message=10) as running:
        await running.emit(*events)
        assert (running.publisher.published, running.dropped()) == (25, 0)
    messages = await received(tap.queue)
    arrays = [orjson.loads(m.body) for m in messages]
    assert [len(array) for array in arrays] == [10, 7, 8]  # 17 webhook events, then 8 email
    for message, array in zip(messages, arrays, strict=True):
        assert message.headers[BATCH_HEADER] == len(array)
        assert message.content_type == "application/json"
        assert message.type == message.routing_key
        assert {f"{e['kind']}.{e['outcome']}" for e in array} == {message.routing_key}
    assert len({m.message_id for m in messages}) == len(messages)
    for key in (WEBHOOK, EMAIL):
        sent = [f"job-{n}" for n, event in enumerate(events) if routing_key(event) == key]
        arrays_of_key = (a for m, a in zip(messages, arrays, strict=True) if m.routing_key == key)
        assert [e["job_id"] for array in arrays_of_key for e in array] == sent


async def test_a_binding_on_one_routing_key_gets_only_its_arrays(
    names: Names,
    amqp: Broker,
    tap: EventTap,
) -> None:
    channel = await amqp.connection.channel()
    emails = await channel.declare_queue(exclusive=True)
    await emails.bind(f"{names.prefix}.events", routing_key=EMAIL)
    async with publishing(names, events_per_message=10) as running:
        await running.emit(*interleaved(25))
    messages = await received(emails)
    assert [m.routing_key for m in messages] == [EMAIL]
    assert [e["job_id"] for e in orjson.loads(messages[0].body)] == [
        f"job-{n}" for n in range(2, 25, 3)
    ]
    await channel.close()


async def test_one_event_is_still_an_array(
    names: Names,
    tap: EventTap,
) -> None:
    """With events_per_message > 1 every body is an array, so the app parses one form."""
    async with publishing(names, events_per_message=10) as running:
        await running.emit(delivery(1))
    [message] = await received(tap.queue)
    assert [e["job_id"] for e in orjson.loads(message.body)] == ["job-1"]
    assert message.headers[BATCH_HEADER] == 1


async def test_a_refused_message_drops_and_counts_every_event_in_it(
    names: Names,
    amqp: Broker,
    tap: EventTap,
) -> None:
    """A queue that takes one message nacks the rest: 10 events published, 15 dropped."""
    channel = await amqp.connection.channel()
    full = await channel.declare_queue(
        exclusive=True, arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
    )
    await full.bind(f"{names.prefix}.events", routing_key="#")
    async with publishing(names, events_per_message=10) as running:
        await running.emit(*(delivery(n) for n in range(25)))
        assert (running.publisher.published, running.dropped()) == (10, 15)
    await channel.close()


async def test_an_array_to_a_deleted_exchange_is_dropped_whole(
    names: Names,
    amqp: Broker,
    tap: EventTap,
) -> None:
    """The channel closes on the publish: all 5 events of the array count as dropped, and
    the next batch goes out once the exchange is declared again."""
    exchange = f"{names.prefix}.events"
    async with publishing(names, events_per_message=10) as running:
        await running.emit(delivery(1))
        channel = await amqp.connection.channel()
        await channel.exchange_delete(exchange)
        await running.emit(*(delivery(n) for n in range(2, 7)))
        assert (running.publisher.published, running.dropped()) == (1, 5)
        await running.emit(*(delivery(n) for n in range(7, 10)))
        assert (running.publisher.published, running.dropped()) == (4, 5)
        await channel.close()


async def test_the_daemon_publishes_arrays_when_configured(
    names: Names,
    amqp: Broker,
    tap: EventTap,
    receiver_factory: ReceiverFactory,
    start_daemon: DaemonFactory,
) -> None:
    """`[events] events_per_message = 50` in the config: the jobs' events come as arrays."""
    receiver = await receiver_factory(status(200))
    exchange = events_config(names).events.exchange
    cfg = make_config(
        names, events={"enabled": True, "exchange": exchange, "events_per_message": 50}
    )
    await start_daemon(cfg)
    for n in range(6):
        await amqp.publish(
            cfg.workers.webhook.queue, webhook_job(receiver.url, submission_id=str(n))
        )
    await receiver.wait_for(6)
    deadline = time.monotonic() + 20
    events: list[dict[str, Any]] = []
    while len(events) < 6:
        assert time.monotonic() < deadline, f"only {len(events)} events"
        message = await tap.queue.get(no_ack=True, fail=False)
        if message is None:
            await asyncio.sleep(0.05)
            continue
        assert message.routing_key == WEBHOOK
        array = orjson.loads(message.body)
        assert message.headers[BATCH_HEADER] == len(array)
        events += array
    assert sorted(e["submission_id"] for e in events) == [str(n) for n in range(6)]


async def test_events_tail_prints_one_line_per_event_of_an_array(
    tmp_path: Path, names: Names, amqp: Broker
) -> None:
    """`events tail` splits an array body into its events, one line each."""
    channel = await amqp.connection.channel(publisher_confirms=True, on_return_raises=True)
    exchange = await channel.declare_exchange(
        f"{names.prefix}.events", aio_pika.ExchangeType.TOPIC, durable=True
    )
    config_file = tail_config(tmp_path, names, enabled=True)
    batch = aio_pika.Message(
        b'[{"job_id": "a"},{"job_id": "b"}, {"job_id": "c"}]', headers={BATCH_HEADER: 3}
    )
    try:
        tail = asyncio.create_task(
            asyncio.to_thread(
                run_cli, "events", "tail", "--count", "4", "--config", str(config_file)
            )
        )
        await publish_when_routed(exchange, batch, WEBHOOK)
        await exchange.publish(aio_pika.Message(b'{"job_id": "d"}'), WEBHOOK, mandatory=True)
        result = await asyncio.wait_for(tail, 30)
    finally:
        await channel.exchange_delete(f"{names.prefix}.events")
        await channel.close()
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        '{"job_id": "a"}',
        '{"job_id": "b"}',
        '{"job_id": "c"}',
        '{"job_id": "d"}',
    ]


# --- the confirming publisher, without a broker ---------------------------------------


async def test_each_message_counts_for_its_weight() -> None:
    """With weights, an acked message counts for the events it carries, a nacked one for none."""
    publisher = ConfirmingPublisher(StubConnection(), "fc.events")  # type: ignore[arg-type]
    messages: list[Outgoing] = [(WEBHOOK, b"[]", f"{n:032x}") for n in range(3)]
    task = asyncio.create_task(publisher.publish(messages, 5.0, [10, 4, 1]))
    await asyncio.sleep(0)
    publisher._confirm(1, multiple=False, acked=True)
    publisher._confirm(2, multiple=False, acked=False)
    publisher._confirm(3, multiple=True, acked=True)
    assert await task == 11
    unweighted = await publishing_batch(publisher, 2)
    publisher._confirm(5, multiple=True, acked=True)
    assert await unweighted == 2


async def test_headers_are_in_the_content_header() -> None:
    connection = StubConnection()
    publisher = ConfirmingPublisher(connection, "fc.events")  # type: ignore[arg-type]
    message = (EMAIL, b"[{}]", "a" * 32, {BATCH_HEADER: 1})
    assert await publisher.publish([message], within_s=0.1) == 0
    data = connection.written
    consumed, _channel, _publish = pamqp.frame.unmarshal(data)
    _consumed, _channel, header = pamqp.frame.unmarshal(data[consumed:])
    assert header.properties.headers == {BATCH_HEADER: 1}


def test_the_schema_says_how_arrays_come() -> None:
    description = schema()["description"]
    assert isinstance(description, str)
    assert "events_per_message" in description and BATCH_HEADER in description
