"""Operations: live reload, the admin API, DLQ tools, readiness, alerts."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from formcraftd.core.errors import ConfigError
from formcraftd.daemon import Daemon
from formcraftd.ops.http import bound_port
from formcraftd.workers.webhook.signing import webhook_id
from tests.conftest import DaemonFactory, ReceiverFactory
from tests.support import Broker, Names, make_config, paced, rabbitmqctl, webhook_job
from tests.support import status as answering
from tests.support.process import (
    free_port,
    run_cli,
    run_cli_on_terminal,
    spawn,
    wait_exit,
    wait_healthy,
    write_config,
)

pytestmark = [pytest.mark.e2e]

TOKEN = "admin-token-for-tests"
SECRET = "whsec_c2VjcmV0LWZvci1kbHEtdGVzdHM="


def base_url(daemon: Daemon) -> str:
    assert daemon.http_runner is not None
    return f"http://127.0.0.1:{bound_port(daemon.http_runner)}"


async def call(method: str, url: str, token: str | None = TOKEN) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, headers=headers) as response,
    ):
        text = await response.text()
        try:
            return response.status, json.loads(text)
        except json.JSONDecodeError:
            return response.status, text


async def metric(port: int, line_start: str) -> float:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def counting_receiver(delay: float) -> tuple[Any, list[int]]:
    """A behaviour recording how many requests were active as each one started."""
    active = 0
    seen: list[int] = []

    async def answer(_request: web.Request, _n: int) -> web.StreamResponse:
        nonlocal active
        active += 1
        seen.append(active)
        await asyncio.sleep(delay)
        active -= 1
        return web.Response(status=200)

    return answer, seen


async def test_sighup_raises_and_lowers_concurrency_under_load_losing_nothing(
    tmp_path: Path, names: Names, amqp: Broker, receiver_factory: ReceiverFactory
) -> None:
    """SIGHUP moves the limit 2 -> 6 -> 1 while jobs flow; every job arrives exactly once."""
    behaviour, seen = counting_receiver(0.05)
    receiver = await receiver_factory(behaviour)
    cfg = make_config(names)
    amqp.track(cfg)
    port = free_port()
    config_file = tmp_path / "config.toml"
    write_config(config_file, names, port=port, concurrency=2)
    process = spawn("run", "--config", str(config_file), log=tmp_path / "daemon.log")
    try:
        await wait_healthy(port)
        ids = [
            await amqp.publish(
                cfg.workers.webhook.queue, webhook_job(receiver.url, submission_id=str(i))
            )
            for i in range(240)
        ]
        await receiver.wait_for(20)
        assert max(seen) <= 2
        write_config(config_file, names, port=port, concurrency=6)
        process.send_signal(signal.SIGHUP)
        await receiver.wait_for(len(seen) + 60)
        assert max(seen) <= 6
        assert max(seen[-30:]) > 2, "the raised limit was never used"
        assert await metric(port, "formcraftd_concurrency_limit{") == 6
        write_config(config_file, names, port=port, concurrency=1)
        process.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)  # the jobs started under the old limit finish (50 ms each)
        lowered_from = len(seen)
        await receiver.wait_for(240, timeout=60)
        assert max(seen[lowered_from:]) == 1
        assert await metric(port, 'formcraftd_config_reloads_total{result="success"}') == 2
        process.send_signal(signal.SIGTERM)
        assert await wait_exit(process, 20) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    got = [request.headers["webhook-id"] for request in receiver.requests]
    assert len(got) == 240
    assert set(got) == {webhook_id(job_id, receiver.url) for job_id in ids}


async def test_invalid_config_on_sighup_keeps_the_running_config(
    tmp_path: Path, names: Names, amqp: Broker
) -> None:
    """A broken file on SIGHUP changes nothing: still healthy, failure counted and logged."""
    cfg = make_config(names)
    amqp.track(cfg)
    port = free_port()
    config_file = write_config(tmp_path / "config.toml", names, port=port, concurrency=3)
    log_file = tmp_path / "daemon.log"
    process = spawn("run", "--config", str(config_file), log=log_file)
    try:
        await wait_healthy(port)
        config_file.write_text("[workers.webhook]\nconcurrency = 'many'\n")
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while await metric(port, 'formcraftd_config_reloads_total{result="failure"}') != 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        status, health = await call("GET", f"http://127.0.0.1:{port}/healthz")
        assert status == 200
        assert health["queues"][cfg.workers.webhook.queue]["concurrency"] == 3
        assert health["last_reload"]["result"] == "failure"
        assert "workers.webhook.concurrency" in health["last_reload"]["error"]
        process.send_signal(signal.SIGTERM)
        assert await wait_exit(process, 20) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    errors = [line for line in log_file.read_text().splitlines() if '"level":"error"' in line]
    assert len(errors) == 1
    assert "keeping the running config" in errors[0]


async def test_admin_api_needs_the_bearer_token(
    names: Names, amqp: Broker, start_daemon: DaemonFactory
) -> None:
    """401 without a token, 403 with a wrong one, 200 with the right one."""
    daemon = await start_daemon(make_config(names, http={"admin_token": TOKEN}))
    url = f"{base_url(daemon)}/admin/status"
    assert (await call("GET", url, token=None))[0] == 401
    assert (await call("GET", url, token="wrong"))[0] == 403
    status, body = await call("GET", url)
    assert status == 200
    assert TOKEN not in json.dumps(body)
    assert (await call("GET", f"{base_url(daemon)}/healthz", token=None))[0] == 200


async def test_admin_api_is_disabled_without_a_configured_token(
    names: Names, amqp: Broker, start_daemon: DaemonFactory
) -> None:
    """With no admin_token configured every admin endpoint answers 403."""
    daemon = await start_daemon(make_config(names))
    status, body = await call("POST", f"{base_url(daemon)}/admin/reload", token="")
    assert status == 403
    assert "admin_token" in body["error"]


async def test_admin_errors_are_json_bodies(
    names: Names, amqp: Broker, start_daemon: DaemonFactory
) -> None:
    """A wrong method, an unknown route or a bad query under /admin answers JSON, Allow kept."""
    cfg = make_config(names, http={"admin_token": TOKEN})
    daemon = await start_daemon(cfg)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        aiohttp.ClientSession(headers=headers) as session,
        session.get(f"{base_url(daemon)}/admin/reload") as response,
    ):
        assert response.status == 405
        assert response.headers["Allow"] == "POST"
        assert await response.json() == {
            "error": "GET is not allowed on /admin/reload; allowed: POST"
        }
    status, body = await call("GET", f"{base_url(daemon)}/admin/nope")
    assert (status, body) == (404, {"error": "no admin endpoint /admin/nope"})
    queue = cfg.workers.webhook.queue
    status, body = await call("GET", f"{base_url(daemon)}/admin/dlq/{queue}?limit=x")
    assert (status, body) == (400, {"error": "limit must be a whole number"})
    assert (await call("GET", f"{base_url(daemon)}/admin/nope", token=None))[0] == 401


async def test_a_dead_letter_queue_name_for_a_queue_gets_a_hint(
    names: Names, amqp: Broker, start_daemon: DaemonFactory
) -> None:
    """/admin/dlq/dlq.<queue> is 404 saying to use the main queue's name."""
    cfg = make_config(names, http={"admin_token": TOKEN})
    daemon = await start_daemon(cfg)
    queue = cfg.workers.webhook.queue
    status, body = await call("GET", f"{base_url(daemon)}/admin/dlq/dlq.{queue}")
    assert status == 404
    assert body["error"].endswith(f"; use the main queue name: {queue}")


