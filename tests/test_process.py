"""The daemon and the CLI as real processes: signals, exit codes, nothing lost."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from pathlib import Path

import pytest

from formcraftd.workers.webhook.signing import webhook_id
from tests.conftest import DaemonFactory, ReceiverFactory
from tests.support import Broker, Names, make_config, paced, webhook_job
from tests.support.process import free_port, run_cli, spawn, wait_exit, wait_healthy, write_config

pytestmark = [pytest.mark.e2e, pytest.mark.webhook]


async def test_sigterm_with_jobs_in_flight_loses_nothing(
    tmp_path: Path,
    names: Names,
    amqp: Broker,
    receiver_factory: ReceiverFactory,
    start_daemon: DaemonFactory,
) -> None:
    """SIGTERM drains in-flight jobs, exits 0, and a restart delivers every remaining job."""
    receiver = await receiver_factory(paced(0.4))
    cfg = make_config(names)
    amqp.track(cfg)
    port = free_port()
    config_file = write_config(tmp_path / "config.toml", names, port=port)
    process = spawn("run", "--config", str(config_file), log=tmp_path / "daemon.log")
    try:
        await wait_healthy(port)
        ids = [
            await amqp.publish(
                cfg.workers.webhook.queue, webhook_job(receiver.url, submission_id=str(i))
            )
            for i in range(20)
        ]
        await receiver.wait_for(4)
        process.send_signal(signal.SIGTERM)
        assert await wait_exit(process, 20) == 0, (tmp_path / "daemon.log").read_text()
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    delivered_before = len(receiver.requests)
    assert delivered_before < 20
    await start_daemon(cfg)
    await receiver.wait_for(20, timeout=30)
    wanted = {webhook_id(job_id, receiver.url) for job_id in ids}
    got = {request.headers["webhook-id"] for request in receiver.requests}
    assert wanted <= got
    assert await amqp.depth(f"dlq.{cfg.workers.webhook.queue}") == 0


async def test_second_signal_forces_a_prompt_exit_and_requeues(
    tmp_path: Path,
    names: Names,
    amqp: Broker,
    receiver_factory: ReceiverFactory,
) -> None:
    """A second SIGTERM stops waiting for slow jobs; they go back to the queue."""
    receiver = await receiver_factory(paced(30))
    cfg = make_config(names)
    amqp.track(cfg)
    port = free_port()
    config_file = write_config(
        tmp_path / "config.toml", names, port=port, concurrency=2, shutdown_timeout_s=25
    )
    process = spawn("run", "--config", str(config_file), log=tmp_path / "daemon.log")
    try:
        await wait_healthy(port)
        for i in range(2):
            await amqp.publish(
                cfg.workers.webhook.queue, webhook_job(receiver.url, submission_id=str(i))
            )
        await receiver.wait_for(2)
        process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        assert process.poll() is None  # still draining
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert await wait_exit(process, 10) == 0
        assert time.monotonic() - started < 5
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    deadline = time.monotonic() + 10
    while await amqp.depth(cfg.workers.webhook.queue) != 2:
        assert time.monotonic() < deadline, "jobs were not returned to the queue"
        await asyncio.sleep(0.1)


async def test_unreachable_broker_exits_3(tmp_path: Path, names: Names) -> None:
    """`run` gives up after connect_timeout_s with exit code 3 and one line."""
    config_file = write_config(
        tmp_path / "config.toml",
        names,
        port=free_port(),
        url="amqp://guest:guest@127.0.0.1:1/",
        connect_timeout_s=1,
    )
    process = spawn("run", "--config", str(config_file), log=tmp_path / "out.log")
    assert await wait_exit(process, 30) == 3
    output = (tmp_path / "out.log").read_text()
    assert "Traceback" not in output
    assert "not reachable" in output


async def test_a_busy_http_port_is_one_line_and_exit_1(
    tmp_path: Path, names: Names, amqp: Broker
) -> None:
    """`run` on a port another socket holds says so in one stderr line naming the address."""
    amqp.track(make_config(names))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = int(holder.getsockname()[1])
        config_file = write_config(tmp_path / "config.toml", names, port=port)
        result = await asyncio.to_thread(run_cli, "run", "--config", str(config_file))
    assert result.returncode == 1, result.stderr
    assert result.stderr == (
        f"formcraftd: cannot listen on 127.0.0.1:{port}: address already in use\n"
    )


def test_check_config_rejects_an_unknown_key_in_one_line(tmp_path: Path) -> None:
    """A typo in config.toml is exit 1 with one stderr line naming the key and file."""
    path = tmp_path / "config.toml"
    path.write_text("[workers.webhook]\nconcurency = 5\n")
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert "workers.webhook.concurency" in result.stderr
    assert str(path) in result.stderr


def test_check_config_prints_the_effective_config_with_secrets_masked(tmp_path: Path) -> None:
    """check-config prints JSON with env overrides applied and passwords masked."""
    path = tmp_path / "config.toml"
    path.write_text('[http]\nadmin_token = "hunter2-token"\n')
    result = run_cli(
        "check-config",
        "--config",
        str(path),
        env={
            "RABBITMQ_URL": "amqp://u:sup3rsecret@example.invalid:5672/",
            "WEBHOOK_WORKER_CONCURRENCY": "17",
        },
    )
    assert result.returncode == 0, result.stderr
    assert "sup3rsecret" not in result.stdout
    assert "hunter2-token" not in result.stdout
    assert '"concurrency": 17' in result.stdout


def test_schema_prints_the_job_json_schema() -> None:
    """`schema webhook` prints a JSON Schema naming the webhook.send discriminator."""
    result = run_cli("schema", "webhook")
    assert result.returncode == 0
    assert "webhook.send" in result.stdout


def test_usage_error_exits_2() -> None:
    """An unknown command is a usage error."""
    assert run_cli("frobnicate").returncode == 2


async def test_enqueue_publishes_a_validated_job(
    tmp_path: Path, names: Names, amqp: Broker
) -> None:
    """`enqueue` validates the file and publishes it to the webhook queue with confirms."""
    cfg = make_config(names)
    amqp.track(cfg)
    config_file = write_config(tmp_path / "config.toml", names, port=free_port())
    job = tmp_path / "job.json"
    job.write_bytes(webhook_job("https://example.invalid/hook"))
    result = await asyncio.to_thread(run_cli, "enqueue", str(job), "--config", str(config_file))
    assert result.returncode == 0, result.stderr
    assert await amqp.depth(cfg.workers.webhook.queue) == 1
    job.write_text('{"type": "webhook.send"}')
    bad = await asyncio.to_thread(run_cli, "enqueue", str(job), "--config", str(config_file))
    assert bad.returncode == 1
    assert "invalid job" in bad.stderr


async def test_enqueue_priority_sets_the_amqp_priority(
    tmp_path: Path, names: Names, amqp: Broker
) -> None:
    """`enqueue --priority 7` publishes the job with priority 7 to a queue that takes them."""
    cfg = make_config(names, webhook={"max_priority": 9})
    amqp.track(cfg)
    config_file = write_config(tmp_path / "config.toml", names, port=free_port(), max_priority=9)
    job = tmp_path / "job.json"
    job.write_bytes(webhook_job("https://example.invalid/hook"))
    args = ("enqueue", str(job), "--config", str(config_file))
    result = await asyncio.to_thread(run_cli, *args, "--priority", "7")
    assert result.returncode == 0, result.stderr
    [message] = await amqp.take(cfg.workers.webhook.queue, 1)
    assert message.priority == 7
    assert (await asyncio.to_thread(run_cli, *args, "--priority", "256")).returncode == 2


def test_enqueue_gives_up_after_its_timeout_in_one_line(tmp_path: Path, names: Names) -> None:
    """`enqueue --timeout 2` against a closed port exits 3 within the timeout, one stderr line."""
    config_file = write_config(
        tmp_path / "config.toml",
        names,
        port=free_port(),
        url=f"amqp://guest:guest@127.0.0.1:{free_port()}/",
        connect_timeout_s=30,
    )
    job = tmp_path / "job.json"
    job.write_bytes(webhook_job("https://example.invalid/hook"))
    started = time.monotonic()
    result = run_cli("enqueue", str(job), "--config", str(config_file), "--timeout", "2")
    assert time.monotonic() - started < 2 + 3  # the timeout, plus starting Python
    assert result.returncode == 3
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("formcraftd: broker not reachable")
    assert "guest:guest" not in result.stderr


def test_suppression_command_adds_lists_and_removes(tmp_path: Path) -> None:
    """`formcraftd suppression add|list|remove` manage the list in state_dir."""
    config_file = tmp_path / "config.toml"
    config_file.write_text(f'[workers.email]\nstate_dir = "{tmp_path / "state"}"\n')
    added = run_cli("suppression", "add", "Someone@Example.com", "--config", str(config_file))
    assert added.returncode == 0, added.stderr
    listed = run_cli("suppression", "list", "--config", str(config_file))
    assert "someone@example.com" in listed.stdout.lower()
    removed = run_cli("suppression", "remove", "someone@example.com", "--config", str(config_file))
    assert removed.returncode == 0, removed.stderr
    listed = run_cli("suppression", "list", "--config", str(config_file))
    assert "someone@example.com" not in listed.stdout.lower()
    bad = run_cli("suppression", "add", "not an address", "--config", str(config_file))
    assert bad.returncode == 1


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ('[workers.email]\nfrom_address = "not an address"\n', "from_address"),
        ("[retry]\nmax_delay_ms = 9223372036854775807\n", "retry.max_delay_ms"),
    ],
)
def test_check_config_refuses_what_run_refuses(tmp_path: Path, section: str, key: str) -> None:
    """check-config runs the same checks as run and a reload: one line naming the key."""
    path = tmp_path / "config.toml"
    path.write_text(section)
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and key in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_masks_secrets_in_urls(tmp_path: Path) -> None:
    """A hook token in the alert sink's path and a secret in the broker URL's query stay hidden."""
    path = tmp_path / "config.toml"
    path.write_text(
        '[broker]\nurl = "amqps://app:brokerpw@mq.example:5671/?auth=brokerquery"\n'
        '[monitoring]\nalert_webhook_url = "https://hooks.example/services/T0/B0/hooktoken"\n'
    )
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    for secret in ("brokerpw", "brokerquery", "hooktoken"):
        assert secret not in result.stdout
    assert "https://hooks.example/***" in result.stdout
