"""Latency at a steady load: publish to receipt, p50/p90/p99/max, formcraftd and the bare consumer.

Jobs are published at a steady rate (by default half of formcraftd's peak,
measured first with a short drain unless `--rate` is given), each carrying
its publish time (`time.time()`, taken just before the publish) in the
webhook body. The receiver (this script with `--serve`, in its own process)
notes the arrival time of each request; both clocks are the same machine's
wall clock. The first `--warmup` seconds are not counted (connection pools,
the daemon's first jobs). The consumers are the same as in
webhook_throughput.py (formcraftd with every feature on, and the bare
aio-pika consumer; `--only` may name the other variants there), rotated
when `--rounds` > 1; figures are medians.

    python bench/latency.py [--rate JOBS_PER_S] [--seconds 10] [--warmup 2] [--rounds 1]
        [--concurrency 64] [--only formcraftd,bare] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from typing import Any

import aiormq
import orjson
import uvloop
from pamqp import commands as spec
from webhook_throughput import (
    AMQP_URL,
    CONTENDERS,
    RECONNECTED,
    RECONNECTS,
    SLOW_STOPS,
    Contender,
    Settings,
    Stage,
    bare_command,
    bare_round,
    formcraftd_round,
    job_body,
    rotations,
    run_and_report,
    scrape_metrics,
    start_formcraftd,
    start_process,
    stop_process,
    wait_consumer,
)
from webhook_throughput import Receiver as CountingReceiver

PERCENTILES = (50, 90, 99, 99.9)
KEYS = [f"p{p:g}" for p in PERCENTILES] + ["max"]


# --- the receiver (`latency.py --serve PORT`) ---------------------------------------------


def serve(port: int) -> None:
    """Answer 200 to every POST and keep (publish time, latency) for each."""
    from aiohttp import web  # noqa: PLC0415

    samples: list[tuple[float, float]] = []

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        arrived = time.time()
        sent = orjson.loads(body)["t"]
        samples.append((sent, arrived - sent))
        return web.Response(text="ok")

    async def get_samples(_request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(samples), content_type="application/json")

    async def count(_request: web.Request) -> web.Response:
        return web.Response(text=str(len(samples)))

    async def reset(_request: web.Request) -> web.Response:
        samples.clear()
        return web.Response(text="0")

    app = web.Application()
    app.router.add_post("/hook", hook)
    app.router.add_get("/samples", get_samples)
    app.router.add_get("/count", count)
    app.router.add_post("/reset", reset)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


class TimingReceiver(CountingReceiver):
    """The `--serve` receiver in its own process."""

    def command(self) -> list[str]:
        return [sys.executable, __file__, "--serve", str(self.port)]

    async def samples(self) -> list[tuple[float, float]]:
        assert self._session is not None
        async with self._session.get(f"http://127.0.0.1:{self.port}/samples") as response:
            return [tuple(pair) for pair in orjson.loads(await response.read())]


# --- the load -------------------------------------------------------------------------


async def publish_steadily(queue: str, url: str, rate: float, seconds: float) -> float:
    """Publish `rate` jobs a second for `seconds`, each stamped with its publish time.

    No publisher confirms (the pace must not wait for the broker), and plain
    aiormq rather than aio-pika: the publisher shares the two cores with the
    consumer, the broker and the receiver, so it should cost as little as it
    can. Returns the wall-clock time the publishing started.
    """
    total = round(rate * seconds)
    connection = await aiormq.connect(AMQP_URL)
    try:
        channel = await connection.channel(publisher_confirms=False)
        loop = asyncio.get_running_loop()
        started, wall = loop.time(), time.time()
        sent = 0
        while sent < total:
            due = min(total, int((loop.time() - started) * rate) + 1)
            while sent < due:
                body = job_body(url, sent, {"n": sent, "t": time.time()})
                properties = spec.Basic.Properties(
                    delivery_mode=2, message_id=uuid.uuid4().hex, content_type="application/json"
                )
                await channel.basic_publish(body, routing_key=queue, properties=properties)
                sent += 1
            await asyncio.sleep(max(0.0, started + sent / rate - loop.time()))
        return wall
    finally:
        await connection.close()


def percentiles(latencies: list[float]) -> dict[str, float]:
    """p50/p90/p99/p99.9 and max, in milliseconds."""
    ordered = sorted(latencies)
    result = {}
    for p in PERCENTILES:
        index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))
        result[f"p{p:g}"] = ordered[index] * 1000
    result["max"] = ordered[-1] * 1000
    return result


async def one_round(
    contender: Contender, args: argparse.Namespace, receiver: TimingReceiver
) -> dict[str, float]:
    async with Stage(args.concurrency, contender.features) as stage:
        await receiver.reset()
        if contender.run is bare_round:
            process = start_process(bare_command(stage.queue, args.concurrency))
        else:
            process = start_formcraftd(stage, contender.source)
        try:
            await wait_consumer(stage.queue, process)
            total = round(args.rate * (args.warmup + args.seconds))
            begun = time.monotonic()
            wall = await publish_steadily(
                stage.queue, receiver.url, args.rate, args.warmup + args.seconds
            )
            achieved = total / (time.monotonic() - begun)
            await receiver.drain(total, timeout=60 + args.seconds)
            samples = await receiver.samples()
            reconnects = (await scrape_metrics(stage.http_port)).get(RECONNECTS)
            if reconnects and contender.run is not bare_round:
                print(f"    (the broker connection was lost {reconnects:.0f} time(s))")
                RECONNECTED.append(f"{contender.name}: {reconnects:.0f}")
        finally:
            stop_process(process)
    counted = [latency for sent, latency in samples if sent >= wall + args.warmup]
    figures = percentiles(counted)
    figures["jobs"] = len(counted)
    figures["published_per_s"] = achieved
    return figures


async def peak_rate(args: argparse.Namespace) -> float:
    """formcraftd's drain rate on a short run (when no --rate is given)."""
    async with CountingReceiver() as receiver:
        drain = await formcraftd_round(Settings(5000, args.concurrency), receiver)
    return drain.rate


