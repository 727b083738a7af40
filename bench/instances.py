"""One and two formcraftd processes on the same queue, side by side (docs/scaling.md).

One process uses one core. The systemd template `formcraftd@.service` runs N
of them on one VM, each with its own HTTP port (`FORMCRAFTD_HTTP_PORT`) and
one shared config. This measures what a second process brings: for each
round, N webhook jobs are queued, then one or two `python -m formcraftd run`
drain them into the receiver process on loopback; the rate is taken at the
receiver, and the CPU per job is the sum over the daemons. The bare aio-pika
consumer, one and two processes, runs in the same rotation for scale.

    python bench/instances.py [--jobs 10000] [--concurrency 64] [--rounds 3] [--json FILE]

The daemons run as shipped (delivery events off), with the rest of
webhook_throughput.py's features on. On a machine with few cores the broker,
the receiver and the daemons share them, so a second daemon gains only what
the others leave idle: read the CPU figures with the rates.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
from dataclasses import dataclass
from typing import Any

from webhook_throughput import (
    Drain,
    Features,
    Receiver,
    Stage,
    Tally,
    bare_command,
    cpu_seconds,
    free_port,
    publish_jobs,
    rotations,
    run_and_report,
    start_process,
    stop_process,
)

SHIPPED = Features(events=False)


@dataclass(frozen=True)
class Case:
    name: str
    processes: int
    daemon: bool  # formcraftd, else the bare consumer


CASES = (
    Case("formcraftd x1", 1, daemon=True),
    Case("formcraftd x2", 2, daemon=True),
    Case("bare aio-pika x1", 1, daemon=False),
    Case("bare aio-pika x2", 2, daemon=False),
)


def start(case: Case, stage: Stage, concurrency: int) -> list[subprocess.Popen[bytes]]:
    """The case's processes; the second daemon gets its port as the template unit gives it."""
    if not case.daemon:
        return [
            start_process(bare_command(stage.queue, concurrency)) for _ in range(case.processes)
        ]
    first = start_process(stage.command())
    others = [
        start_process(stage.command(), FORMCRAFTD_HTTP_PORT=str(free_port()))
        for _ in range(case.processes - 1)
    ]
    return [first, *others]


async def drain(receiver: Receiver, processes: list[subprocess.Popen[bytes]], jobs: int) -> Drain:
    """The receiver's rate, and the CPU per job summed over `processes`, first to last job.

    (Receiver.drain follows one process's CPU; here every process's counts, taken
    from the first request seen, as Receiver.drain takes its rate.)
    """
    while await receiver.count() == 0:  # noqa: ASYNC110 - the receiver is another process
        await asyncio.sleep(0.005)
    started = [cpu_seconds(p.pid) for p in processes]
    seen_first = await receiver.count()
    rate = (await receiver.drain(jobs, timeout=300)).rate
    spent = sum(cpu_seconds(p.pid) - s for p, s in zip(processes, started, strict=True))
    return Drain(rate, spent * 1e6 / max(jobs - seen_first, 1))


async def one_round(case: Case, receiver: Receiver, jobs: int, concurrency: int) -> Drain:
    async with Stage(concurrency, SHIPPED) as stage:
        await publish_jobs(stage.queue, jobs, receiver.url)
        await receiver.reset()
        processes = start(case, stage, concurrency)
        try:
            return await drain(receiver, processes, jobs)
        finally:
            for process in processes:
                stop_process(process)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tally = Tally((case.name for case in CASES), width=18)
    async with Receiver() as receiver:
        for number, order in enumerate(rotations(CASES, args.rounds), start=1):
            for case in order:
                tally.add(
                    number, case.name, await one_round(case, receiver, args.jobs, args.concurrency)
                )
    return tally.result(args)


def report(result: dict[str, Any]) -> None:
    medians, cpu = result["medians"], result["cpu_medians"]
    print(
        f"\nprocesses on one queue: {result['jobs']} jobs, concurrency {result['concurrency']} "
        f"each, median of {result['rounds']} rounds"
    )
    print(f"{'consumer':18} {'jobs/s':>8} {'vs x1':>7} {'CPU us/job':>11}  rounds (jobs/s)")
    for name, median in medians.items():
        single = medians[name.replace("x2", "x1")]
        rounds = " ".join(f"{rate:.0f}" for rate in result["rates"][name])
        print(f"{name:18} {median:8.0f} {median / single:6.2f}x {cpu[name]:11.0f}  {rounds}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    return parser.parse_args(argv)


def main() -> None:
    run_and_report(parse_args(), run, report)


if __name__ == "__main__":
    main()
