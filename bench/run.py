"""Run every benchmark and print one table (`make bench`); a few minutes.

In order, each in its own process so that one failure does not stop the rest:

1. webhook_throughput.py: formcraftd (events off, on, on with tracing) vs the
   bare aio-pika consumer vs Celery, 10,000 jobs, concurrency 64, rounds
   rotated (A/B/C, B/C/A, C/A/B), medians;
2. latency.py: publish-to-receipt percentiles at half of formcraftd's peak
   from step 1, formcraftd and the bare consumer alternated, medians;
3. memory.py: formcraftd's peak RSS while draining 100,000 queued jobs;
4. startup.py: exec to READY=1, median of 5;
5. bench_email.py and bench_sheets.py with short settings;
6. instances.py: one and two formcraftd processes (and bare consumers) on one
   queue, as the systemd template runs them on one VM.

The combined table is printed at the end and written, with the machine and
the per-round figures, to bench/results/latest.md.

    python bench/run.py [--quick] [--rounds N]
        [--only throughput,latency,memory,startup,email,sheets,instances]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
STEPS = ("throughput", "latency", "memory", "startup", "email", "sheets", "instances")
MB = 1_000_000 / 1024 / 1024  # MiB per MB


@dataclass
class Row:
    benchmark: str
    case: str
    result: str
    target: str = ""
    met: str = ""


@dataclass
class Run:
    """What the steps found: table rows, details for latest.md, failures."""

    rows: list[Row] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    slow_stops: list[str] = field(default_factory=list)  # consumers killed after SIGTERM
    reconnected: list[str] = field(default_factory=list)  # rounds the broker disturbed
    data: dict[str, Any] = field(default_factory=dict)


# --- running one step -----------------------------------------------------------------


def run_script(name: str, argv: list[str], timeout: float) -> tuple[int, str, dict[str, Any]]:
    """Run bench/`name` with `argv` (+ --json for our own scripts); its output is shown live.

    Returns the exit status, the output and the JSON results (empty if none).
    """
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as file:
        json_path = Path(file.name)
    command = [sys.executable, "-u", str(HERE / name), *argv]
    if name not in ("bench_email.py", "bench_sheets.py"):
        command += ["--json", str(json_path)]
    print(f"\n$ {' '.join(command[1:])}", flush=True)
    lines: list[str] = []
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=HERE.parent
    )
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    for line in process.stdout:
        print(f"  | {line}", end="", flush=True)
        lines.append(line)
        if time.monotonic() > deadline:
            process.kill()
            lines.append(f"killed after {timeout:.0f} s\n")
            break
    status = process.wait()
    try:
        data = json.loads(json_path.read_text()) if json_path.stat().st_size else {}
    except (OSError, ValueError):
        data = {}
    json_path.unlink(missing_ok=True)
    return status, "".join(lines), data


def step(
    run: Run, title: str, name: str, argv: list[str], timeout: float
) -> tuple[str, dict[str, Any]] | None:
    status, output, data = run_script(name, argv, timeout)
    if status != 0:
        tail = " | ".join(output.strip().splitlines()[-3:])
        run.failures.append(f"{title}: {name} exited with {status}: {tail[-600:]}")
        run.rows.append(Row(title, f"`{name}`", f"failed (exit {status})"))
        return None
    for stuck in data.get("slow_stops", []):
        run.slow_stops.append(f"{title}: {stuck}")
    for lost in data.get("reconnected", []):
        run.reconnected.append(f"{title}: {lost}")
    return output, data


# --- the steps ------------------------------------------------------------------------


def throughput(run: Run, args: argparse.Namespace) -> None:
    argv = ["--jobs", str(args.jobs), "--rounds", str(args.rounds), "--concurrency", "64"]
    argv += [
        "--only",
        "formcraftd-noevents,formcraftd,formcraftd-batched,formcraftd-traced,bare,celery",
    ]
    found = step(run, "Webhook throughput", "webhook_throughput.py", argv, timeout=1200)
    if found is None:
        return
    _, data = found
    run.data["throughput"] = data
    medians, cpu, rates = data["medians"], data["cpu_medians"], data["rates"]
    fc, bare, celery = medians["formcraftd"], medians["bare aio-pika"], medians["celery"]
    shipped = medians["formcraftd, no events"]
    batched = medians["formcraftd, events batched"]
    traced = medians["formcraftd, traced 100 %"]
    jobs = f"{data['jobs']:,} queued jobs, concurrency 64, {_rounds(data['rounds'])}"
    run.rows += [
        Row(
            "Webhook throughput",
            "formcraftd, every feature on but the optional delivery events (off as shipped): "
            "validation, signing, SSRF guard, breakers, metrics, settled memory, "
            f"a JSON job line at info, monitoring; {jobs}",
            f"**{shipped:,.0f} jobs/s = {shipped / bare:.2f}x bare** "
            f"({cpu['formcraftd, no events']:.0f} µs CPU/job)",
            ">= 1.0x bare",
            _met(shipped / bare >= 1.0),
        ),
        Row(
            "",
            "formcraftd with delivery events on as well (a second message per job "
            "through the same broker and cores)",
            f"**{fc:,.0f} jobs/s = {fc / bare:.2f}x bare** ({cpu['formcraftd']:.0f} µs CPU/job)",
            ">= 0.9x bare",
            _met(fc / bare >= 0.9),
        ),
        Row(
            "",
            "formcraftd with delivery events on, batched (`events_per_message = 100`: "
            "JSON arrays of events, far fewer broker messages)",
            f"**{batched:,.0f} jobs/s = {batched / bare:.2f}x bare** "
            f"({cpu['formcraftd, events batched']:.0f} µs CPU/job)",
            ">= 0.9x bare",
            _met(batched / bare >= 0.9),
        ),
        Row(
            "",
            "formcraftd with delivery events and OpenTelemetry tracing on (every trace "
            "sampled, OTLP/HTTP to a collector on loopback)",
            f"{traced:,.0f} jobs/s = {traced / bare:.2f}x bare "
            f"({cpu['formcraftd, traced 100 %']:.0f} µs CPU/job)",
        ),
        Row(
            "",
            "bare aio-pika consumer: consume, POST, ack",
            f"{bare:,.0f} jobs/s ({cpu['bare aio-pika']:.0f} µs CPU/job)",
        ),
        Row(
            "",
            "Celery, threads pool x 64, a `requests` POST task",
            f"{celery:,.0f} jobs/s ({cpu['celery']:.0f} µs CPU/job); "
            f"**formcraftd {shipped / celery:.1f}x faster** ({fc / celery:.1f}x with events)",
            "formcraftd >= 4x",
            _met(shipped / celery >= 4),
        ),
    ]
    run.details.append(
        "Webhook throughput, jobs/s per round (rotated order):\n"
        + "\n".join(
            f"- {name}: " + ", ".join(f"{rate:,.0f}" for rate in values)
            for name, values in rates.items()
        )
    )


def latency(run: Run, args: argparse.Namespace) -> None:
    peak = run.data.get("throughput", {}).get("medians", {}).get("formcraftd")
    argv = ["--seconds", str(args.latency_seconds), "--rounds", str(args.latency_rounds)]
    if peak:
        argv += ["--rate", str(round(peak / 2))]
    found = step(run, "Latency", "latency.py", argv, timeout=600)
    if found is None:
        return
    _, data = found
    fc, bare = data["medians"]["formcraftd"], data["medians"]["bare aio-pika"]
    load = (
        f"{data['rate']:,.0f} jobs/s steady (half of formcraftd's peak) for "
        f"{data['seconds']:g} s, {_rounds(data['rounds'])}"
    )

    def figures(f: dict[str, float]) -> str:
        return (
            f"p50 {f['p50']:.1f} / p90 {f['p90']:.1f} / p99 {f['p99']:.1f} / max {f['max']:.0f} ms"
        )

    run.rows += [
        Row(
            "Latency, publish to receipt",
            f"formcraftd; {load}",
            f"**{figures(fc)}**",
            "p99 < 50 ms",
            _met(fc["p99"] < 50),
        ),
        Row("", "bare aio-pika consumer, same load", figures(bare)),
    ]
    run.details.append(
        "Latency per round (ms):\n"
        + "\n".join(
            f"- {name} round {n}: " + figures(r)
            for name, rounds in data["results"].items()
            for n, r in enumerate(rounds, start=1)
        )
    )


def memory(run: Run, args: argparse.Namespace) -> None:
    found = step(run, "Memory", "memory.py", ["--jobs", str(args.memory_jobs)], timeout=900)
    if found is None:
        return
    _, data = found
    peak_mb = data["peak_mib"] / MB
    run.rows.append(
        Row(
            "Memory",
            f"formcraftd draining {data['jobs']:,} queued jobs, concurrency 64",
            f"**peak RSS {data['peak_mib']:.1f} MiB ({peak_mb:.0f} MB)**; RSS at 10/50/90 % "
            f"drained: {data['rss_at_10_mib']:.0f}/{data['rss_at_50_mib']:.0f}/"
            f"{data['rss_at_90_mib']:.0f} MiB ({data['rate']:,.0f} jobs/s)",
            "< 120 MB",
            _met(peak_mb < 120),
        )
    )
    if data.get("events_dropped"):
        run.details.append(
            f"Memory run: formcraftd dropped {data['events_dropped']:,.0f} of its "
            f"{data['jobs']:,} delivery events (its event buffer was full: the events "
            "publisher did not keep up with the jobs)."
        )


def startup(run: Run, args: argparse.Namespace) -> None:
    found = step(run, "Start-up", "startup.py", ["--runs", str(args.startup_runs)], timeout=300)
    if found is None:
        return
    _, data = found
    run.rows.append(
        Row(
            "Start-up",
            f"exec of `python -m formcraftd run` to READY=1, median of {data['runs']}",
            f"**{data['median_ready_s']:.2f} s** (bare interpreter "
            f"{data['median_interpreter_s']:.2f} s, the daemon's imports "
            f"{data['median_imports_s']:.2f} s)",
            "< 1.5 s",
            _met(data["median_ready_s"] < 1.5),
        )
    )


_EMAIL_LABEL = re.compile(
    r"^(?P<label>(?:formcraftd|naive[^(]*) \((?:none|starttls)\))\s+(?P<rest>.*)$"
)


def email_rates(output: str) -> dict[str, float]:
    """mails/s per case label, from bench_email.py's table (whichever column holds it)."""
    column = None
    rates: dict[str, float] = {}
    for line in output.splitlines():
        words = line.split()
        if words[:1] == ["case"] and "mails/s" in words:
            column = words.index("mails/s") - 1  # the label is one cell
        elif column is not None and (m := _EMAIL_LABEL.match(line.strip())):
            numbers = re.findall(r"[\d.]+", m["rest"])
            if len(numbers) > column:
                rates[m["label"]] = float(numbers[column])
    return rates


