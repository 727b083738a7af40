"""End to end: the daemon in this process, the real RabbitMQ, the fake Google on loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aio_pika
import orjson
import pytest

from formcraftd.core.config import Config
from tests.conftest import DaemonFactory
from tests.support import Broker, Names, make_config
from tests.support.google import CLIENT_SECRET, Failure, FakeGoogle, sheets_job_body

pytestmark = [pytest.mark.e2e, pytest.mark.sheets, pytest.mark.timeout(60)]

SHEET = "sheet-1"
RANGE = "Sheet1!A:C"


@pytest.fixture
async def google() -> AsyncIterator[FakeGoogle]:
    """The fake Google with one spreadsheet, stopped afterwards."""
    fake = await FakeGoogle().start()
    fake.add_spreadsheet(SHEET)
    yield fake
    await fake.stop()


def sheets_config(names: Names, google: FakeGoogle, **sheets: Any) -> Config:
    """Only the sheets worker, talking to the fake; breakers out of the way."""
    return make_config(
        names,
        webhook={"enabled": False},
        sheets=google.sheets_config(**sheets),
        breaker={"failure_threshold": 1000},
    )


async def publish_all(amqp: Broker, queue: str, bodies: list[bytes]) -> None:
    """Publish in order on one confirmed channel, so the jobs arrive together."""
    channel = await amqp.connection.channel(publisher_confirms=True)
    try:
        for index, body in enumerate(bodies):
            await channel.default_exchange.publish(
                aio_pika.Message(
                    body, message_id=f"job-{index}", delivery_mode=aio_pika.DeliveryMode.PERSISTENT
                ),
                routing_key=queue,
            )
    finally:
        await channel.close()


async def until(probe: Callable[[], Awaitable[int]], expected: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while (value := await probe()) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"still {value}, expected {expected}")
        await asyncio.sleep(0.05)


async def test_batched_jobs_are_written_in_order_with_few_calls_and_acked(
    names: Names, amqp: Broker, google: FakeGoogle, start_daemon: DaemonFactory
) -> None:
    """Forty jobs for one sheet become a handful of values.append calls, rows in order."""
    refresh, access, expiry = google.add_user()
    cfg = sheets_config(names, google, batch_window_ms=300)
    await start_daemon(cfg)
    bodies = [
        sheets_job_body(
            refresh_token=refresh, access_token=access, expiry_ms=expiry, values=[[f"r{i}", i]]
        )
        for i in range(40)
    ]
    await publish_all(amqp, cfg.workers.sheets.queue, bodies)
    await google.wait_for(lambda g: len(g.rows(SHEET, RANGE)) >= 40)
    assert google.rows(SHEET, RANGE) == [[f"r{i}", i] for i in range(40)]
    assert len(google.calls) <= 4
    await until(lambda: amqp.depth(cfg.workers.sheets.queue), 0)
    assert await amqp.depth(f"dlq.{cfg.workers.sheets.queue}") == 0


async def test_a_failed_batch_is_retried_job_by_job(
    names: Names, amqp: Broker, google: FakeGoogle, start_daemon: DaemonFactory
) -> None:
    """After one 500, every job of the batch is retried on its own path and written once."""
    refresh, access, expiry = google.add_user()
    google.script.append(Failure(500))
    cfg = sheets_config(names, google, batch_window_ms=200)
    await start_daemon(cfg)
    bodies = [
        sheets_job_body(refresh_token=refresh, access_token=access, expiry_ms=expiry, values=[[i]])
        for i in range(5)
    ]
    await publish_all(amqp, cfg.workers.sheets.queue, bodies)
    await google.wait_for(lambda g: len(g.rows(SHEET, RANGE)) >= 5)
    await asyncio.sleep(0.5)
    assert sorted(google.rows(SHEET, RANGE)) == [[i] for i in range(5)]
    assert google.calls[0].status == 500
    assert await amqp.depth(f"dlq.{cfg.workers.sheets.queue}") == 0


async def test_a_failed_batch_counts_as_one_breaker_failure(
    names: Names, amqp: Broker, google: FakeGoogle, start_daemon: DaemonFactory
) -> None:
    """One failed call for five jobs is one failure: a threshold of 2 keeps the breaker closed."""
    refresh, access, expiry = google.add_user()
    google.script.append(Failure(500))
    cfg = make_config(
        names,
        webhook={"enabled": False},
        sheets=google.sheets_config(batch_window_ms=200),
        breaker={"failure_threshold": 2, "reset_timeout_ms": 60000},
    )
    daemon = await start_daemon(cfg)
    bodies = [
        sheets_job_body(refresh_token=refresh, access_token=access, expiry_ms=expiry, values=[[i]])
        for i in range(5)
    ]
    await publish_all(amqp, cfg.workers.sheets.queue, bodies)
    await google.wait_for(lambda g: len(g.rows(SHEET, RANGE)) >= 5)
    assert google.calls[0].status == 500
    assert daemon.breakers.snapshot()[f"sheets:{SHEET}"] == "closed"


async def test_a_batch_that_always_fails_dead_letters_every_job(
    names: Names, amqp: Broker, google: FakeGoogle, start_daemon: DaemonFactory
) -> None:
    """Each job of a failing batch uses its own tries and is dead-lettered on its own."""
    refresh, access, expiry = google.add_user()
    google.always = Failure(503, error_status="UNAVAILABLE")
    cfg = sheets_config(names, google, batch_window_ms=100)
    await start_daemon(cfg)
    bodies = [
        sheets_job_body(refresh_token=refresh, access_token=access, expiry_ms=expiry, values=[[i]])
        for i in range(4)
    ]
    await publish_all(amqp, cfg.workers.sheets.queue, bodies)
    dead = await amqp.take(f"dlq.{cfg.workers.sheets.queue}", 4, timeout=30)
    assert sorted(message.message_id or "" for message in dead) == [f"job-{i}" for i in range(4)]
    for message in dead:
        assert message.headers["x-formcraft-error-code"] == "RETRIES_EXHAUSTED"
        assert message.headers["x-formcraft-attempts"] == 3
        assert message.headers["x-formcraft-last-status"] == 503


async def test_invalid_grant_dead_letters_as_auth_revoked_without_tokens(
    names: Names, amqp: Broker, google: FakeGoogle, start_daemon: DaemonFactory
) -> None:
    """A revoked refresh token: AUTH_REVOKED at once, and no token or secret in the headers."""
    refresh, _, _ = google.add_user()
    google.revoke(refresh)
    cfg = sheets_config(names, google)
    await start_daemon(cfg)
    body = sheets_job_body(refresh_token=refresh, access_token="ya29.stale-token", expiry_ms=1)
    await amqp.publish(cfg.workers.sheets.queue, body)
    [dead] = await amqp.take(f"dlq.{cfg.workers.sheets.queue}", 1)
    assert dead.headers["x-formcraft-error-code"] == "AUTH_REVOKED"
    assert dead.headers["x-formcraft-attempts"] == 1
    headers = orjson.dumps({k: str(v) for k, v in dead.headers.items()}).decode()
    for secret in (refresh, "ya29.stale-token", CLIENT_SECRET):
        assert secret not in headers
    assert google.calls == []


async def test_unknown_spreadsheet_is_dead_lettered_as_rejected(
    names: Names, amqp: Broker, google: FakeGoogle, start_daemon: DaemonFactory
) -> None:
    """A 404 from Sheets: SHEETS_REQUEST_REJECTED after one call, last status 404."""
    refresh, access, expiry = google.add_user()
    cfg = sheets_config(names, google)
    await start_daemon(cfg)
    body = sheets_job_body(
        refresh_token=refresh, access_token=access, expiry_ms=expiry, spreadsheet_id="missing"
    )
    await amqp.publish(cfg.workers.sheets.queue, body)
    [dead] = await amqp.take(f"dlq.{cfg.workers.sheets.queue}", 1)
    assert dead.headers["x-formcraft-error-code"] == "SHEETS_REQUEST_REJECTED"
    assert dead.headers["x-formcraft-last-status"] == 404
    assert len(google.calls) == 1


async def test_429_retry_after_delays_the_retry(
    names: Names, amqp: Broker, google: FakeGoogle, start_daemon: DaemonFactory
) -> None:
    """A 429 with Retry-After: 1 is tried again no sooner than a second later, then acked."""
    refresh, access, expiry = google.add_user()
    google.script.append(Failure(429, retry_after="1", error_status="RESOURCE_EXHAUSTED"))
    cfg = make_config(
        names,
        webhook={"enabled": False},
        sheets=google.sheets_config(),
        retry={"initial_delay_ms": 100, "max_delay_ms": 2000},
    )
    await start_daemon(cfg)
    body = sheets_job_body(refresh_token=refresh, access_token=access, expiry_ms=expiry)
    await amqp.publish(cfg.workers.sheets.queue, body)
    await google.wait_for(lambda g: len(g.succeeded()) == 1)
    first, second = google.calls
    assert (first.status, second.status) == (429, 200)
    assert second.at - first.at >= 1.0
    await until(lambda: amqp.depth(cfg.workers.sheets.queue), 0)


async def test_expired_token_is_refreshed_once_for_a_burst_of_jobs(
    names: Names, amqp: Broker, google: FakeGoogle, start_daemon: DaemonFactory
) -> None:
    """Jobs for several sheets with one expired token cause a single token request."""
    refresh, _, _ = google.add_user()
    google.token_delay_s = 0.2
    for index in range(5):
        google.add_spreadsheet(f"sheet-{index}")
    cfg = sheets_config(names, google, concurrency=5, requests_per_minute_per_user=6000)
    await start_daemon(cfg)
    bodies = [
        sheets_job_body(
            refresh_token=refresh,
            access_token="ya29.expired",
            expiry_ms=1,
            spreadsheet_id=f"sheet-{index % 5}",
        )
        for index in range(20)
    ]
    await publish_all(amqp, cfg.workers.sheets.queue, bodies)
    await google.wait_for(lambda g: sum(len(call.rows) for call in g.succeeded()) >= 20)
    assert len(google.grants) == 1
    assert "ya29.expired" not in {call.token for call in google.calls}