async def test_dlq_peek_masks_secrets_and_replay_redelivers_with_tries_reset(
    names: Names, amqp: Broker, receiver_factory: ReceiverFactory, start_daemon: DaemonFactory
) -> None:
    """A dead letter is listed without its secret, replayed, and then delivered."""
    receiver = await receiver_factory()
    receiver.behaviour = answering(410)
    cfg = make_config(names, http={"admin_token": TOKEN})
    daemon = await start_daemon(cfg)
    queue = cfg.workers.webhook.queue
    job_id = await amqp.publish(
        queue,
        webhook_job(receiver.url, secret=SECRET, headers={"Authorization": "Bearer abc123xyz"}),
    )
    await receiver.wait_for(1)
    await _until_depth(amqp, f"dlq.{queue}", 1)
    status, peeked = await call("GET", f"{base_url(daemon)}/admin/dlq/{queue}?limit=5")
    assert status == 200
    [letter] = peeked["dead_letters"]
    assert letter["job_id"] == job_id
    assert letter["headers"]["x-formcraft-error-code"] == "HTTP_STATUS"
    assert SECRET not in json.dumps(peeked)
    assert "abc123xyz" not in json.dumps(peeked)
    assert await amqp.depth(f"dlq.{queue}") == 1  # peeking leaves it there
    receiver.behaviour = _ok
    replay = f"{base_url(daemon)}/admin/dlq/{queue}/replay"
    status, nothing = await call("POST", f"{replay}?error_code=TIMEOUT")
    assert (status, nothing["replayed"], nothing["scanned"]) == (200, 0, 1)
    status, dry = await call("POST", f"{replay}?host=127.0.0.1&since=1h&dry_run=1")
    assert (status, dry["replayed"], dry["dry_run"]) == (200, 0, True)
    assert [letter["job_id"] for letter in dry["would_replay"]] == [job_id]
    assert SECRET not in json.dumps(dry)
    status, bad = await call("POST", f"{replay}?since=someday")
    assert status == 400 and "not a time" in bad["error"]
    status, replayed = await call("POST", f"{replay}?form_id=form-1&error_code=HTTP_STATUS")
    assert (status, replayed["replayed"]) == (200, 1)
    await receiver.wait_for(2)
    assert receiver.requests[1].headers["webhook-id"] == webhook_id(job_id, receiver.url)
    await _until_depth(amqp, f"dlq.{queue}", 0)