def email(run: Run, args: argparse.Namespace) -> None:
    argv = ["--n", str(args.email_n), "--concurrency", "3"]
    found = step(run, "Email", "bench_email.py", argv, timeout=600)
    if found is None:
        return
    output, _ = found
    rates = email_rates(output)
    for security, name in (("none", "plain SMTP"), ("starttls", "STARTTLS")):
        ours, naive = rates.get(f"formcraftd ({security})"), rates.get(f"naive worker ({security})")
        if ours is None or naive is None:
            run.failures.append(f"Email: no {security} figures in bench_email.py's output")
            continue
        run.rows.append(
            Row(
                "Email" if security == "none" else "",
                f"{args.email_n} mails, concurrency 3, aiosmtpd on loopback, {name}",
                f"formcraftd {ours:,.0f} mails/s vs a connection per mail {naive:,.0f} "
                f"mails/s ({ours / naive:.1f}x)",
            )
        )


_SHEETS_LINE = re.compile(
    r"^(?P<label>\S.*?)\s+(?P<jobs>\d+) jobs\s+(?P<calls>\d+) API calls\s+"
    r"(?P<per100>[\d.]+) calls/100 jobs\s+(?P<rate>[\d.]+) jobs/s"
)


def sheets(run: Run, args: argparse.Namespace) -> None:
    argv = ["--n", str(args.sheets_n), "--latency-ms", "50"]
    found = step(run, "Google Sheets", "bench_sheets.py", argv, timeout=600)
    if found is None:
        return
    output, _ = found
    matches = [m for line in output.splitlines() if (m := _SHEETS_LINE.match(line.strip()))]
    if not matches:
        run.failures.append("Google Sheets: no figures in bench_sheets.py's output")
    for index, m in enumerate(matches):
        run.rows.append(
            Row(
                "Google Sheets" if index == 0 else "",
                f"{m['jobs']} one-row jobs, one sheet, fake API answering in 50 ms, {m['label']}",
                f"{float(m['rate']):,.0f} jobs/s, {float(m['per100']):g} API calls per 100 jobs",
            )
        )


