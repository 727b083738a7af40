"""End to end: per-destination rate limits, with the daemon, the real RabbitMQ and receivers.

Timing is asserted only with wide margins and in the direction a slow machine
cannot break (a rate limit can only make calls later), or as an ordering
between destinations that are seconds apart.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from formcraftd.daemon import Daemon
from tests.conftest import DaemonFactory, ReceiverFactory
from tests.support import Broker, Names, Received, make_config, webhook_job

pytestmark = [pytest.mark.e2e, pytest.mark.webhook, pytest.mark.timeout(90)]


def tries_per_job(requests: list[Received]) -> list[int]:
    """How many requests each job (by webhook-id) made, sorted."""
    return sorted(Counter(r.headers["webhook-id"] for r in requests).values())


def samples(daemon: Daemon, family: str, queue: str, label: str) -> dict[str, float]:
    """One metric family of `queue` as /metrics shows it, by the value of `label`."""
    text = daemon.render_metrics().decode()
    return {
        sample.labels[label]: sample.value
        for metric in text_string_to_metric_families(text)
        if metric.name == family
        for sample in metric.samples
        if sample.labels["queue"] == queue
    }


def throttled(daemon: Daemon, queue: str) -> dict[str, float]:
    """formcraftd_jobs_throttled_total of `queue`, by destination."""
    return samples(daemon, "formcraftd_jobs_throttled", queue, "destination")


def jobs(daemon: Daemon, queue: str) -> dict[str, float]:
    """formcraftd_jobs_total of `queue`, by outcome."""
    return samples(daemon, "formcraftd_jobs", queue, "outcome")


async def until_paused(daemon: Daemon, queue: str, destination: str) -> None:
    """Wait until /metrics shows `destination` paused (its rate limit at 0)."""
    family = "formcraftd_destination_rate_limit"
    for _ in range(500):
        if samples(daemon, family, queue, "destination").get(destination) == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{destination} was not paused within 10 s")


async def test_a_limited_destination_gets_its_rate_while_another_is_not_slowed(
    names: Names, amqp: Broker, receiver_factory: ReceiverFactory, start_daemon: DaemonFactory
) -> None:
    """30 jobs to A (10/s, burst 2) take over 2 s and use no try; B's 30 finish before A's."""
    limited = await receiver_factory()
    free = await receiver_factory()
    rate_limit = {
        "hosts": [{"host": f"127.0.0.1:{limited.port}", "requests_per_second": 10, "burst": 2}]
    }
    # One try per job: a job that spent one on its rate limit would be dead-lettered.
    cfg = make_config(names, webhook={"rate_limit": rate_limit}, retry={"attempts": 1})
    daemon = await start_daemon(cfg)
    queue = cfg.workers.webhook.queue
    for _ in range(30):
        await amqp.publish(queue, webhook_job(limited.url))
        await amqp.publish(queue, webhook_job(free.url))
    a = await limited.wait_for(30, timeout=60)
    b = await free.wait_for(30, timeout=60)
    arrivals = sorted(r.at for r in a)
    # 28 calls after the burst at 10/s need 2.8 s; a busy machine only adds to that.
    assert arrivals[-1] - arrivals[0] >= 2.0
    # Never much more than the rate plus the burst in any one second.
    # (A stalled loop can let a few waiting calls go together: a wide margin.)
    assert max(sum(1 for t in arrivals if s <= t < s + 1.0) for s in arrivals) <= 10 + 2 + 8
    assert max(r.at for r in b) < arrivals[-1]
    await asyncio.sleep(0.3)
    assert tries_per_job(limited.requests) == [1] * 30
    assert await amqp.depth(f"dlq.{queue}") == 0
    assert jobs(daemon, queue)["success"] == 60
    counts = throttled(daemon, queue)
    assert counts.get(f"webhook:127.0.0.1:{limited.port}", 0) >= 1
    assert f"webhook:127.0.0.1:{free.port}" not in counts


async def test_a_429_with_retry_after_pauses_only_that_destination(
    names: Names, amqp: Broker, receiver_factory: ReceiverFactory, start_daemon: DaemonFactory
) -> None:
    """No rate configured: a 429 with Retry-After: 3 holds A's jobs back about 3 s
    without using their tries, while B's jobs go at once."""

    async def first_429(_request: web.Request, n: int) -> web.StreamResponse:
        if n == 1:
            return web.Response(status=429, headers={"Retry-After": "3"})
        return web.Response(text="ok")

    paused = await receiver_factory(first_429)
    free = await receiver_factory()
    cfg = make_config(names, retry={"attempts": 2})
    daemon = await start_daemon(cfg)
    queue = cfg.workers.webhook.queue
    await amqp.publish(queue, webhook_job(paused.url))
    [refused] = await paused.wait_for(1)
    await until_paused(daemon, queue, f"webhook:127.0.0.1:{paused.port}")
    for _ in range(10):
        await amqp.publish(queue, webhook_job(paused.url))
        await amqp.publish(queue, webhook_job(free.url))
    b = await free.wait_for(10)
    a = await paused.wait_for(12, timeout=60)
    later = a[1:]
    # The pause starts when the daemon reads the 429, after the receiver sent it.
    assert min(r.at for r in later) >= refused.at + 2.5
    assert max(r.at for r in b) < min(r.at for r in later)
    await asyncio.sleep(0.3)
    # The refused job used its two tries; the ten that waited out the pause one each.
    assert tries_per_job(paused.requests) == [1] * 10 + [2]
    assert await amqp.depth(f"dlq.{queue}") == 0
    outcomes = jobs(daemon, queue)
    assert (outcomes["success"], outcomes["retry"]) == (21, 1)
    assert throttled(daemon, queue).get(f"webhook:127.0.0.1:{paused.port}", 0) >= 10


