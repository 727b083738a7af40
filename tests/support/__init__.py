"""Test helpers: real webhook receivers, unique queue names, broker inspection."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from aiohttp import web
from yarl import URL

from formcraftd.amqp.topology import WorkerTopology, delete_topology
from formcraftd.core import config

# Each test run works in a virtual host of its own, made and deleted by tests/conftest.py,
# so that what the tests declare, and the connections they close, are theirs alone.
# FORMCRAFTD_TEST_AMQP_URL names the broker and the user; its vhost is replaced.
RUN_ID = uuid.uuid4().hex[:8]
VHOST = f"fctest-{RUN_ID}"
BROKER_URL = URL(os.environ.get("FORMCRAFTD_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))


def amqp_url(port: int | None = None) -> str:
    """The URL of this run's virtual host; through `port` on loopback (a TcpProxy) if given."""
    url = BROKER_URL.with_path(f"/{VHOST}")
    if port is not None:
        url = url.with_host("127.0.0.1").with_port(port)
    return str(url)


AMQP_URL = amqp_url()


@contextlib.asynccontextmanager
async def serving(app: web.Application, **runner: Any) -> AsyncIterator[int]:
    """Serve `app` on 127.0.0.1 for the block; its port. `runner`: more AppRunner options."""
    app_runner = web.AppRunner(app, handle_signals=False, access_log=None, **runner)
    await app_runner.setup()
    try:
        await web.TCPSite(app_runner, "127.0.0.1", 0).start()
        yield int(app_runner.addresses[0][1])
    finally:
        await app_runner.cleanup()


Behaviour = Callable[[web.Request, int], Awaitable[web.StreamResponse]]
"""How a test receiver answers its n-th request (n counts from 1)."""


@dataclass
class Received:
    """One request a receiver got."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


async def ok(_request: web.Request, _n: int) -> web.StreamResponse:
    return web.Response(text="ok")


def status(code: int, **headers: str) -> Behaviour:
    """Answer every request with `code` (and `headers`), no body."""

    async def answer(_request: web.Request, _n: int) -> web.StreamResponse:
        return web.Response(status=code, headers=headers)

    return answer


def sequence(*codes: int) -> Behaviour:
    """Answer the n-th request with the n-th code, the last one from then on."""

    async def answer(_request: web.Request, n: int) -> web.StreamResponse:
        return web.Response(status=codes[min(n, len(codes)) - 1])

    return answer


def paced(delay: float) -> Behaviour:
    """A receiver behaviour that answers 200, with no body, after `delay` seconds."""

    async def answer(_request: web.Request, _n: int) -> web.StreamResponse:
        await asyncio.sleep(delay)
        return web.Response(status=200)

    return answer


class Receiver:
    """A real aiohttp webhook receiver on 127.0.0.1 whose answers a test scripts."""

    def __init__(self, behaviour: Behaviour = ok) -> None:
        self.behaviour = behaviour
        self.requests: list[Received] = []
        self._runner: web.AppRunner | None = None
        self.port = 0
        self._changed = asyncio.Condition()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(
            Received(request.method, request.path, dict(request.headers), body, time.monotonic())
        )
        n = len(self.requests)
        async with self._changed:
            self._changed.notify_all()
        return await self.behaviour(request, n)

    async def wait_for(self, count: int, timeout: float = 15.0) -> list[Received]:
        """Wait until at least `count` requests arrived; fail after `timeout`."""
        async with asyncio.timeout(timeout):
            async with self._changed:
                await self._changed.wait_for(lambda: len(self.requests) >= count)
        return self.requests


@dataclass
class Names:
    """Unique queue and exchange names for one test, all starting with this run's prefix."""

    prefix: str = field(default_factory=lambda: f"fctest.{RUN_ID}.{uuid.uuid4().hex[:8]}")

    def queue(self, kind: str) -> str:
        return f"{self.prefix}.{kind}_tasks"

    def dlx(self, kind: str) -> str:
        return f"{self.prefix}.dlx.{kind}"


def make_config(names: Names, **sections: dict[str, Any]) -> config.Config:
    """A config with unique names, fast retries, port 0, loopback receivers allowed.

    `sections` are merged into the document: `webhook={...}` goes to
    `[workers.webhook]`, anything else to the top-level table of that name.
    """
    doc: dict[str, Any] = {
        "broker": {"url": AMQP_URL, "connect_timeout_s": 10},
        "http": {"host": "127.0.0.1", "port": 0},
        "logging": {"level": "debug"},
        "monitoring": {"enabled": False},
        "daemon": {"shutdown_timeout_s": 10},
        "retry": {"attempts": 3, "initial_delay_ms": 100, "max_delay_ms": 800},
        "workers": {},
    }
    for kind in config.WORKER_KINDS:
        doc["workers"][kind] = {
            "queue": names.queue(kind),
            "dead_letter_exchange": names.dlx(kind),
            "enabled": kind == "webhook",
        }
    doc["workers"]["webhook"].update(allowed_networks=["127.0.0.1/32"], timeout_ms=5000)
    for name, values in sections.items():
        target = doc["workers"][name] if name in config.WORKER_KINDS else doc.setdefault(name, {})
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(target.get(key), dict):
                target[key].update(value)
            else:
                target[key] = value
    return config.parse_document(doc, source="test", environ={})