def instances(run: Run, args: argparse.Namespace) -> None:
    argv = ["--jobs", str(args.jobs), "--rounds", str(args.rounds), "--concurrency", "64"]
    found = step(run, "Processes on one queue", "instances.py", argv, timeout=1200)
    if found is None:
        return
    _, data = found
    medians, cpu = data["medians"], data["cpu_medians"]
    for index, (name, rate) in enumerate(medians.items()):
        single = medians[name.replace("x2", "x1")]
        run.rows.append(
            Row(
                "Processes on one queue" if index == 0 else "",
                f"{name} (as shipped), {data['jobs']:,} jobs, concurrency 64 each, "
                f"{_rounds(data['rounds'])}",
                f"{rate:,.0f} jobs/s = {rate / single:.2f}x one process "
                f"({cpu[name]:.0f} µs CPU/job, all processes)",
            )
        )


STEP_FUNCTIONS: dict[str, Callable[[Run, argparse.Namespace], None]] = {
    "throughput": throughput,
    "latency": latency,
    "memory": memory,
    "startup": startup,
    "email": email,
    "sheets": sheets,
    "instances": instances,
}


# --- the machine and the table --------------------------------------------------------


def _rounds(count: int) -> str:
    return "one round" if count == 1 else f"median of {count} rounds"


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def machine() -> dict[str, str]:
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as file:
        for line in file:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as file:
        total_kib = int(file.readline().split()[1])
    versions = ", ".join(
        f"{package} {_version(package)}" for package in ("aio-pika", "aiohttp", "uvloop", "celery")
    )
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "memory": f"{total_kib / 1024 / 1024:.0f} GiB",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "rabbitmq": _rabbitmq_version(),
        "libraries": versions,
    }


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _rabbitmq_version() -> str:
    sys.path.insert(0, str(HERE))
    try:
        import aio_pika  # noqa: PLC0415
        from webhook_throughput import AMQP_URL  # noqa: PLC0415

        async def ask() -> str:
            connection = await aio_pika.connect(AMQP_URL, timeout=10)
            try:
                properties = connection.transport.connection.server_properties
                return str(properties.get("version", "?"))
            finally:
                await connection.close()

        return asyncio.run(ask())
    except Exception as exc:
        return f"unknown ({type(exc).__name__})"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_jiffies() -> tuple[int, int] | None:
    """(steal, total) CPU time since boot from /proc/stat; None off Linux.

    Steal is the time the hypervisor ran something else while this VM wanted
    a CPU: a share of it during a run slows every contender, unevenly.
    """
    try:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 8:
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice, inside user]
    return fields[7], sum(fields[:8])


