"""Messages no AMQP client can decode, and headers that cannot be sent again.

RabbitMQ accepts, stores and confirms a message whose content header is not
valid AMQP for a client: a `message_id` or a header name that is not UTF-8, a
timestamp past year 9999. These tests publish such messages for real (the
frames are written by hand) and check that the daemon sets each aside once,
as a VALIDATION_ERROR dead letter, and keeps delivering everything else.
"""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from pamqp import commands
from pamqp.header import ContentHeader

from formcraftd.amqp.raw import RawConnection, marshal_message
from formcraftd.amqp.topology import dead_letter_queue_name
from tests.conftest import DaemonFactory, ReceiverFactory
from tests.support import AMQP_URL, Broker, Names, make_config, webhook_job

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.timeout(120)]


def header_with(
    body: bytes, properties: commands.Basic.Properties, old: bytes, new: bytes
) -> bytes:
    """A content header whose bytes `old` (same length) are replaced by `new` after marshalling."""
    assert len(old) == len(new)
    payload = ContentHeader(body_size=len(body), properties=properties).marshal()
    assert payload.count(old) == 1
    return payload.replace(old, new)


def poison_header(kind: str, body: bytes) -> bytes:
    if kind == "message_id not UTF-8":
        return header_with(
            body, commands.Basic.Properties(message_id="AAAA"), b"AAAA", b"\xff\xfeAA"
        )
    if kind == "header name not UTF-8":
        properties = commands.Basic.Properties(headers={"kkkk": "v"})
        return header_with(body, properties, b"kkkk", b"\xff\xfekk")
    if kind == "timestamp past year 9999":
        stamp = dt.datetime(2001, 1, 1, tzinfo=dt.UTC)
        old = int(stamp.timestamp()).to_bytes(8, "big")
        new = (300_000_000_000_000).to_bytes(8, "big")  # read as ms: year 11476
        return header_with(body, commands.Basic.Properties(timestamp=stamp), old, new)
    raise AssertionError(kind)


async def publish_confirmed(queue: str, header: bytes, body: bytes) -> None:
    """Publish hand-made frames and wait for the broker's confirm: the message is queued."""
    raw = await RawConnection.open(AMQP_URL)
    try:
        raw.send(commands.Confirm.Select())
        await raw.expect(commands.Confirm.SelectOk)
        raw.write(marshal_message("", queue, header, body))
        await raw.drain()
        await raw.expect(commands.Basic.Ack)
    finally:
        await raw.close()


async def publish_poison(queue: str, kind: str, body: bytes) -> None:
    await publish_confirmed(queue, poison_header(kind, body), body)


@pytest.mark.parametrize(
    "kind", ["message_id not UTF-8", "header name not UTF-8", "timestamp past year 9999"]
)
async def test_an_undecodable_message_is_set_aside_once_and_the_rest_flows(
    kind: str,
    names: Names,
    amqp: Broker,
    receiver_factory: ReceiverFactory,
    start_daemon: DaemonFactory,
) -> None:
    """The connection goes down once; the message is dead-lettered with its body; 20 jobs flow."""
    receiver = await receiver_factory()
    cfg = make_config(names)
    daemon = await start_daemon(cfg)
    queue = cfg.workers.webhook.queue
    poison = webhook_job(receiver.url, submission_id="poison")
    await amqp.publish(queue, webhook_job(receiver.url, submission_id="before"))
    await publish_poison(queue, kind, poison)
    for n in range(20):
        await amqp.publish(queue, webhook_job(receiver.url, submission_id=str(n)))
    await receiver.wait_for(21, timeout=30)
    [dead] = await amqp.take(dead_letter_queue_name(queue), 1, timeout=15)
    assert dead.body == poison
    assert dead.headers["x-formcraft-error-code"] == "VALIDATION_ERROR"
    assert "cannot be decoded" in str(dead.headers["x-formcraft-error"])
    assert daemon.broker.reconnects == 1
    assert all(b"poison" not in request.body for request in receiver.requests)
    await asyncio.sleep(0.5)
    assert daemon.health()[0]


async def test_a_header_that_cannot_be_sent_again_is_escaped_and_counted(
    names: Names, amqp: Broker, start_daemon: DaemonFactory
) -> None:
    """A header value that is not UTF-8 arrives as bytes: the dead letter carries it escaped."""
    cfg = make_config(names)
    await start_daemon(cfg)
    queue = cfg.workers.webhook.queue
    body = b'{"type": "webhook.send"}'  # invalid: dead-lettered at once
    properties = commands.Basic.Properties(headers={"x-bin": "vvvv"}, message_id="job-bin")
    await publish_confirmed(queue, header_with(body, properties, b"vvvv", b"\xff\xfevv"), body)
    [dead] = await amqp.take(dead_letter_queue_name(queue), 1, timeout=15)
    assert dead.headers["x-formcraft-error-code"] == "VALIDATION_ERROR"
    assert dead.headers["x-bin"] == "\\xff\\xfevv"
    assert dead.headers["x-formcraft-altered-headers"] == "x-bin"