async def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.rate is None:
        peak = await peak_rate(args)
        args.rate = round(peak / 2)
        print(f"  formcraftd peak {peak:.0f} jobs/s; publishing at {args.rate} jobs/s")
    contenders = [CONTENDERS[name] for name in args.only.split(",")]
    rounds: dict[str, list[dict[str, float]]] = {c.name: [] for c in contenders}
    async with TimingReceiver() as receiver:
        for number, order in enumerate(rotations(contenders, args.rounds), start=1):
            for contender in order:
                figures = await one_round(contender, args, receiver)
                rounds[contender.name].append(figures)
                print(
                    f"  round {number}: {contender.name:24} "
                    + " ".join(f"{k} {figures[k]:.1f}" for k in KEYS)
                    + f" ms ({figures['jobs']:.0f} jobs, published at "
                    f"{figures['published_per_s']:.0f}/s)",
                    flush=True,
                )
    medians = {
        kind: {key: statistics.median(r[key] for r in results) for key in results[0]}
        for kind, results in rounds.items()
    }
    return {
        "rate": args.rate,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "concurrency": args.concurrency,
        "results": rounds,
        "medians": medians,
        "slow_stops": SLOW_STOPS,
        "reconnected": RECONNECTED,
    }


def report(result: dict[str, Any]) -> None:
    print(
        f"\nlatency, publish to receipt: {result['rate']} jobs/s for {result['seconds']} s "
        f"(after {result['warmup']} s warm-up), concurrency {result['concurrency']}, "
        f"median of {result['rounds']} round(s)"
    )
    print(f"{'consumer':24} " + " ".join(f"{k + ' ms':>9}" for k in KEYS))
    for name, figures in result["medians"].items():
        print(f"{name:24} " + " ".join(f"{figures[k]:9.1f}" for k in KEYS))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rate", type=float, help="jobs per second (default: half the peak)")
    parser.add_argument("--seconds", type=float, default=10, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2, help="seconds not counted")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--only",
        default="formcraftd,bare",
        help="comma-separated, among " + ", ".join(name for name in CONTENDERS if name != "celery"),
    )
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    for name in args.only.split(","):
        if name not in CONTENDERS or name == "celery":
            parser.error(f"--only: unknown contender {name!r}")
    return args


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        serve(int(sys.argv[2]))
        return
    run_and_report(parse_args(), run, report)


if __name__ == "__main__":
    main()
