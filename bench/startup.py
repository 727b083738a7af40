"""Start-up time: from exec of `python -m formcraftd run` to READY=1, with a reachable broker.

The script binds a unix datagram socket, sets NOTIFY_SOCKET to it (as
systemd does for a `Type=notify` unit) and times from just before the exec
to the arrival of the datagram holding READY=1, which the daemon sends once
every queue is consuming. The daemon is then stopped with SIGTERM. Each run
is one fresh process on the same, already declared queues (declaring again
is idempotent, and the first start of a real daemon usually finds its
topology there too). For scale, the same is timed for a bare interpreter
(`python -c pass`) and for importing the daemon's modules. Medians of `--runs`.

    python bench/startup.py [--runs 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from webhook_throughput import SLOW_STOPS, Stage, clean_env, run_and_report, stop_process

IMPORTS = "import formcraftd.cli, formcraftd.daemon, formcraftd.workers.webhook"


def time_ready(command: list[str], folder: Path, timeout: float = 30) -> float:
    """Seconds from exec to READY=1 on a fresh notify socket."""
    path = folder / "notify.sock"
    path.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        started = time.perf_counter()
        process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            env=clean_env(NOTIFY_SOCKET=str(path)),
        )
        try:
            deadline = started + timeout
            while (remaining := deadline - time.perf_counter()) > 0:
                ready, _, _ = select.select([sock], [], [], min(remaining, 0.5))
                if ready:
                    message = sock.recv(4096).decode(errors="replace")
                    if "READY=1" in message.split("\n"):
                        return time.perf_counter() - started
                elif process.poll() is not None:
                    raise RuntimeError(f"formcraftd exited with {process.returncode} before READY")
            raise TimeoutError(f"no READY=1 within {timeout:.0f} s")
        finally:
            stop_process(process)


def time_exit(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, env=clean_env(), stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


async def run(args: argparse.Namespace) -> dict[str, Any]:
    ready: list[float] = []
    interpreter: list[float] = []
    imports: list[float] = []
    async with Stage(64) as stage:
        with tempfile.TemporaryDirectory(prefix="fcbench-") as tmp:
            for number in range(args.runs):
                interpreter.append(time_exit([sys.executable, "-c", "pass"]))
                imports.append(time_exit([sys.executable, "-c", IMPORTS]))
                ready.append(time_ready(stage.command(), Path(tmp)))
                print(
                    f"  run {number + 1}: READY after {ready[-1]:.3f} s "
                    f"(python -c pass {interpreter[-1]:.3f} s, imports {imports[-1]:.3f} s)",
                    flush=True,
                )
    return {
        "runs": args.runs,
        "ready_s": ready,
        "median_ready_s": statistics.median(ready),
        "median_interpreter_s": statistics.median(interpreter),
        "median_imports_s": statistics.median(imports),
        "slow_stops": SLOW_STOPS,
    }


def report(result: dict[str, Any]) -> None:
    print(f"\nstart-up, median of {result['runs']} runs")
    print(f"  exec -> READY=1 (python -m formcraftd run)  {result['median_ready_s']:6.3f} s")
    print(f"  of which python -c pass                     {result['median_interpreter_s']:6.3f} s")
    print(f"  python -c '<the daemon's imports>'          {result['median_imports_s']:6.3f} s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", help="also write the results to this file")
    return parser.parse_args(argv)


def main() -> None:
    run_and_report(parse_args(), run, report)


if __name__ == "__main__":
    main()
