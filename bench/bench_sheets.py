"""Benchmark: the Sheets worker against the fake Google, with and without batching.

    .venv/bin/python bench/bench_sheets.py [--n 500] [--latency-ms 50] [--window-ms 200]

For each case it declares unique queues on the local RabbitMQ, publishes N
one-row `sheets.update` jobs of one user, spread over `--sheets` spreadsheets
(default 1), starts the
daemon in this process against the fake Google of `tests/fake_google.py` (a
real HTTP server on loopback that answers each call after `--latency-ms`), and
times until every row is written and every job acked. It prints the Sheets API
calls per 100 jobs and the jobs per second, then deletes the queues.

The rate limits are set high by default so that the figures show the worker's
own throughput; with Google's default quota (60 requests a minute per user)
the unbatched case could not do more than one job a second per user.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from formcraftd.amqp.connection import Broker
from formcraftd.amqp.topology import WorkerTopology
from formcraftd.amqp.topology import delete_topology as delete_declared
from formcraftd.core import config
from formcraftd.daemon import Daemon
from tests.support.google import FakeGoogle, sheets_job_body

AMQP_URL = os.environ.get("FORMCRAFTD_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
RANGE = "Sheet1!A:C"


@dataclass(frozen=True)
class Result:
    label: str
    jobs: int
    calls: int
    seconds: float

    def line(self) -> str:
        per_100 = self.calls * 100 / self.jobs
        rate = self.jobs / self.seconds
        return (
            f"{self.label:<28} {self.jobs:>6} jobs  {self.calls:>6} API calls  "
            f"{per_100:>7.1f} calls/100 jobs  {rate:>8.1f} jobs/s  ({self.seconds:.2f} s)"
        )


def bench_config(fake: FakeGoogle, args: argparse.Namespace, window_ms: int) -> config.Config:
    prefix = f"fcbench.{uuid.uuid4().hex[:10]}"
    workers: dict[str, Any] = {
        kind: {
            "enabled": False,
            "queue": f"{prefix}.{kind}_tasks",
            "dead_letter_exchange": f"{prefix}.dlx.{kind}",
        }
        for kind in config.WORKER_KINDS
    }
    workers["sheets"].update(
        fake.sheets_config(
            concurrency=args.concurrency,
            batch_window_ms=window_ms,
            batch_max_rows=args.max_rows,
            requests_per_minute_per_user=args.rpm_user,
            requests_per_minute=args.rpm,
        )
    )
    doc = {
        "broker": {"url": AMQP_URL, "connect_timeout_s": 10},
        "http": {"host": "127.0.0.1", "port": 0},
        "monitoring": {"enabled": False},
        "logging": {"level": "warning"},
        "workers": workers,
    }
    return config.parse_document(doc, source="bench", environ={})


async def declare_and_publish(
    cfg: config.Config,
    connection: aio_pika.abc.AbstractRobustConnection,
    topology: WorkerTopology,
    bodies: list[bytes],
) -> None:
    """Declare the worker's queues the daemon's way and fill the main queue."""
    broker = Broker(cfg.broker)
    await broker.connect()
    try:
        await broker.declare(topology)
    finally:
        await broker.aclose()
    channel = await connection.channel(publisher_confirms=True)
    try:
        for index, body in enumerate(bodies):
            await channel.default_exchange.publish(
                aio_pika.Message(body, message_id=f"bench-{index}"),
                routing_key=topology.main.name,
            )
    finally:
        await channel.close()


async def delete_topology(
    connection: aio_pika.abc.AbstractRobustConnection, topology: WorkerTopology
) -> None:
    channel = await connection.channel()
    try:
        await delete_declared(channel, topology)
    finally:
        await channel.close()


async def run_case(label: str, window_ms: int, args: argparse.Namespace) -> Result:
    fake = await FakeGoogle().start()
    fake.latency_s = args.latency_ms / 1000
    sheets = [f"bench-sheet-{index}" for index in range(args.sheets)]
    for sheet in sheets:
        fake.add_spreadsheet(sheet)
    refresh, access, expiry = fake.add_user()
    cfg = bench_config(fake, args, window_ms)
    topology = WorkerTopology.build(cfg.workers.sheets, cfg.broker)
    bodies = [
        sheets_job_body(
            refresh_token=refresh,
            access_token=access,
            expiry_ms=expiry,
            spreadsheet_id=sheets[i % len(sheets)],
            values=[[f"row-{i}", i, "bench"]],
            submission_id=f"sub-{i}",
        )
        for i in range(args.n)
    ]
    connection = await aio_pika.connect_robust(AMQP_URL)
    try:
        await declare_and_publish(cfg, connection, topology, bodies)
        result = await time_daemon(label, cfg, fake, args.n)
        left = await queue_depth(connection, topology.main.name)
        if left:
            print(f"warning: {left} jobs still on {topology.main.name}", file=sys.stderr)
        return result
    finally:
        with contextlib.suppress(Exception):
            await delete_topology(connection, topology)
        await connection.close()
        await fake.stop()


async def queue_depth(connection: aio_pika.abc.AbstractRobustConnection, name: str) -> int:
    channel = await connection.channel()
    try:
        queue = await channel.declare_queue(name, passive=True)
        return queue.declaration_result.message_count or 0
    finally:
        await channel.close()


async def time_daemon(label: str, cfg: config.Config, fake: FakeGoogle, n: int) -> Result:
    """Start the daemon on the full queue and time until every row is written.

    The graceful shutdown that follows waits for the acks; the caller checks the
    queue is empty afterwards.
    """
    daemon = Daemon(cfg)
    task = asyncio.create_task(daemon.run())
    try:
        await asyncio.wait_for(daemon.started.wait(), timeout=30)
        started = time.monotonic()
        await fake.wait_for(lambda g: written(g) >= n, timeout=600)
        elapsed = time.monotonic() - started
    finally:
        daemon.request_shutdown()
        await asyncio.wait_for(task, timeout=60)
    return Result(label, n, len(fake.calls), elapsed)


def written(fake: FakeGoogle) -> int:
    return sum(len(ranges.get(RANGE, [])) for ranges in fake.spreadsheets.values())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=500, help="jobs per case (default 500)")
    parser.add_argument("--sheets", type=int, default=1, help="spreadsheets the jobs go to")
    parser.add_argument("--latency-ms", type=float, default=50, help="fake API latency")
    parser.add_argument("--window-ms", type=int, default=200, help="batch_window_ms when batching")
    parser.add_argument("--max-rows", type=int, default=500, help="batch_max_rows")
    parser.add_argument("--concurrency", type=int, default=2, help="workers.sheets.concurrency")
    parser.add_argument("--rpm-user", type=int, default=1_000_000, help="per-user rate limit")
    parser.add_argument("--rpm", type=int, default=1_000_000, help="per-process rate limit")
    return parser.parse_args(argv)


async def main(args: argparse.Namespace) -> None:
    print(
        f"Sheets worker, {args.n} one-row jobs for {args.sheets} sheet(s) of one user, "
        f"fake API latency "
        f"{args.latency_ms:g} ms, concurrency {args.concurrency}"
    )
    cases = [
        (f"batching (window {args.window_ms} ms)", args.window_ms),
        ("no batching (window 0 ms)", 0),
    ]
    for label, window_ms in cases:
        result = await run_case(label, window_ms, args)
        print(result.line(), flush=True)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
