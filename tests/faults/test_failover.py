"""Several broker URLs: when the node in use goes away for good, the daemon moves on."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from tests.conftest import DaemonFactory, ReceiverFactory
from tests.support import Broker, Names, make_config, webhook_job

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.timeout(120)]


class TcpProxy:
    """Forwards a loopback port to RabbitMQ; `kill()` makes it vanish like a dead node."""

    def __init__(self, target_port: int = 5672) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
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
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2)


async def test_the_daemon_fails_over_to_the_next_node(
    names: Names, amqp: Broker, receiver_factory: ReceiverFactory, start_daemon: DaemonFactory
) -> None:
    """Node 1 (a proxy) dies mid-stream; the daemon reconnects through node 2 and delivers all."""
    proxy = await TcpProxy().start()
    receiver = await receiver_factory()
    nodes = f"amqp://guest:guest@127.0.0.1:{proxy.port}/,amqp://guest:guest@127.0.0.1:5672/"
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
        while not (daemon.health()[0] and daemon.broker.connection.url.port == 5672):
            assert time.monotonic() < deadline, "the daemon never moved to the second node"
            await asyncio.sleep(0.1)
    finally:
        await proxy.kill()
    for i in range(20, 40):
        await amqp.publish(queue, webhook_job(receiver.url, submission_id=str(i)))
    await receiver.wait_for(40)
    assert "formcraftd_reconnects_total 1.0" in daemon.render_metrics().decode()
