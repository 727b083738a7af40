"""sd_notify against real datagram sockets, and a daemon process talking to one."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from formcraftd.ops import systemd
from tests.support import Broker, Names, make_config
from tests.support.process import free_port, spawn, wait_exit, wait_healthy, write_config


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket bound to a path, named in $NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def test_notify_sends_one_datagram_to_the_socket(notify_socket: socket.socket) -> None:
    """notify() delivers the state string as a single datagram."""
    assert systemd.notify("READY=1")
    assert notify_socket.recv(4096) == b"READY=1"


def test_notify_supports_abstract_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    """A NOTIFY_SOCKET starting with @ names an abstract socket."""
    name = f"formcraftd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        assert systemd.notify("STOPPING=1")
        assert sock.recv(4096) == b"STOPPING=1"
    finally:
        sock.close()


def test_notify_without_systemd_sends_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside systemd (no NOTIFY_SOCKET) notify() is a no-op returning False."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not systemd.notify("READY=1")


def test_watchdog_interval_is_half_of_watchdog_usec(monkeypatch: pytest.MonkeyPatch) -> None:
    """WATCHDOG_USEC=2s means a ping every second; another process's watchdog is ignored."""
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 1.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert systemd.watchdog_interval() is None


async def _collect(sock: socket.socket, until: bytes, timeout: float = 20) -> list[bytes]:
    """Datagrams received until one contains `until`."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    seen: list[bytes] = []
    async with asyncio.timeout(timeout):
        while not any(until in datagram for datagram in seen):
            seen.append(await loop.sock_recv(sock, 4096))
    return seen


@pytest.mark.e2e
async def test_daemon_speaks_the_notify_protocol(
    tmp_path: Path, names: Names, amqp: Broker, notify_socket: socket.socket
) -> None:
    """READY once consuming, WATCHDOG pings, RELOADING/READY around SIGHUP, STOPPING."""
    cfg = make_config(names)
    amqp.track(cfg)
    port = free_port()
    config_file = write_config(tmp_path / "config.toml", names, port=port)
    os.environ["WATCHDOG_USEC"] = "200000"
    try:
        process = spawn("run", "--config", str(config_file), log=tmp_path / "daemon.log")
    finally:
        del os.environ["WATCHDOG_USEC"]
    try:
        seen = await _collect(notify_socket, b"READY=1")
        await wait_healthy(port)
        pings = await _collect(notify_socket, b"WATCHDOG=1")
        pings += await _collect(notify_socket, b"WATCHDOG=1")
        process.send_signal(signal.SIGHUP)
        reload = await _collect(notify_socket, b"READY=1")
        process.send_signal(signal.SIGTERM)
        stopping = await _collect(notify_socket, b"STOPPING=1")
        assert await wait_exit(process, 20) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    assert b"READY=1" in seen
    assert sum(datagram == b"WATCHDOG=1" for datagram in pings) >= 2
    reloading = [d for d in reload if d.startswith(b"RELOADING=1")]
    assert reloading and b"\nMONOTONIC_USEC=" in reloading[0]
    assert reload[-1] == b"READY=1"
    assert stopping[-1] == b"STOPPING=1"


@pytest.mark.e2e
async def test_sigterm_right_after_a_reload_still_stops(
    tmp_path: Path, names: Names, amqp: Broker, notify_socket: socket.socket
) -> None:
    """SIGHUP, READY, then at once SIGTERM, ten times: the daemon exits 0 every time."""
    cfg = make_config(names)
    amqp.track(cfg)
    for round_ in range(10):
        port = free_port()
        config_file = write_config(tmp_path / f"config{round_}.toml", names, port=port)
        process = spawn("run", "--config", str(config_file), log=tmp_path / f"d{round_}.log")
        try:
            await _collect(notify_socket, b"READY=1")
            process.send_signal(signal.SIGHUP)
            await _collect(notify_socket, b"RELOADING=1")
            await _collect(notify_socket, b"READY=1")
            process.send_signal(signal.SIGTERM)
            assert await wait_exit(process, 10) == 0, f"round {round_} hung"
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
