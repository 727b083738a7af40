"""Memory while draining a long queue: formcraftd's peak RSS over 100,000 queued webhook jobs.

N jobs are queued first (two channels, batches of 1,000 publisher confirms
in flight), then `python -m formcraftd run` (concurrency 64, every feature
on) drains them into `receiver.py`. Every `--interval` seconds the script
reads VmRSS and VmHWM (the kernel's high-water mark, so a peak between two
samples is not missed) from /proc/<pid>/status. It prints the peak, the RSS
once consuming, and the RSS at 10 %, 50 % and 90 % of the drain: with a
bounded prefetch nothing should grow with the queue's length.

    python bench/memory.py [--jobs 100000] [--concurrency 64] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

from webhook_throughput import (
    EVENTS_DROPPED,
    RECONNECTS,
    SLOW_STOPS,
    Receiver,
    Stage,
    publish_jobs,
    run_and_report,
    scrape_metrics,
    start_process,
    stop_process,
    wait_consumer,
)


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of `pid` in KiB; (0, 0) once it is gone."""
    rss = hwm = 0
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    return rss, hwm


async def run(args: argparse.Namespace) -> dict[str, Any]:
    async with Receiver() as receiver, Stage(args.concurrency) as stage:
        started = time.monotonic()
        await publish_jobs(stage.queue, args.jobs, receiver.url)
        publish_s = time.monotonic() - started
        print(f"  queued {args.jobs} jobs in {publish_s:.1f} s", flush=True)
        await receiver.reset()
        process = start_process(stage.command())
        samples: list[tuple[float, int, int, int]] = []  # (t, delivered, rss, hwm)
        try:
            await wait_consumer(stage.queue, process, timeout=60)
            consuming_rss = memory_kib(process.pid)[0]
            drain_started = time.monotonic()
            deadline = drain_started + args.timeout
            while True:
                delivered = await receiver.count()
                rss, hwm = memory_kib(process.pid)
                samples.append((time.monotonic() - drain_started, delivered, rss, hwm))
                if delivered >= args.jobs:
                    break
                if process.poll() is not None:
                    raise RuntimeError(f"formcraftd exited with {process.returncode}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"only {delivered} of {args.jobs} jobs drained")
                await asyncio.sleep(args.interval)
            drain_s = time.monotonic() - drain_started
            final_rss, peak = memory_kib(process.pid)
            metrics = await scrape_metrics(stage.http_port)
        finally:
            stop_process(process)

    def rss_at(fraction: float) -> float:
        target = args.jobs * fraction
        return next(rss for _, delivered, rss, _ in samples if delivered >= target) / 1024

    return {
        "jobs": args.jobs,
        "concurrency": args.concurrency,
        "publish_s": publish_s,
        "drain_s": drain_s,
        "rate": args.jobs / drain_s,
        "peak_mib": max(peak, *(s[3] for s in samples)) / 1024,
        "consuming_mib": consuming_rss / 1024,
        "rss_at_10_mib": rss_at(0.10),
        "rss_at_50_mib": rss_at(0.50),
        "rss_at_90_mib": rss_at(0.90),
        "final_mib": final_rss / 1024,
        "samples": len(samples),
        "events_dropped": metrics.get(EVENTS_DROPPED),
        "reconnects": metrics.get(RECONNECTS),
        "reconnected": [f"formcraftd: {metrics[RECONNECTS]:.0f}"]
        if metrics.get(RECONNECTS)
        else [],
        "slow_stops": SLOW_STOPS,
    }


def report(result: dict[str, Any]) -> None:
    print(
        f"\nmemory: formcraftd draining {result['jobs']} queued jobs, concurrency "
        f"{result['concurrency']} ({result['drain_s']:.1f} s, {result['rate']:.0f} jobs/s)"
    )
    print(f"  peak RSS (VmHWM)       {result['peak_mib']:7.1f} MiB")
    print(f"  RSS once consuming     {result['consuming_mib']:7.1f} MiB")
    for point in ("10", "50", "90"):
        print(f"  RSS at {point:>2} % drained    {result[f'rss_at_{point}_mib']:7.1f} MiB")
    print(f"  RSS at the end         {result['final_mib']:7.1f} MiB")
    if result["events_dropped"] is not None:
        print(f"  delivery events dropped {result['events_dropped']:6.0f} of {result['jobs']}")
    if result["reconnects"]:
        print(f"  the broker connection was lost {result['reconnects']:.0f} time(s) during the run")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between samples")
    parser.add_argument("--timeout", type=float, default=600, help="give up after (s)")
    parser.add_argument("--json", help="also write the results to this file")
    return parser.parse_args(argv)


def main() -> None:
    run_and_report(parse_args(), run, report)


if __name__ == "__main__":
    main()
