"""Fixtures shared by the whole suite: the real broker, receivers, daemons."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Protocol

import aio_pika
import pytest

from formcraftd.core import config
from formcraftd.core.tracing import Tracer
from formcraftd.daemon import Daemon
from tests.support import AMQP_URL, VHOST, Behaviour, Broker, Names, Receiver, ok, rabbitmqctl
from tests.support.events import EventTap

if TYPE_CHECKING:
    from tests.support.tracing import Collector, Traced

WHOLE_BROKER_TESTS = "FORMCRAFTD_WHOLE_BROKER_TESTS"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skip the `whole_broker` tests unless FORMCRAFTD_WHOLE_BROKER_TESTS=1 asks for them."""
    if os.environ.get(WHOLE_BROKER_TESTS) == "1":
        return
    skip = pytest.mark.skip(
        reason=f"disturbs every user of the broker; {WHOLE_BROKER_TESTS}=1 runs it (.ci/run does)"
    )
    for item in items:
        if item.get_closest_marker("whole_broker"):
            item.add_marker(skip)


def uses_the_broker(item: pytest.Item) -> bool:
    """Whether a test talks to RabbitMQ: marked e2e or faults, or takes a broker fixture."""
    if item.get_closest_marker("e2e") or item.get_closest_marker("faults"):
        return True
    return bool({"names", "amqp", "start_daemon"} & set(getattr(item, "fixturenames", ())))


@pytest.fixture(scope="session", autouse=True)
def run_vhost(request: pytest.FixtureRequest) -> Iterator[None]:
    """This run's own virtual host: made first, then checked and deleted at the end.

    The run fails (an error at teardown) if it left a queue or an exchange behind, in
    its vhost or under its names in the default one. Nothing is made when no test
    uses the broker, or when none answers (the tests that need one fail on their own).
    """
    if not any(map(uses_the_broker, request.session.items)) or not rabbitmqctl.broker_answers():
        yield
        return
    try:
        rabbitmqctl.create_vhost()
    except rabbitmqctl.RabbitmqctlError as exc:
        pytest.exit(
            f"the tests make a RabbitMQ virtual host of their own with rabbitmqctl, which "
            f"failed (run them as root, or as a user with RabbitMQ's Erlang cookie): {exc}",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )
    try:
        yield
        left = rabbitmqctl.leftovers()
    finally:
        rabbitmqctl.delete_vhost()
    if left:
        pytest.fail(
            f"the tests left queues or exchanges on the broker (vhost {VHOST} "
            f"is deleted now, with them): {', '.join(left)}",
            pytrace=False,
        )


@pytest.fixture
def names() -> Names:
    """Queue and exchange names no other test uses."""
    return Names()


@pytest.fixture
async def amqp() -> AsyncIterator[Broker]:
    """The test's own connection to the real RabbitMQ; deletes tracked queues afterwards."""
    connection = await aio_pika.connect_robust(AMQP_URL)
    broker = Broker(connection)
    try:
        yield broker
    finally:
        with contextlib.suppress(Exception):
            await broker.cleanup()
        await connection.close()


ReceiverFactory = Callable[[Behaviour], Awaitable[Receiver]]


@pytest.fixture
async def receiver_factory() -> AsyncIterator[ReceiverFactory]:
    """Start real webhook receivers on loopback; all are stopped afterwards."""
    started: list[Receiver] = []

    async def start(behaviour: Behaviour = ok) -> Receiver:
        receiver = await Receiver(behaviour).start()
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        await receiver.stop()


class DaemonFactory(Protocol):
    """Starts a daemon with `cfg` (and a tracer of the test's, if given) once it consumes."""

    def __call__(
        self, cfg: config.Config, *, tracer: Tracer | None = None
    ) -> Awaitable[Daemon]: ...


@pytest.fixture
async def start_daemon(amqp: Broker) -> AsyncIterator[DaemonFactory]:
    """Run daemons in this event loop; each is shut down gracefully afterwards."""
    running: list[tuple[Daemon, asyncio.Task[None]]] = []

    async def start(cfg: config.Config, *, tracer: Tracer | None = None) -> Daemon:
        amqp.track(cfg)
        daemon = Daemon(cfg, tracer=tracer)
        task = asyncio.create_task(daemon.run())
        running.append((daemon, task))
        started = asyncio.create_task(daemon.started.wait())
        done, _ = await asyncio.wait(
            {task, started}, timeout=20, return_when=asyncio.FIRST_COMPLETED
        )
        if task in done:
            started.cancel()
            task.result()  # raises the start-up error
        if started not in done:
            raise TimeoutError("daemon did not start")
        return daemon

    yield start
    for daemon, task in running:
        if not task.done():
            daemon.request_shutdown()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, timeout=30)


@pytest.fixture
def traced(monkeypatch: pytest.MonkeyPatch) -> Iterator[Traced]:
    """An OpenTelemetry tracer exporting to memory, free of the machine's OTEL_* settings;
    shut down afterwards. (Imported here: OpenTelemetry is an optional extra.)"""
    from tests.support.tracing import Traced, clean_environment  # noqa: PLC0415

    clean_environment(monkeypatch)
    traced = Traced.start()
    yield traced
    traced.tracer.shutdown()


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    """A stand-in OpenTelemetry collector on 127.0.0.1 (OTLP/HTTP); stopped afterwards."""
    from tests.support.tracing import running_collector  # noqa: PLC0415

    async with running_collector() as collector:
        yield collector


@pytest.fixture
async def tap(names: Names, amqp: Broker) -> AsyncIterator[EventTap]:
    """A queue bound to the test's events exchange (declared here), collecting every event."""
    channel = await amqp.connection.channel()
    exchange = await channel.declare_exchange(
        f"{names.prefix}.events", aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(exchange, routing_key="#")
    yield EventTap(queue)
    await channel.exchange_delete(f"{names.prefix}.events")
    await channel.close()