async def test_dlq_command_lists_replays_and_purges(
    tmp_path: Path,
    names: Names,
    amqp: Broker,
    receiver_factory: ReceiverFactory,
    start_daemon: DaemonFactory,
) -> None:
    """`formcraftd dlq list|replay|purge` work over AMQP without the admin API."""

    receiver = await receiver_factory(answering(404))
    cfg = make_config(names)
    await start_daemon(cfg)
    queue = cfg.workers.webhook.queue
    for i in range(3):
        await amqp.publish(queue, webhook_job(receiver.url, secret=SECRET, submission_id=str(i)))
    await _until_depth(amqp, f"dlq.{queue}", 3)
    config_file = write_config(tmp_path / "config.toml", names, port=free_port())
    listed = await asyncio.to_thread(run_cli, "dlq", "list", queue, "--config", str(config_file))
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)) == 3
    assert SECRET not in listed.stdout
    replay = await asyncio.to_thread(
        run_cli, "dlq", "replay", queue, "--limit", "1", "--config", str(config_file)
    )
    assert json.loads(replay.stdout)["replayed"] == 1
    await receiver.wait_for(4)
    await _until_depth(amqp, f"dlq.{queue}", 3)  # the replayed one failed again
    purge = await asyncio.to_thread(
        run_cli, "dlq", "purge", queue, "--yes", "--config", str(config_file)
    )
    assert json.loads(purge.stdout)["purged"] == 3
    assert await amqp.depth(f"dlq.{queue}") == 0
    unknown = await asyncio.to_thread(run_cli, "dlq", "list", "nope", "--config", str(config_file))
    assert unknown.returncode == 1
    a_dlq = await asyncio.to_thread(
        run_cli, "dlq", "list", f"dlq.{queue}", "--config", str(config_file)
    )
    assert a_dlq.returncode == 1
    assert a_dlq.stderr.endswith(f"; use the main queue name: {queue}\n")


