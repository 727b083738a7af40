"""The README's five-minute tour: its files work as the README says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from formcraftd.core import config as config_module
from formcraftd.core import jobs
from tests.conftest import DaemonFactory
from tests.support import Broker, Names, make_config
from tests.support.process import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.webhook]

TOUR = Path(__file__).resolve().parent.parent / "contrib" / "tour"


def test_the_tour_config_and_jobs_are_valid() -> None:
    cfg = config_module.load(TOUR / "config.toml")
    assert "127.0.0.1/32" in cfg.workers.webhook.allowed_networks
    assert (cfg.workers.email.smtp_host, cfg.workers.email.smtp_port) == ("127.0.0.1", 8025)
    kinds = {
        name: jobs.kind_of(jobs.decode((TOUR / name).read_bytes()))
        for name in ("webhook.json", "email.json", "wrong-secret.json")
    }
    assert kinds == {
        "webhook.json": "webhook",
        "email.json": "email",
        "wrong-secret.json": "webhook",
    }


def start_receiver(port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(TOUR / "receiver.py"), str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def test_the_tour_receiver_verifies_the_daemons_signature_and_refuses_a_wrong_one(
    names: Names, amqp: Broker, start_daemon: DaemonFactory
) -> None:
    """webhook.json is delivered and verified; wrong-secret.json gets a 401 and a dead letter."""
    port = free_port()
    receiver = start_receiver(port)
    try:
        assert receiver.stderr is not None
        assert "receiver on" in receiver.stderr.readline()
        cfg = make_config(names, webhook={"allowed_networks": ["127.0.0.1/32"]})
        await start_daemon(cfg)
        queue = cfg.workers.webhook.queue
        for name in ("webhook.json", "wrong-secret.json"):
            job = orjson.loads((TOUR / name).read_bytes())
            job["payload"]["url"] = f"http://127.0.0.1:{port}/hook"
            await amqp.publish(queue, orjson.dumps(job))
        [dead] = await amqp.take(f"dlq.{queue}", 1)
        assert dead.headers["x-formcraft-error-code"] == "HTTP_STATUS"
        assert dead.headers["x-formcraft-last-status"] == 401
        assert orjson.loads(dead.body)["metadata"]["submissionId"] == "sub_789"
    finally:
        receiver.terminate()
        output, _ = receiver.communicate(timeout=10)
    lines = output.splitlines()
    assert len(lines) == 2, output
    assert any("signature verified" in line and "'Ada'" in line for line in lines), output
    assert any("signature WRONG" in line and "'Mallory'" in line for line in lines), output
