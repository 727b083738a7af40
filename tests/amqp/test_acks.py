"""Batched acks: never covering an unsettled delivery, stragglers freed, the real broker agrees."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import aio_pika
import pytest
from aiormq.abc import AbstractChannel, DeliveredMessage
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from formcraftd.amqp.acks import Acks, Delivery
from tests.support import AMQP_URL, Names


class RecordingChannel:
    """Just enough of an AMQP channel to see which acks and nacks go out, in order."""

    def __init__(self) -> None:
        self.is_closed = False
        self.sent: list[tuple[str, int, bool]] = []  # ("ack" | "nack", tag, multiple)

    async def basic_ack(self, tag: int, multiple: bool = False, wait: bool = True) -> None:
        if self.is_closed:
            raise RuntimeError("closed")
        self.sent.append(("ack", tag, multiple))

    async def basic_nack(
        self, tag: int, multiple: bool = False, requeue: bool = True, wait: bool = True
    ) -> None:
        if self.is_closed:
            raise RuntimeError("closed")
        self.sent.append(("nack", tag, multiple))


def delivered(channel: Any, tag: int) -> Delivery:
    return Delivery(
        DeliveredMessage(
            delivery=Basic.Deliver("ctag", tag, False, "", "q"),
            header=ContentHeader(0, 0, Basic.Properties()),
            body=b"{}",
            channel=cast(AbstractChannel, channel),
        )
    )


def acked_tags(sent: list[tuple[str, int, bool]], upto_all: int) -> set[int]:
    """Which of tags 1..upto_all the recorded frames ack, read as the broker reads them.

    A multiple ack settles only what is still outstanding up to its tag, and its
    tag, like a single ack's or a nack's, must itself be outstanding: otherwise
    the broker closes the channel (PRECONDITION_FAILED, unknown delivery tag).
    """
    outstanding = set(range(1, upto_all + 1))
    acked: set[int] = set()
    for verb, tag, multiple in sent:
        assert tag in outstanding, f"unknown delivery tag {tag}"
        settled = {t for t in outstanding if t <= tag} if multiple else {tag}
        outstanding -= settled
        if verb == "ack":
            acked |= settled
    return acked


def tracked(count: int) -> tuple[RecordingChannel, Acks, list[Delivery]]:
    """A channel with deliveries 1..count, each tracked by a fresh Acks (no early flush)."""
    channel = RecordingChannel()
    acks = Acks(batch=100, on_lost=lambda n: None)
    deliveries = [delivered(channel, tag) for tag in range(1, count + 1)]
    for d in deliveries:
        acks.track(d)
    return channel, acks, deliveries


def test_a_delivery_carries_what_the_consumer_reads() -> None:
    channel = RecordingChannel()
    message = Delivery(
        DeliveredMessage(
            delivery=Basic.Deliver("ctag", 7, True, "", "q"),
            header=ContentHeader(
                0,
                2,
                Basic.Properties(
                    message_id="job-1", headers={"x-formcraft-attempt": 2}, message_type="t"
                ),
            ),
            body=b"{}",
            channel=cast(AbstractChannel, channel),
        )
    )
    assert (message.tag, message.redelivered, message.body) == (7, True, b"{}")
    assert message.message_id == "job-1"
    assert message.headers == {"x-formcraft-attempt": 2}
    assert message.type == "t"
    assert message.timestamp is None


async def test_in_order_settles_go_out_as_one_multiple_ack() -> None:
    channel, acks, deliveries = tracked(10)
    for d in deliveries:
        acks.ack(d)
    assert channel.sent == []  # nothing is sent before a flush
    await acks.flush()
    assert channel.sent == [("ack", 10, True)]
    assert acks.due == 0


async def test_a_multiple_ack_never_covers_an_unsettled_delivery() -> None:
    """Tag 3 is still running: 1-2 go in one ack, 4-6 wait, then go one by one."""
    channel, acks, deliveries = tracked(6)
    for d in deliveries:
        if d.tag != 3:
            acks.ack(d)
    await acks.flush()
    assert channel.sent == [("ack", 2, True)]  # 4-6 are held one flush, for 3 to catch up
    await acks.flush()
    assert acked_tags(channel.sent, 6) == {1, 2, 4, 5, 6}
    assert all(not multiple for _, tag, multiple in channel.sent if tag > 3)
    acks.ack(deliveries[2])
    await acks.flush()
    assert acked_tags(channel.sent, 6) == {1, 2, 3, 4, 5, 6}
    # The last ack names tag 3 alone: 4-6 are gone from the broker already, and
    # a multiple ack must name a tag the broker still holds.
    assert channel.sent[-1] == ("ack", 3, True)
    assert acks.due == 0


async def test_a_straggler_that_catches_up_needs_no_ack_of_its_own() -> None:
    channel, acks, deliveries = tracked(4)
    for d in (deliveries[1], deliveries[2], deliveries[3]):
        acks.ack(d)
    await acks.flush()
    assert channel.sent == []
    acks.ack(deliveries[0])
    await acks.flush()
    assert channel.sent == [("ack", 4, True)]


async def test_a_nack_goes_out_at_once_and_before_a_later_multiple_ack() -> None:
    channel, acks, deliveries = tracked(4)
    acks.ack(deliveries[0])
    assert await acks.nack(deliveries[1])
    acks.ack(deliveries[2])
    acks.ack(deliveries[3])
    await acks.flush()
    assert channel.sent == [("nack", 2, False), ("ack", 4, True)]


async def test_a_nack_waiting_for_the_frame_queue_is_not_overtaken_by_a_multiple_ack() -> None:
    """The connection's frame queue is bounded: a nack may wait to be queued.

    A flush meanwhile must neither ack past the nacked delivery nor queue its
    multiple ack first, or the broker would take the nacked job as acked.
    """
    channel, acks, deliveries = tracked(4)
    gate = asyncio.Event()
    real_nack = channel.basic_nack

    async def slow_nack(tag: int, multiple: bool = False, requeue: bool = True, wait: bool = True):
        await gate.wait()  # as a put into a full frame queue would
        await real_nack(tag, multiple, requeue, wait)

    channel.basic_nack = slow_nack  # type: ignore[method-assign]
    acks.ack(deliveries[0])
    nacking = asyncio.create_task(acks.nack(deliveries[1]))
    await asyncio.sleep(0)
    acks.ack(deliveries[2])
    acks.ack(deliveries[3])
    flushing = asyncio.create_task(acks.flush(everything=True))
    for _ in range(5):
        await asyncio.sleep(0)
    assert channel.sent == []  # the flush waits for the nack
    gate.set()
    assert await nacking
    await flushing
    await acks.flush(everything=True)
    assert channel.sent[0] == ("nack", 2, False)
    assert acked_tags(channel.sent, 4) == {1, 3, 4}


async def test_acks_due_on_a_closed_channel_are_reported_lost() -> None:
    lost: list[int] = []
    old, new = RecordingChannel(), RecordingChannel()
    acks = Acks(batch=100, on_lost=lost.append)
    first = [delivered(old, tag) for tag in (1, 2)]
    for d in first:
        acks.track(d)
    old.is_closed = True  # the connection dropped; a reconnect brings a new channel
    second = delivered(new, 1)
    acks.track(second)
    for d in (*first, second):
        acks.ack(d)
    await acks.flush()
    assert lost == [2]
    assert old.sent == []
    assert new.sent == [("ack", 1, True)]


async def test_the_flusher_sends_a_full_batch_without_waiting() -> None:
    channel = RecordingChannel()
    acks = Acks(batch=4, on_lost=lambda n: None)
    flusher = asyncio.create_task(acks.run())
    try:
        deliveries = [delivered(channel, tag) for tag in range(1, 5)]
        for d in deliveries:
            acks.track(d)
            acks.ack(d)
        for _ in range(5):
            await asyncio.sleep(0)
        assert channel.sent == [("ack", 4, True)]
        # Fewer than a batch go out after the short delay.
        extra = delivered(channel, 5)
        acks.track(extra)
        acks.ack(extra)
        for _ in range(200):
            if len(channel.sent) == 2:
                break
            await asyncio.sleep(0.01)
        assert channel.sent[-1] == ("ack", 5, True)
    finally:
        flusher.cancel()


@pytest.mark.e2e
async def test_the_broker_accepts_batched_acks_settled_in_any_order() -> None:
    """On a real channel: acks in a shuffled order, one left unsettled, one nacked.

    A wrong multiple ack (an unknown tag, or one covering the unsettled delivery)
    closes the channel with PRECONDITION_FAILED or loses that delivery.
    """
    connection = await aio_pika.connect(AMQP_URL)
    name = f"{Names().prefix}.acks"
    try:
        channel = await connection.channel()
        await channel.declare_queue(name, durable=False, auto_delete=False)
        for n in range(40):
            await channel.default_exchange.publish(
                aio_pika.Message(str(n).encode(), message_id=str(n)), routing_key=name
            )
        underlay = await channel.get_underlay_channel()
        await underlay.basic_qos(prefetch_count=100)
        got: list[Delivery] = []
        lost: list[int] = []
        acks = Acks(batch=8, on_lost=lost.append)

        async def on_delivery(raw: DeliveredMessage) -> None:
            message = Delivery(raw)
            acks.track(message)
            got.append(message)

        ok = await underlay.basic_consume(name, on_delivery)
        for _ in range(500):
            if len(got) == 40:
                break
            await asyncio.sleep(0.01)
        assert len(got) == 40
        order = got[::3] + got[1::3] + got[2::3]  # far from delivery order
        unsettled, nacked = got[17], got[5]
        for message in order:
            if message is nacked:
                assert await acks.nack(message, requeue=True)
            elif message is not unsettled:
                acks.ack(message)
            if message.tag % 7 == 0:
                await acks.flush()
        await acks.flush(everything=True)
        await underlay.basic_cancel(ok.consumer_tag)
        await asyncio.sleep(0.2)
        assert not underlay.is_closed  # no PRECONDITION_FAILED
        assert lost == []
        await channel.close()  # returns what is still unacked: the unsettled delivery

        check = await connection.channel()
        left: list[str | None] = []
        q = await check.declare_queue(name, passive=True)
        while (message := await q.get(no_ack=True, fail=False)) is not None:
            left.append(message.message_id)
        assert sorted(left) == sorted([unsettled.message_id, nacked.message_id])
    finally:
        cleanup = await connection.channel()
        await cleanup.queue_delete(name)
        await connection.close()