def steal_share(start: tuple[int, int] | None, end: tuple[int, int] | None) -> str:
    """The share of CPU time stolen between two readings, as "12 %" (or "unknown")."""
    if start is None or end is None or end[1] <= start[1]:
        return "unknown"
    return f"{100 * (end[0] - start[0]) / (end[1] - start[1]):.0f} %"


def table(rows: list[Row]) -> str:
    lines = [
        "| benchmark | case | result | target | met |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r.benchmark} | {r.case} | {r.result} | {r.target} | {r.met} |" for r in rows]
    return "\n".join(lines)


def write_markdown(run: Run, facts: dict[str, str], started: datetime, wall_s: float) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "latest.md"
    parts = [
        f"# `make bench`, {started:%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {facts['cpu']}, {facts['memory']} RAM, {facts['os']}; Python "
        f"{facts['python']}; RabbitMQ {facts['rabbitmq']} on 127.0.0.1 (shared); "
        f"{facts['libraries']}. Load average at start {facts['load_start']}, at the end "
        f"{facts['load_end']}; CPU time stolen by the hypervisor during the run "
        f"{facts['steal']}. Wall time {wall_s / 60:.1f} min.",
        "",
        table(run.rows),
        "",
        "## Details",
        "",
        "\n\n".join(run.details) or "(none)",
    ]
    if run.reconnected:
        parts += [
            "",
            "## Rounds disturbed by the shared broker",
            "",
            "formcraftd lost its broker connection during these (another suite's fault "
            "test or a broker restart); their figures are in the medians above:",
            "",
            *(f"- {lost} reconnect(s)" for lost in run.reconnected),
        ]
    if run.slow_stops:
        parts += [
            "",
            "## Consumers that did not stop",
            "",
            "Killed after not exiting within 10 s of SIGTERM (measured before the stop, so the "
            "figures stand):",
            "",
            *(f"- {stuck}" for stuck in run.slow_stops),
        ]
    if run.failures:
        parts += ["", "## Failures", "", *(f"- {failure}" for failure in run.failures)]
    path.write_text("\n".join(parts) + "\n")
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--only", default=",".join(STEPS), help=f"among {','.join(STEPS)}")
    parser.add_argument("--quick", action="store_true", help="small sizes, to try the suite")
    parser.add_argument(
        "--rounds", type=int, help="throughput and latency rounds (default 3; 1 with --quick)"
    )
    args = parser.parse_args(argv)
    args.steps = args.only.split(",")
    for name in args.steps:
        if name not in STEPS:
            parser.error(f"--only: unknown step {name!r}")
    quick = args.quick
    args.jobs = 2000 if quick else 10_000
    args.rounds = args.rounds or (1 if quick else 3)
    args.latency_seconds = 3 if quick else 8
    args.latency_rounds = args.rounds
    args.memory_jobs = 10_000 if quick else 100_000
    args.startup_runs = 2 if quick else 5
    args.email_n = 50 if quick else 300
    args.sheets_n = 50 if quick else 200
    return args


