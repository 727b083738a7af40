"""Receivers that misbehave end in their documented outcome, and never stall the queue."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from tests.conftest import DaemonFactory, ReceiverFactory
from tests.support import Broker, Names, make_config, webhook_job

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.timeout(120)]

TIMEOUT_MS = 500
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[str]:
    """A bare TCP server on loopback (for behaviour no HTTP framework would produce)."""
    tasks: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer)
        except (asyncio.CancelledError, ConnectionError):
            pass  # the test is over, or the client went away
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/hook"
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Accept the connection, read the request, never answer."""
    await reader.read(65536)
    await asyncio.sleep(30)


async def resetting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read the request, then reset the connection (RST, not FIN)."""
    await reader.read(65536)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def slowloris(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer 200 with a body dribbled one byte every 100 ms, forever."""
    await reader.read(65536)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
    for _ in range(300):
        writer.write(b"x")
        await writer.drain()
        await asyncio.sleep(0.1)


async def slow_status_line(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Dribble the status line itself, a byte every 100 ms."""
    await reader.read(65536)
    for byte in b"HTTP/1.1 200 OK\r\n" * 20:
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(0.1)


async def redirect_loop(request: web.Request, _n: int) -> web.StreamResponse:
    raise web.HTTPFound(location=str(request.url))


async def huge(_request: web.Request, _n: int) -> web.StreamResponse:
    return web.Response(status=500, body=b"e" * (20 * 1024 * 1024))


async def ok(_request: web.Request, _n: int) -> web.StreamResponse:
    return web.Response(status=200)


@pytest.mark.parametrize(
    ("behaviour", "code"),
    [
        (silent, "RETRIES_EXHAUSTED"),
        (resetting, "RETRIES_EXHAUSTED"),
        (slow_status_line, "RETRIES_EXHAUSTED"),
    ],
)
async def test_a_broken_receiver_ends_within_the_timeout(
    behaviour: Handler, code: str, names: Names, amqp: Broker, start_daemon: DaemonFactory
) -> None:
    """No answer, a reset or a dribbled status line: each try ends within timeout_ms."""
    cfg = make_config(names, webhook={"timeout_ms": TIMEOUT_MS}, retry={"attempts": 2})
    await start_daemon(cfg)
    async with raw_server(behaviour) as url:
        started = time.monotonic()
        await amqp.publish(cfg.workers.webhook.queue, webhook_job(url))
        [dead] = await amqp.take(f"dlq.{cfg.workers.webhook.queue}", 1, timeout=20)
        elapsed = time.monotonic() - started
    assert dead.headers["x-formcraft-error-code"] == code
    # two tries of at most timeout_ms each, plus the 100 ms wait between them and slack
    assert elapsed < 2 * TIMEOUT_MS / 1000 + 2.0


async def test_a_dribbled_body_after_a_200_still_succeeds_within_the_timeout(
    names: Names, amqp: Broker, start_daemon: DaemonFactory
) -> None:
    """The status decides: a 200 whose body never ends is a success, not a hang."""
    cfg = make_config(names, webhook={"timeout_ms": TIMEOUT_MS})
    daemon = await start_daemon(cfg)
    async with raw_server(slowloris) as url:
        started = time.monotonic()
        await amqp.publish(cfg.workers.webhook.queue, webhook_job(url))
        while daemon.consumers[cfg.workers.webhook.queue].stats.finished < 1:
            assert time.monotonic() - started < 10
            await asyncio.sleep(0.05)
    assert time.monotonic() - started < TIMEOUT_MS / 1000 + 2.0
    assert await amqp.depth(f"dlq.{cfg.workers.webhook.queue}") == 0


async def test_endless_redirects_are_not_followed(
    names: Names, amqp: Broker, receiver_factory: ReceiverFactory, start_daemon: DaemonFactory
) -> None:
    """A redirect loop costs one request: HTTP_STATUS 302, dead-lettered at once."""
    receiver = await receiver_factory(redirect_loop)
    cfg = make_config(names)
    await start_daemon(cfg)
    await amqp.publish(cfg.workers.webhook.queue, webhook_job(receiver.url))
    [dead] = await amqp.take(f"dlq.{cfg.workers.webhook.queue}", 1)
    assert dead.headers["x-formcraft-error-code"] == "HTTP_STATUS"
    assert dead.headers["x-formcraft-last-status"] == 302
    assert len(receiver.requests) == 1


async def test_a_response_larger_than_the_cap_is_not_read_whole(
    names: Names, amqp: Broker, receiver_factory: ReceiverFactory, start_daemon: DaemonFactory
) -> None:
    """A 20 MB error body is classified by its status without being buffered."""
    receiver = await receiver_factory(huge)
    cfg = make_config(names, retry={"attempts": 1}, webhook={"max_response_bytes": 1024})
    await start_daemon(cfg)
    await amqp.publish(cfg.workers.webhook.queue, webhook_job(receiver.url))
    [dead] = await amqp.take(f"dlq.{cfg.workers.webhook.queue}", 1)
    assert dead.headers["x-formcraft-last-status"] == 500
    assert len(str(dead.headers["x-formcraft-error"])) < 1024


async def test_one_bad_endpoint_never_stalls_the_others(
    names: Names, amqp: Broker, receiver_factory: ReceiverFactory, start_daemon: DaemonFactory
) -> None:
    """While a silent host eats its timeouts, its breaker opens and a good host's jobs flow."""
    good = await receiver_factory(ok)
    cfg = make_config(
        names,
        webhook={"timeout_ms": 2000, "concurrency": 4},
        retry={"attempts": 5, "initial_delay_ms": 100, "max_delay_ms": 400},
        breaker={"failure_threshold": 3, "reset_timeout_ms": 60000},
    )
    daemon = await start_daemon(cfg)
    queue = cfg.workers.webhook.queue
    async with raw_server(silent) as bad_url:
        for i in range(20):
            await amqp.publish(queue, webhook_job(bad_url, submission_id=f"bad{i}"))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        for i in range(100):
            await amqp.publish(queue, webhook_job(good.url, submission_id=f"good{i}"))
        await good.wait_for(100, timeout=30)
        good_elapsed = time.monotonic() - started
        bad_port = bad_url.split(":")[2].split("/")[0]
        assert daemon.breakers.snapshot()[f"webhook:127.0.0.1:{bad_port}"] == "open"
    # 100 good jobs behind 20 stuck ones: only the first few bad tries (2 s each,
    # before the breaker opened) may hold slots; the rest flow at full rate.
    assert good_elapsed < 8, f"good jobs took {good_elapsed:.1f} s"
    assert await amqp.depth(f"dlq.{queue}") == 0
