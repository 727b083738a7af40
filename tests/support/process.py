"""The daemon and the command line as real processes: configs on disk, spawning, waiting."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from tests.support import AMQP_URL, Names


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(
    path: Path,
    names: Names,
    *,
    port: int,
    concurrency: int = 4,
    shutdown_timeout_s: float = 10,
    url: str = AMQP_URL,
    connect_timeout_s: float = 10,
    max_priority: int = 0,
) -> Path:
    lines = [
        "[broker]",
        f'url = "{url}"',
        f"connect_timeout_s = {connect_timeout_s}",
        "[http]",
        'host = "127.0.0.1"',
        f"port = {port}",
        "[daemon]",
        f"shutdown_timeout_s = {shutdown_timeout_s}",
        "[monitoring]",
        "enabled = false",
        "[retry]",
        "initial_delay_ms = 100",
        "max_delay_ms = 800",
        "[workers.webhook]",
        f'queue = "{names.queue("webhook")}"',
        f'dead_letter_exchange = "{names.dlx("webhook")}"',
        f"concurrency = {concurrency}",
        'allowed_networks = ["127.0.0.1/32"]',
        f"max_priority = {max_priority}",
    ]
    for kind in ("email", "sheets"):
        lines += [
            f"[workers.{kind}]",
            "enabled = false",
            f'queue = "{names.queue(kind)}"',
            f'dead_letter_exchange = "{names.dlx(kind)}"',
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def spawn(*args: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "formcraftd", *args], stdout=out, stderr=subprocess.STDOUT
        )


async def wait_healthy(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError("daemon never became healthy")


async def wait_exit(process: subprocess.Popen[bytes], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise TimeoutError("daemon did not exit in time")
        await asyncio.sleep(0.05)
    return process.returncode


def run_cli(
    *args: str, env: dict[str, str] | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    """Run the command line to its end; stdin is `stdin` through a pipe (never a terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "formcraftd", *args],
        capture_output=True,
        input=stdin,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


def run_cli_on_terminal(*args: str, answer: str) -> subprocess.CompletedProcess[str]:
    """Run the command line with a terminal (a pty) as stdin, typing `answer` and Enter."""
    controller, terminal = os.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "formcraftd", *args],
            stdin=terminal,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        os.close(terminal)
        os.write(controller, answer.encode() + b"\n")  # the terminal holds the line until read
        stdout, stderr = process.communicate(timeout=60)
    finally:
        with contextlib.suppress(OSError):
            os.close(terminal)
        os.close(controller)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