async def test_dlq_purge_asks_first_and_refuses_without_a_terminal(
    tmp_path: Path,
    names: Names,
    amqp: Broker,
    receiver_factory: ReceiverFactory,
    start_daemon: DaemonFactory,
) -> None:
    """`dlq purge` without --yes: exit 2 when stdin is no terminal, else it asks for the name."""

    receiver = await receiver_factory(answering(404))
    cfg = make_config(names)
    await start_daemon(cfg)
    queue = cfg.workers.webhook.queue
    await amqp.publish(queue, webhook_job(receiver.url))
    await _until_depth(amqp, f"dlq.{queue}", 1)
    config_file = str(write_config(tmp_path / "config.toml", names, port=free_port()))
    refused = await asyncio.to_thread(run_cli, "dlq", "purge", queue, "--config", config_file)
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "--yes" in refused.stderr
    declined = await asyncio.to_thread(
        run_cli_on_terminal, "dlq", "purge", queue, "--config", config_file, answer="n"
    )
    assert declined.returncode == 1, declined.stderr
    assert declined.stderr.endswith("formcraftd: nothing purged\n")
    assert await amqp.depth(f"dlq.{queue}") == 1
    confirmed = await asyncio.to_thread(
        run_cli_on_terminal, "dlq", "purge", queue, "--config", config_file, answer=queue
    )
    assert confirmed.returncode == 0, confirmed.stderr
    assert json.loads(confirmed.stdout)["purged"] == 1
    assert await amqp.depth(f"dlq.{queue}") == 0


async def test_pause_and_resume_a_queue(
    names: Names, amqp: Broker, receiver_factory: ReceiverFactory, start_daemon: DaemonFactory
) -> None:
    """A paused queue keeps its messages until resumed; unknown queues are 404."""
    receiver = await receiver_factory()
    cfg = make_config(names, http={"admin_token": TOKEN})
    daemon = await start_daemon(cfg)
    queue = cfg.workers.webhook.queue
    status, body = await call("POST", f"{base_url(daemon)}/admin/queues/{queue}/pause")
    assert (status, body["state"]) == (200, "paused")
    await amqp.publish(queue, webhook_job(receiver.url))
    await asyncio.sleep(0.5)
    assert receiver.requests == []
    assert await amqp.depth(queue) == 1
    status, body = await call("POST", f"{base_url(daemon)}/admin/queues/{queue}/resume")
    assert (status, body["state"]) == (200, "consuming")
    await receiver.wait_for(1)
    assert (await call("POST", f"{base_url(daemon)}/admin/queues/nope/pause"))[0] == 404


async def test_breaker_reset_closes_an_open_breaker(
    names: Names, amqp: Broker, receiver_factory: ReceiverFactory, start_daemon: DaemonFactory
) -> None:
    """POST /admin/breakers/{key}/reset closes it; an unknown key is 404."""
    receiver = await receiver_factory(answering(503))
    cfg = make_config(
        names,
        http={"admin_token": TOKEN},
        retry={"attempts": 1},
        breaker={"failure_threshold": 1, "reset_timeout_ms": 60000},
    )
    daemon = await start_daemon(cfg)
    await amqp.publish(cfg.workers.webhook.queue, webhook_job(receiver.url))
    await _until_depth(amqp, f"dlq.{cfg.workers.webhook.queue}", 1)
    key = f"webhook:127.0.0.1:{receiver.port}"
    assert daemon.breakers.snapshot()[key] == "open"
    status, _ = await call("POST", f"{base_url(daemon)}/admin/breakers/{key}/reset")
    assert status == 200
    assert daemon.breakers.snapshot()[key] == "closed"
    assert (await call("POST", f"{base_url(daemon)}/admin/breakers/webhook:x:1/reset"))[0] == 404


async def test_readyz_turns_503_while_draining(
    names: Names, amqp: Broker, receiver_factory: ReceiverFactory, start_daemon: DaemonFactory
) -> None:
    """During a graceful shutdown /readyz answers 503 'draining' while jobs finish."""
    receiver = await receiver_factory(paced(1.5))
    cfg = make_config(names)
    daemon = await start_daemon(cfg)
    url = f"{base_url(daemon)}/readyz"
    assert (await call("GET", url))[0] == 200
    await amqp.publish(cfg.workers.webhook.queue, webhook_job(receiver.url))
    await receiver.wait_for(1)
    daemon.request_shutdown()
    status, body = await call("GET", url)
    assert (status, body["status"]) == (503, "draining")


async def _ok(_request: web.Request, _n: int) -> web.StreamResponse:
    return web.Response(status=200)


