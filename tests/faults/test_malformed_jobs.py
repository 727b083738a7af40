"""Jobs that can never succeed are VALIDATION_ERROR at once, never a retried internal error."""

from __future__ import annotations

import logging

import orjson
import pytest

from formcraftd.amqp.topology import dead_letter_queue_name
from tests.conftest import DaemonFactory, ReceiverFactory
from tests.support import Broker, Names, make_config, webhook_job

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.timeout(120)]


async def test_malformed_webhook_jobs_are_validation_errors_reported_once(
    names: Names,
    amqp: Broker,
    receiver_factory: ReceiverFactory,
    start_daemon: DaemonFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 300-character host label, a vertical tab in a header, Authorization with userinfo."""
    receiver = await receiver_factory()
    cfg = make_config(names)
    await start_daemon(cfg)
    port = receiver.url.split(":")[2].split("/")[0]
    queue = cfg.workers.webhook.queue
    bodies = [
        webhook_job(f"http://{'a' * 300}.example/hook"),
        orjson.dumps(
            {
                **orjson.loads(webhook_job(receiver.url)),
                "payload": {
                    **orjson.loads(webhook_job(receiver.url))["payload"],
                    "headers": {"X-Note": "one\x0btwo"},
                },
            }
        ),
        webhook_job(f"http://user:pw@127.0.0.1:{port}/hook", headers={"Authorization": "Bearer x"}),
    ]
    with caplog.at_level(logging.WARNING, logger="formcraftd"):
        for body in bodies:
            await amqp.publish(queue, body)
        dead = await amqp.take(dead_letter_queue_name(queue), 3, timeout=20)
    assert [m.headers["x-formcraft-error-code"] for m in dead] == ["VALIDATION_ERROR"] * 3
    assert [m.headers["x-formcraft-attempts"] for m in dead] == [1, 1, 1]  # never retried
    assert receiver.requests == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "internal error" not in caplog.text
    dead_letter_lines = [r for r in caplog.records if "dead_letter" in r.getMessage()]
    assert len(dead_letter_lines) == 3
