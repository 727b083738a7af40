"""The monitor: depths stay fresh whatever the alert interval."""

from __future__ import annotations

import asyncio
import time

import pytest

from formcraftd.ops import monitor
from tests.conftest import DaemonFactory
from tests.support import Broker, Names, make_config

pytestmark = [pytest.mark.e2e]


@pytest.mark.parametrize("alerts_enabled", [True, False])
async def test_depths_are_polled_more_often_than_a_long_alert_interval(
    names: Names,
    amqp: Broker,
    start_daemon: DaemonFactory,
    monkeypatch: pytest.MonkeyPatch,
    alerts_enabled: bool,
) -> None:
    """New dead letters show long before a 60 s alert interval, alerts on or off."""
    monkeypatch.setattr(monitor, "DEPTH_INTERVAL_S", 0.2)
    cfg = make_config(names, monitoring={"enabled": alerts_enabled, "interval_ms": 60_000})
    daemon = await start_daemon(cfg)
    queue = cfg.workers.webhook.queue
    assert daemon.monitor.describe()["depths_every_s"] == 0.2
    for _ in range(3):
        await amqp.publish(queue, b"not a job")  # a VALIDATION_ERROR, dead-lettered at once
    deadline = time.monotonic() + 10
    while daemon.status()["queues"][queue]["dead_letter_depth"] != 3:
        assert time.monotonic() < deadline, daemon.status()["queues"][queue]
        await asyncio.sleep(0.05)
    line = f'formcraftd_dead_letter_depth{{queue="{queue}"}} 3.0'
    assert line in daemon.render_metrics().decode().splitlines()
