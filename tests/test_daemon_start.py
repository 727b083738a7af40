"""What the daemon says when it starts: where it listens, in the format asked for."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.support import Broker, Names, make_config
from tests.support.process import free_port, wait_exit, wait_healthy, write_config

pytestmark = [pytest.mark.e2e]


def run_with_env(config_file: Path, log: Path, **env: str) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "formcraftd", "run", "--config", str(config_file)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=os.environ | env,
        )


@pytest.mark.parametrize("log_format", ["json", "console"])
async def test_the_start_line_names_the_http_address(
    tmp_path: Path, names: Names, amqp: Broker, log_format: str
) -> None:
    """One INFO line names the queues and the URL of /healthz, /metrics and the page."""
    amqp.track(make_config(names))
    port = free_port()
    config_file = write_config(tmp_path / "config.toml", names, port=port)
    log = tmp_path / "daemon.log"
    process = run_with_env(config_file, log, FORMCRAFTD_LOG_FORMAT=log_format)
    try:
        await wait_healthy(port)
        process.send_signal(signal.SIGTERM)
        assert await wait_exit(process, 20) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    lines = log.read_text().splitlines()
    wanted = f"HTTP on http://127.0.0.1:{port} (/healthz, /metrics, status page /)"
    [start] = [line for line in lines if wanted in line]
    assert names.queue("webhook") in start
    if log_format == "json":
        assert orjson.loads(start)["level"] == "info"
    else:
        assert not start.startswith("{")