async def _until_depth(amqp: Broker, queue: str, depth: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while (current := await amqp.depth(queue)) != depth:
        assert time.monotonic() < deadline, f"{queue} holds {current}, expected {depth}"
        await asyncio.sleep(0.05)


class AlertSink:
    """Collects the JSON alerts the daemon POSTs."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    async def __call__(self, request: web.Request, _n: int) -> web.StreamResponse:
        self.events.append(await request.json())
        return web.Response(status=204)

    async def wait(self, alert_prefix: str, state: str, timeout: float = 15) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event["alert"].startswith(alert_prefix) and event["state"] == state:
                    return event
            assert time.monotonic() < deadline, f"no {state} alert {alert_prefix}: {self.events}"
            await asyncio.sleep(0.05)


async def test_each_alert_is_raised_and_cleared(
    names: Names, amqp: Broker, receiver_factory: ReceiverFactory, start_daemon: DaemonFactory
) -> None:
    """Queue size, error rate, processing delay and broker loss each raise then clear."""
    sink = AlertSink()
    sink_receiver = await receiver_factory(sink)
    receiver = await receiver_factory(_ok)
    cfg = make_config(
        names,
        http={"admin_token": TOKEN},
        retry={"attempts": 1},
        breaker={"failure_threshold": 1000},
        monitoring={
            "enabled": True,
            "interval_ms": 200,
            "queue_size_threshold": 5,
            "error_rate_threshold": 0.5,
            "processing_delay_threshold_ms": 400,
            "alert_webhook_url": sink_receiver.url,
        },
    )
    daemon = await start_daemon(cfg)
    queue = cfg.workers.webhook.queue
    base = base_url(daemon)

    await call("POST", f"{base}/admin/queues/{queue}/pause")
    for i in range(8):
        await amqp.publish(queue, webhook_job(receiver.url, submission_id=str(i)))
    raised = await sink.wait(f"queue_size:{queue}", "raised")
    assert "8 ready messages" in raised["detail"]
    assert daemon.metrics.alert_active.labels(f"queue_size:{queue}")._value.get() == 1
    await call("POST", f"{base}/admin/queues/{queue}/resume")
    await sink.wait(f"queue_size:{queue}", "cleared")

    async def failing(_request: web.Request, _n: int) -> web.StreamResponse:
        return web.Response(status=400)

    receiver.behaviour = failing
    for i in range(12):
        await amqp.publish(queue, webhook_job(receiver.url, submission_id=f"e{i}"))
    await sink.wait(f"error_rate:{queue}", "raised")
    await sink.wait(f"error_rate:{queue}", "cleared")

    receiver.behaviour = paced(1.2)
    await amqp.publish(queue, webhook_job(receiver.url, submission_id="slow"))
    await sink.wait(f"processing_delay:{queue}", "raised")
    await sink.wait(f"processing_delay:{queue}", "cleared")

    try:
        await rabbitmqctl.close_connections("alert test")
        await sink.wait("broker_disconnected", "raised")
        await sink.wait("broker_disconnected", "cleared", timeout=30)
    finally:
        await amqp.connection.connected.wait()
    _, status = await call("GET", f"{base}/admin/status")
    assert status["alerts"] == []


async def test_a_reload_that_fails_anywhere_changes_nothing(
    tmp_path: Path,
    names: Names,
    amqp: Broker,
    receiver_factory: ReceiverFactory,
    start_daemon: DaemonFactory,
) -> None:
    """A new webhook policy next to a bad email sender: neither is applied."""
    receiver = await receiver_factory()
    email = {"enabled": True, "state_dir": str(tmp_path)}
    cfg = make_config(names, email=email)
    daemon = await start_daemon(cfg)
    bad = make_config(
        names, webhook={"allowed_networks": []}, email={**email, "from_address": "not one"}
    )
    with pytest.raises(ConfigError, match="from_address"):
        await daemon.apply_config(bad)
    assert daemon.config is cfg
    await amqp.publish(cfg.workers.webhook.queue, webhook_job(receiver.url))
    await receiver.wait_for(1)  # the running policy still allows the loopback receiver