def main() -> None:
    args = parse_args()
    started = datetime.now(UTC)
    clock = time.monotonic()
    facts = machine()
    facts["load_start"] = load_average()
    jiffies = cpu_jiffies()
    print(f"formcraftd benchmarks on {facts['cpu']}, Python {facts['python']}, "
          f"RabbitMQ {facts['rabbitmq']}; load average {facts['load_start']}")  # fmt: skip
    run = Run()
    for name in args.steps:
        STEP_FUNCTIONS[name](run, args)
    facts["load_end"] = load_average()
    facts["steal"] = steal_share(jiffies, cpu_jiffies())
    path = write_markdown(run, facts, started, time.monotonic() - clock)
    print("\n" + table(run.rows))
    if run.reconnected:
        print("\nrounds in which formcraftd lost its broker connection: "
              + ", ".join(run.reconnected))  # fmt: skip
    if run.slow_stops:
        print(f"\n{len(run.slow_stops)} consumer(s) had to be killed after SIGTERM: "
              + ", ".join(run.slow_stops))  # fmt: skip
    if run.failures:
        print("\nfailures:\n" + "\n".join(f"- {failure}" for failure in run.failures))
    print(
        f"\nwritten to {path.relative_to(HERE.parent)}; load average at the end "
        f"{facts['load_end']}; CPU time stolen by the hypervisor {facts['steal']}"
    )
    sys.exit(1 if run.failures else 0)


if __name__ == "__main__":
    main()