def webhook_job(
    url: str,
    *,
    body: Any = None,
    secret: str | list[str] = "whsec_dGVzdC1zZWNyZXQ=",
    form_id: str = "form-1",
    submission_id: str = "sub-1",
    **payload: Any,
) -> bytes:
    job = {
        "type": "webhook.send",
        "payload": {
            "url": url,
            "method": "POST",
            "headers": {},
            "body": body or {"answer": 42},
            "secret": secret,
            **payload,
        },
        "metadata": {"formId": form_id, "submissionId": submission_id, "retryCount": 0},
    }
    return orjson.dumps(job)


class Broker:
    """The test's own AMQP connection: publish jobs, read dead letters, clean up."""

    def __init__(self, connection: AbstractRobustConnection) -> None:
        self.connection = connection
        self._declared: list[WorkerTopology] = []
        self._exchanges: list[str] = []

    async def publish(
        self,
        queue: str,
        body: bytes,
        *,
        message_id: str | None = None,
        headers: dict[str, Any] | None = None,
        priority: int | None = None,
    ) -> str:
        channel = await self.connection.channel(publisher_confirms=True)
        try:
            job_id = message_id or uuid.uuid4().hex
            await channel.default_exchange.publish(
                aio_pika.Message(
                    body,
                    message_id=job_id,
                    headers=headers or {},
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    priority=priority,
                ),
                routing_key=queue,
            )
        finally:
            await channel.close()
        return job_id

    async def take(
        self, queue: str, count: int, timeout: float = 15.0
    ) -> list[AbstractIncomingMessage]:
        """Take (and ack) `count` messages from `queue`, polling until `timeout`."""
        channel = await self.connection.channel()
        taken: list[AbstractIncomingMessage] = []
        try:
            q = await channel.declare_queue(queue, passive=True)
            deadline = time.monotonic() + timeout
            while len(taken) < count:
                message = await q.get(no_ack=True, fail=False)
                if message is not None:
                    taken.append(message)
                    continue
                if time.monotonic() > deadline:
                    raise TimeoutError(f"only {len(taken)} of {count} messages on {queue}")
                await asyncio.sleep(0.05)
        finally:
            await channel.close()
        return taken

    async def depth(self, queue: str) -> int:
        channel = await self.connection.channel()
        try:
            q = await channel.declare_queue(queue, passive=True)
            return q.declaration_result.message_count or 0
        finally:
            await channel.close()

    def track(self, cfg: config.Config) -> None:
        """Remember the topology of `cfg` (its events exchange too) so :meth:`cleanup`
        deletes it."""
        for kind in config.WORKER_KINDS:
            self._declared.append(WorkerTopology.build(cfg.worker(kind), cfg.broker))
        if cfg.events.enabled:
            self.track_exchange(cfg.events.exchange)

    def track_exchange(self, name: str) -> None:
        """Remember an exchange a test has something else declare, so :meth:`cleanup`
        deletes it."""
        self._exchanges.append(name)

    async def cleanup(self) -> None:
        channel = await self.connection.channel()
        for topology in self._declared:
            await delete_topology(channel, topology)
        for name in self._exchanges:
            await channel.exchange_delete(name)
        await channel.close()


class TcpProxy:
    """Forwards a loopback port to RabbitMQ; `kill()` makes it vanish like a dead node."""

    def __init__(self, target_port: int = BROKER_URL.port or 5672, port: int = 0) -> None:
        self.target_port = target_port
        self.port = port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> TcpProxy:
        """Listen (again, on the same port after a kill)."""
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, writer)),
        ]
        self._tasks.update(pumps)
        await asyncio.gather(*pumps, return_exceptions=True)

    @staticmethod
    async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            sink.close()

    async def kill(self) -> None:
        """Stop listening and cut every connection, like a host that went away."""
        if self._server is None:
            return
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2)
        self._server = None
        self._writers.clear()
        self._tasks.clear()


class HealthWatch:
    """Samples a daemon's health every few ms in the background, so a short outage is seen."""

    def __init__(self, daemon: Any) -> None:
        self._daemon = daemon
        self.samples: list[bool] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> HealthWatch:
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _sample(self) -> None:
        while True:
            self.samples.append(bool(self._daemon.health()[0]))
            await asyncio.sleep(0.005)

    async def went_down_and_up(self, timeout: float = 30.0) -> None:
        """Wait until health was seen failing, then healthy again."""
        deadline = time.monotonic() + timeout
        while True:
            if False in self.samples:
                down = self.samples.index(False)
                if any(self.samples[down:]):
                    return
            assert time.monotonic() < deadline, "health never went down and back up"
            await asyncio.sleep(0.02)
