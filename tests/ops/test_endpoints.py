"""Endpoint health: failing, recovered and gone webhook destinations, told to the app."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web

from formcraftd.core.breakers import CircuitBreaker
from formcraftd.core.events import EndpointFailingEvent, EndpointRecoveredEvent, Event
from formcraftd.ops.endpoints import EndpointHealth
from tests.conftest import DaemonFactory, ReceiverFactory
from tests.support import Broker, Names, status, webhook_job
from tests.support.events import EventTap, events_config


def test_a_breaker_that_opens_then_closes_is_failing_then_recovered() -> None:
    published: list[Event] = []
    health = EndpointHealth(published.append)
    clock = [0.0]
    breaker = CircuitBreaker(
        "webhook:hooks.example.com:443",
        failure_threshold=2,
        reset_timeout_s=5,
        clock=lambda: clock[0],
        on_change=lambda _key, state: health.breaker_changed(breaker, state),
    )
    breaker.record_failure("TIMEOUT", None)
    assert published == []
    breaker.record_failure("HTTP_STATUS", 503)
    [failing] = published
    assert isinstance(failing, EndpointFailingEvent)
    assert (failing.host, failing.port, failing.consecutive_failures) == (
        "hooks.example.com",
        443,
        2,
    )
    assert (failing.last_error_code, failing.last_status) == ("HTTP_STATUS", 503)
    assert health.snapshot()["failing"][0]["event"] == "endpoint_failing"
    clock[0] = 6  # half-open: a probe goes through and fails again: still the same episode
    breaker.acquire()
    breaker.record_failure("HTTP_STATUS", 503)
    assert len(published) == 1
    clock[0] = 12
    breaker.acquire()
    breaker.record_success()
    recovered = published[-1]
    assert isinstance(recovered, EndpointRecoveredEvent)
    assert recovered.failing_since == failing.since
    assert health.snapshot() == {"failing": [], "gone": []}


def test_other_breakers_publish_nothing() -> None:
    published: list[Event] = []
    health = EndpointHealth(published.append)
    breaker = CircuitBreaker("smtp:relay:25", failure_threshold=1, reset_timeout_s=5)
    health.breaker_changed(breaker, "open")
    assert published == []


@pytest.mark.e2e
async def test_a_failing_destination_is_published_then_its_recovery(
    names: Names,
    amqp: Broker,
    tap: EventTap,
    receiver_factory: ReceiverFactory,
    start_daemon: DaemonFactory,
) -> None:
    """Two 500s open the breaker (endpoint_failing); a later 200 closes it (endpoint_recovered)."""

    async def flaky(_request: web.Request, n: int) -> web.StreamResponse:
        return web.Response(status=500 if n <= 2 else 200)

    receiver = await receiver_factory(flaky)
    cfg = events_config(
        names,
        breaker={"failure_threshold": 2, "reset_timeout_ms": 300},
        retry={"attempts": 5},
    )
    daemon = await start_daemon(cfg)
    await amqp.publish(cfg.workers.webhook.queue, webhook_job(receiver.url))
    await amqp.publish(cfg.workers.webhook.queue, webhook_job(receiver.url, submission_id="s2"))
    keys: list[str] = []
    found: dict[str, dict[str, Any]] = {}
    while "webhook.endpoint_recovered" not in found:
        await tap.wait(len(tap.events) + 1)
        key, event = tap.events[-1]
        keys.append(key)
        found.setdefault(key, event)
    failing = found["webhook.endpoint_failing"]
    assert (failing["host"], failing["port"]) == ("127.0.0.1", receiver.port)
    assert (failing["consecutive_failures"], failing["last_error_code"]) == (2, "HTTP_STATUS")
    assert failing["last_status"] == 500
    assert found["webhook.endpoint_recovered"]["failing_since"] == failing["since"]
    assert keys.index("webhook.endpoint_failing") < keys.index("webhook.endpoint_recovered")
    assert daemon.status()["endpoints"]["failing"] == []


@pytest.mark.e2e
async def test_a_410_publishes_endpoint_gone_with_the_url_masked(
    names: Names,
    amqp: Broker,
    tap: EventTap,
    receiver_factory: ReceiverFactory,
    start_daemon: DaemonFactory,
) -> None:
    receiver = await receiver_factory(status(410))
    cfg = events_config(names)
    daemon = await start_daemon(cfg)
    url = f"{receiver.url}?token=integration-secret"
    job_id = await amqp.publish(
        cfg.workers.webhook.queue, webhook_job(url, form_id="form-gone", submission_id="sub-gone")
    )
    await tap.wait(2)
    await tap.quiet(0.3)
    by_key = dict(tap.events)
    gone = by_key["webhook.endpoint_gone"]
    assert (gone["job_id"], gone["form_id"], gone["submission_id"]) == (
        job_id,
        "form-gone",
        "sub-gone",
    )
    assert gone["url"] == f"{receiver.url}?token=***"
    assert (gone["host"], gone["port"]) == ("127.0.0.1", receiver.port)
    assert by_key["webhook.dead_lettered"]["error_code"] == "HTTP_STATUS"
    assert all(b"integration-secret" not in body for body in tap.raw)
    [shown] = daemon.status()["endpoints"]["gone"]
    assert shown["url"] == gone["url"]
    await amqp.take(f"dlq.{cfg.workers.webhook.queue}", 1)
