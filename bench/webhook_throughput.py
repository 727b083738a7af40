"""Webhook throughput: formcraftd against a bare aio-pika consumer, in one run.

For each round, N webhook jobs are queued on fresh queues, then one consumer
process drains them into a receiver process on loopback. The rate is measured
at the receiver, from its first request to its N-th, so start-up time does not
count. Rounds alternate formcraftd and the bare consumer (A/B); the table shows
medians.

    python bench/webhook_throughput.py [--jobs 10000] [--concurrency 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aio_pika
import aiohttp
import orjson

from formcraftd import config
from formcraftd.broker import Broker, WorkerTopology

HERE = Path(__file__).resolve().parent
AMQP_URL = os.environ.get("FORMCRAFTD_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bench_config(prefix: str, port: int, concurrency: int) -> str:
    lines = [
        "[broker]",
        f'url = "{AMQP_URL}"',
        "[http]",
        'host = "127.0.0.1"',
        f"port = {port}",
        "[logging]",
        'level = "info"',
        "[monitoring]",
        "enabled = false",
        "[workers.webhook]",
        f'queue = "{prefix}.webhook_tasks"',
        f'dead_letter_exchange = "{prefix}.dlx.webhook"',
        f"concurrency = {concurrency}",
        'allowed_networks = ["127.0.0.1/32"]',
    ]
    for kind in ("email", "sheets"):
        lines += [
            f"[workers.{kind}]",
            "enabled = false",
            f'queue = "{prefix}.{kind}_tasks"',
            f'dead_letter_exchange = "{prefix}.dlx.{kind}"',
        ]
    return "\n".join(lines) + "\n"


async def publish(queue: str, count: int, url: str) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel(publisher_confirms=True)
        for start in range(0, count, 500):
            await asyncio.gather(
                *(
                    channel.default_exchange.publish(
                        aio_pika.Message(
                            orjson.dumps(
                                {
                                    "type": "webhook.send",
                                    "payload": {
                                        "url": url,
                                        "method": "POST",
                                        "headers": {},
                                        "body": {"n": i, "answers": {"name": "Ada"}},
                                        "secret": "whsec_YmVuY2htYXJrLXNlY3JldA==",
                                    },
                                    "metadata": {"formId": "bench", "submissionId": str(i)},
                                }
                            ),
                            message_id=uuid.uuid4().hex,
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        ),
                        routing_key=queue,
                    )
                    for i in range(start, min(start + 500, count))
                )
            )
    finally:
        await connection.close()


async def receiver_count(session: aiohttp.ClientSession, port: int) -> int:
    async with session.get(f"http://127.0.0.1:{port}/count") as response:
        return int(await response.text())


async def measure(receiver_port: int, jobs: int, timeout: float) -> float:
    """Jobs per second at the receiver, first request to last."""
    async with aiohttp.ClientSession() as session:
        await session.post(f"http://127.0.0.1:{receiver_port}/reset")
        deadline = time.monotonic() + timeout
        first = None
        while True:
            count = await receiver_count(session, receiver_port)
            now = time.monotonic()
            if count and first is None:
                first = (now, count)
            if count >= jobs:
                break
            if now > deadline:
                raise TimeoutError(f"only {count} of {jobs} jobs arrived")
            await asyncio.sleep(0.01)
    assert first is not None
    return (jobs - first[1]) / max(now - first[0], 1e-9)


async def one_round(kind: str, args: argparse.Namespace, receiver_port: int) -> float:
    prefix = f"bench.{uuid.uuid4().hex[:8]}"
    text = bench_config(prefix, free_port(), args.concurrency)
    cfg = config.parse(text, source="bench", environ={})
    topology = WorkerTopology.build(cfg.workers.webhook, cfg.broker)
    broker = Broker(cfg.broker)
    await broker.connect()
    await broker.declare(topology)
    await publish(topology.main.name, args.jobs, f"http://127.0.0.1:{receiver_port}/hook")
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as file:
        file.write(text)
    if kind == "formcraftd":
        command = [sys.executable, "-m", "formcraftd", "run", "--config", file.name]
    else:
        command = [
            sys.executable,
            str(HERE / "bare_consumer.py"),
            AMQP_URL,
            topology.main.name,
            str(args.concurrency),
        ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        rate = await measure(receiver_port, args.jobs, timeout=300)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        os.unlink(file.name)
        channel = await broker.connection.channel()
        for spec in topology.queues():
            await channel.queue_delete(spec.name)
        await channel.exchange_delete(topology.dead_letter_exchange)
        await broker.aclose()
    return rate


async def main(args: argparse.Namespace) -> dict[str, list[float]]:
    receiver_port = free_port()
    receiver = subprocess.Popen([sys.executable, str(HERE / "receiver.py"), str(receiver_port)])
    results: dict[str, list[float]] = {"formcraftd": [], "bare aio-pika": []}
    try:
        await asyncio.sleep(1.0)
        for round_number in range(args.rounds):
            order = list(results) if round_number % 2 == 0 else list(reversed(results))
            for kind in order:
                rate = await one_round(kind, args, receiver_port)
                results[kind].append(rate)
                print(f"  round {round_number + 1}: {kind:14} {rate:8.0f} jobs/s", flush=True)
    finally:
        receiver.terminate()
        receiver.wait(timeout=10)
    return results


def report(results: dict[str, list[float]], args: argparse.Namespace) -> None:
    medians = {kind: statistics.median(rates) for kind, rates in results.items()}
    base = medians["bare aio-pika"]
    print(
        f"\nwebhook throughput: {args.jobs} jobs, concurrency {args.concurrency}, "
        f"median of {args.rounds} rounds"
    )
    print(f"{'consumer':16} {'jobs/s':>10} {'vs bare':>8}")
    for kind, median in medians.items():
        print(f"{kind:16} {median:10.0f} {median / base:8.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()
    report(asyncio.run(main(arguments)), arguments)