async def test_a_job_held_back_past_max_job_age_is_dead_lettered_as_job_expired(
    names: Names, amqp: Broker, receiver_factory: ReceiverFactory, start_daemon: DaemonFactory
) -> None:
    """A destination paused for 60 s: a later job waits through the wait queues, then,
    older than breaker.max_job_age_ms, is dead-lettered as JOB_EXPIRED with no try used."""

    async def always_429(_request: web.Request, _n: int) -> web.StreamResponse:
        return web.Response(status=429, headers={"Retry-After": "60"})

    receiver = await receiver_factory(always_429)
    cfg = make_config(names, retry={"attempts": 1}, breaker={"max_job_age_ms": 600})
    await start_daemon(cfg)
    queue = cfg.workers.webhook.queue
    await amqp.publish(queue, webhook_job(receiver.url, submission_id="a"))
    [first] = await amqp.take(f"dlq.{queue}", 1)
    assert first.headers["x-formcraft-error-code"] == "RETRIES_EXHAUSTED"
    await amqp.publish(queue, webhook_job(receiver.url, submission_id="b"))
    [dead] = await amqp.take(f"dlq.{queue}", 1, timeout=20)
    assert dead.headers["x-formcraft-error-code"] == "JOB_EXPIRED"
    assert dead.headers["x-formcraft-attempts"] == 0
    assert len(receiver.requests) == 1


async def test_a_slow_destination_capped_by_max_in_flight_leaves_slots_to_the_others(
    names: Names, amqp: Broker, receiver_factory: ReceiverFactory, start_daemon: DaemonFactory
) -> None:
    """A answers after 2 s; with max_in_flight = 2 of 5 slots, B's jobs all arrive
    before A's third call, which must wait for one of A's first two to end."""

    async def slow(_request: web.Request, _n: int) -> web.StreamResponse:
        await asyncio.sleep(2)
        return web.Response(text="ok")

    sluggish = await receiver_factory(slow)
    free = await receiver_factory()
    cfg = make_config(
        names, webhook={"concurrency": 5, "rate_limit": {"max_in_flight": 2}}, retry={"attempts": 1}
    )
    daemon = await start_daemon(cfg)
    queue = cfg.workers.webhook.queue
    for _ in range(6):
        await amqp.publish(queue, webhook_job(sluggish.url))
    for _ in range(10):
        await amqp.publish(queue, webhook_job(free.url))
    b = await free.wait_for(10)
    a = await sluggish.wait_for(3, timeout=30)
    assert max(r.at for r in b) < sorted(r.at for r in a)[2]
    await sluggish.wait_for(6, timeout=60)
    await asyncio.sleep(0.3)
    assert tries_per_job(sluggish.requests) == [1] * 6
    assert await amqp.depth(f"dlq.{queue}") == 0
    assert throttled(daemon, queue).get(f"webhook:127.0.0.1:{sluggish.port}", 0) >= 1
