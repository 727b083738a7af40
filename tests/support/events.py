"""Delivery-event helpers shared by the events, endpoint-health and batching tests."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractExchange, AbstractQueue
from prometheus_client import CollectorRegistry, Counter

from formcraftd.amqp.confirms import ConfirmingPublisher, Outgoing
from formcraftd.amqp.events import EventPublisher
from formcraftd.core.config import BrokerConfig, Config, EventsConfig
from formcraftd.core.events import DeliveryEvent, Event, now
from tests.support import AMQP_URL, Names, make_config
from tests.support.process import free_port, write_config


class EventTap:
    """A test queue bound to the events exchange, collecting every event."""

    def __init__(self, queue: AbstractQueue) -> None:
        self.queue = queue
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.raw: list[bytes] = []

    async def wait(self, count: int, timeout: float = 20) -> list[tuple[str, dict[str, Any]]]:
        deadline = time.monotonic() + timeout
        while len(self.events) < count:
            message = await self.queue.get(no_ack=True, fail=False)
            if message is None:
                assert time.monotonic() < deadline, f"only {len(self.events)} events: {self.events}"
                await asyncio.sleep(0.05)
                continue
            self.raw.append(message.body)
            self.events.append((message.routing_key or "", orjson.loads(message.body)))
        return self.events

    async def quiet(self, seconds: float = 0.5) -> None:
        """Collect whatever else arrives within `seconds`."""
        await asyncio.sleep(seconds)
        while (message := await self.queue.get(no_ack=True, fail=False)) is not None:
            self.raw.append(message.body)
            self.events.append((message.routing_key or "", orjson.loads(message.body)))


def events_config(names: Names, **sections: dict[str, Any]) -> Config:
    events = {"enabled": True, "exchange": f"{names.prefix}.events"}
    return make_config(names, events=events, **sections)


def tail_config(tmp_path: Path, names: Names, *, enabled: bool) -> Path:
    """A config file for `events tail`: the test's exchange, events on or off."""
    config_file = write_config(tmp_path / "config.toml", names, port=free_port())
    with config_file.open("a") as file:
        on = str(enabled).lower()
        file.write(f'[events]\nenabled = {on}\nexchange = "{names.prefix}.events"\n')
    return config_file


class Publishing:
    """A running `EventPublisher` of its own, with its own dropped-events counter."""

    def __init__(self, names: Names, url: str, events_per_message: int = 1) -> None:
        self.registry = CollectorRegistry()
        dropped = Counter("formcraftd_events_dropped", "test", registry=self.registry)
        events = EventsConfig(
            enabled=True, exchange=f"{names.prefix}.events", events_per_message=events_per_message
        )
        self.publisher = EventPublisher(
            events,
            BrokerConfig(url=url),
            dropped,
        )

    def dropped(self) -> float:
        return self.registry.get_sample_value("formcraftd_events_dropped_total") or 0.0

    async def emit(self, *events: Event, timeout: float = 30) -> None:
        """Emit `events` and wait until each is published or dropped."""
        for event in events:
            self.publisher.emit(event)
        async with asyncio.timeout(timeout):
            await self.publisher.drained()


@contextlib.asynccontextmanager
async def publishing(
    names: Names, url: str = AMQP_URL, events_per_message: int = 1
) -> AsyncIterator[Publishing]:
    running = Publishing(names, url, events_per_message)
    task = asyncio.create_task(running.publisher.run())
    try:
        yield running
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def delivery(n: int, **fields: Any) -> DeliveryEvent:
    defaults: dict[str, Any] = {
        "kind": "webhook",
        "outcome": "succeeded",
        "job_id": f"job-{n}",
        "queue": "webhook_tasks",
        "form_id": "form-1",
        "submission_id": str(n),
        "attempt": 1,
        "at": now(),
    }
    return DeliveryEvent(**(defaults | fields))


class StubConnection:
    """Takes what a publisher writes; confirms come only when a test hands them over."""

    frame_max = 131_072

    def __init__(self) -> None:
        self.written = b""

    def write(self, frames: bytes) -> None:
        self.written += frames

    async def drain(self) -> None:
        return None


async def publishing_batch(
    publisher: ConfirmingPublisher, count: int, within_s: float = 5.0
) -> asyncio.Task[int]:
    """A batch of `count` messages written and waiting for its confirms."""
    messages: list[Outgoing] = [("webhook.succeeded", b"{}", f"{n:032x}") for n in range(count)]
    task = asyncio.create_task(publisher.publish(messages, within_s))
    await asyncio.sleep(0)
    assert not task.done()
    return task


async def publish_when_routed(
    exchange: AbstractExchange, message: aio_pika.Message, routing_key: str, timeout: float = 20
) -> None:
    """Publish `message` as mandatory, again until the broker routes it: an `events tail`
    started just before has bound its queue once this returns."""
    deadline = time.monotonic() + timeout
    while True:  # returned as unroutable until the tail's queue is bound
        try:
            await exchange.publish(message, routing_key, mandatory=True)
            return
        except aio_pika.exceptions.DeliveryError:
            assert time.monotonic() < deadline, "the tail never bound its queue"
            await asyncio.sleep(0.1)
