"""Profile formcraftd's webhook hot path while it drains N queued jobs.

Two ways, same workload (N jobs queued on unique queues, then drained into
`receiver.py` on loopback, concurrency 64, every feature on as in
webhook_throughput.py):

- `--tool py-spy` (default): the daemon runs as `python -m formcraftd run`
  under `py-spy record` (sampling, ~250 Hz, negligible overhead: the profile
  shows where the real process spends its time). Start-up samples (imports)
  are dropped.
  `--target bare` profiles bare_consumer.py the same way, for comparison.
- `--tool cprofile`: a Daemon in this process under uvloop, with cProfile
  enabled from READY until the queue is drained (deterministic, with
  overhead that inflates small Python functions).

It prints where the CPU goes by package, the top functions by own time, and
formcraftd's functions by inclusive time (share of samples whose stack
contains them), each also in µs of CPU per job (py-spy samples only a busy
thread, so samples / rate / jobs is CPU per job), and writes the raw profile
to bench/results/profile-<variant>.pyspy.txt (+ .json) or .cprofile.

    python bench/profile_webhook.py [--jobs 20000] [--concurrency 64] [--tool py-spy|cprofile]
        [--target formcraftd|bare] [--no-events] [--events-per-message N] [--tracing]
        [--log-level info] [--top 25]
    python bench/profile_webhook.py --compare bench/results/profile-bare.pyspy.txt \\
        bench/results/profile-formcraftd.pyspy.txt      # µs/job side by side
    python bench/profile_webhook.py --micro             # the hot path's pieces, timeit
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import pstats
import shutil
import signal
import subprocess
import sys
import time
import timeit
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop
from webhook_throughput import (
    ROOT,
    Features,
    Receiver,
    Stage,
    bare_command,
    clean_env,
    job_body,
    publish_jobs,
    tracing_env,
)

RESULTS = Path(__file__).resolve().parent / "results"
STOP_TIMEOUT_S = 15
_STARTUP_FRAMES = ("<frozen importlib._bootstrap", "_find_and_load")


# --- py-spy ---------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


async def _child_of(pid: int, timeout: float = 10) -> int:
    """The process py-spy started (the consumer), once it exists."""
    deadline = time.monotonic() + timeout
    while not (children := _children(pid)):
        if time.monotonic() > deadline:
            raise TimeoutError("py-spy started no consumer")
        await asyncio.sleep(0.01)
    return children[0]


async def profile_py_spy(args: argparse.Namespace, stage: Stage, receiver: Receiver) -> Path:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = RESULTS / f"profile-{_variant(args)}.pyspy.txt"
    if args.target == "bare":
        target = bare_command(stage.queue, args.concurrency)
    else:
        target = stage.command()
    command = [
        py_spy, "record", "--format", "raw", "--nolineno", "--rate", str(args.rate),
        "--output", str(out), "--", *target,
    ]  # fmt: skip
    await receiver.reset()
    env = clean_env(**(tracing_env(receiver) if args.tracing else {}))
    spy = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=ROOT
    )
    try:
        started = time.monotonic()
        consumer = await _child_of(spy.pid)
        drain = await receiver.drain(args.jobs, timeout=600, pid=consumer)
        rate = drain.rate
        print(f"drained {args.jobs} jobs at {rate:.0f} jobs/s under py-spy, "
              f"{drain.cpu_us_per_job:.0f} us CPU/job "
              f"({time.monotonic() - started:.1f} s from exec)")  # fmt: skip
    finally:
        children = _children(spy.pid)
        for child in children:  # the consumer: its exit ends the recording
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)
        try:
            _, err = spy.communicate(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print(f"warning: the consumer had not exited {STOP_TIMEOUT_S} s after SIGTERM; killed")
            for child in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            try:
                _, err = spy.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                spy.kill()
                _, err = spy.communicate(timeout=10)
        if spy.returncode not in (0, None) or not out.exists():
            print(err.decode(errors="replace")[-2000:], file=sys.stderr)
    meta = {
        "jobs": args.jobs,
        "rate_hz": args.rate,
        "target": args.target,
        "drain_rate": rate,
        "cpu_us_per_job": drain.cpu_us_per_job,
    }
    out.with_suffix(".json").write_text(json.dumps(meta))
    return out


def _variant(args: argparse.Namespace) -> str:
    """`formcraftd`, `bare`, `formcraftd-noevents-warning`...: names the output files."""
    if args.target == "bare":
        return "bare"
    return (
        "formcraftd"
        + ("-noevents" if args.no_events else "")
        + ("" if args.events_per_message == 1 else f"-batched{args.events_per_message}")
        + ("" if args.log_level == "info" else f"-{args.log_level}")
        + ("-traced" if args.tracing else "")
    )


def _package(frame: str) -> str:
    """`aiohttp`, `formcraftd`, `stdlib:asyncio`... from a py-spy frame "name (path)"."""
    path = frame[frame.rfind("(") + 1 : -1] if frame.endswith(")") else ""
    head = path.split("/", 1)[0]
    if not head or path.startswith("<"):
        return "other"
    if head in _SCRIPTS:
        return head.removesuffix(".py")
    if head.endswith(".py"):
        return f"stdlib:{head[:-3]}"
    if head in _STDLIB:
        return f"stdlib:{head}"
    return head


_SCRIPTS = frozenset({"bare_consumer.py"})
_STDLIB = frozenset(
    {"asyncio", "logging", "json", "email", "http", "concurrent", "importlib", "encodings",
     "urllib", "collections", "ssl", "ctypes", "multiprocessing", "unittest"}
)  # fmt: skip
_LIBRARIES = frozenset(
    {"aio_pika", "aiormq", "pamqp", "aiohttp", "yarl", "multidict", "prometheus_client",
     "stdlib:logging", "msgspec", "orjson"}
)  # fmt: skip


@dataclass
class Samples:
    """A py-spy raw profile, start-up dropped; `us` turns sample counts into µs of CPU per job.

    The consumer's CPU time per job, measured from /proc over the drain, is
    shared out in proportion to the samples (py-spy also samples a thread
    that is runnable but waiting for a core, so raw sample time overstates
    CPU on a busy machine).
    """

    own: Counter[str]
    inclusive: Counter[str]
    packages: Counter[str]
    total: int
    dropped: int
    us_per_sample_per_job: float

    @classmethod
    def load(cls, path: Path) -> Samples:
        meta = json.loads(path.with_suffix(".json").read_text())
        own: Counter[str] = Counter()
        inclusive: Counter[str] = Counter()
        packages: Counter[str] = Counter()
        total = dropped = 0
        for line in path.read_text().splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = stack.split(";")
            if any(marker in frame for frame in frames for marker in _STARTUP_FRAMES):
                dropped += count
                continue
            total += count
            own[frames[-1]] += count
            packages[_package(frames[-1])] += count
            for frame in set(frames):
                inclusive[frame] += count
        cpu_us = meta.get("cpu_us_per_job")
        per_sample = cpu_us / total if cpu_us else 1e6 / meta["rate_hz"] / meta["jobs"]
        return cls(own, inclusive, packages, total, dropped, per_sample)

    def us(self, count: int) -> float:
        return count * self.us_per_sample_per_job

    def line(self, count: int, label: str) -> str:
        return f"  {100 * count / self.total:5.1f}%  {self.us(count):6.1f} us/job  {label}"


def summarize_py_spy(path: Path, top: int) -> None:
    """Where the CPU went: by package, by function (own), ours and libraries (inclusive)."""
    p = Samples.load(path)
    print(
        f"\n{p.total} samples while running ({p.dropped} start-up samples dropped); "
        f"{p.us(p.total):.0f} us of CPU per job in all (measured), shared out by samples. "
        "Runner.run's own time is the event loop itself (uvloop's C code, I/O system calls)."
    )
    print("\nOwn time by package (the leaf frame's package):")
    for package, count in p.packages.most_common(15):
        print(p.line(count, package))
    print(f"\nTop {top} functions by own time:")
    for frame, count in p.own.most_common(top):
        print(p.line(count, frame))
    ours = [(f, c) for f, c in p.inclusive.most_common() if "(formcraftd/" in f]
    if ours:
        print(f"\nformcraftd functions by inclusive time (top {top}):")
        for frame, count in ours[:top]:
            print(p.line(count, frame))
    print(f"\nLibrary functions by inclusive time (top {top}):")
    libraries = [(f, c) for f, c in p.inclusive.most_common() if _package(f) in _LIBRARIES]
    for frame, count in libraries[:top]:
        print(p.line(count, frame))


def compare_py_spy(base_path: Path, other_path: Path, top: int) -> None:
    """µs of CPU per job, side by side: by package, then the functions that differ most."""
    base, other = Samples.load(base_path), Samples.load(other_path)
    print(
        f"\nCPU per job: {base_path.name} {base.us(base.total):.0f} us, "
        f"{other_path.name} {other.us(other.total):.0f} us"
    )
    print(f"\n{'by package (own time)':40} {'base':>8} {'other':>8} {'delta':>8}  us/job")
    names = set(base.packages) | set(other.packages)
    rows = sorted(
        names, key=lambda n: other.us(other.packages[n]) - base.us(base.packages[n]), reverse=True
    )
    for name in rows[:20]:
        b, o = base.us(base.packages[name]), other.us(other.packages[name])
        print(f"{name:40} {b:8.1f} {o:8.1f} {o - b:+8.1f}")
    print(
        f"\n{'functions, own time (largest differences)':72} {'base':>7} {'other':>7} {'delta':>7}"
    )
    frames = set(base.own) | set(other.own)
    deltas = sorted(
        frames, key=lambda f: abs(other.us(other.own[f]) - base.us(base.own[f])), reverse=True
    )
    for frame in deltas[:top]:
        b, o = base.us(base.own[frame]), other.us(other.own[frame])
        print(f"{frame[:72]:72} {b:7.1f} {o:7.1f} {o - b:+7.1f}")


# --- cProfile -------------------------------------------------------------------------


async def profile_cprofile(args: argparse.Namespace, stage: Stage, receiver: Receiver) -> Path:
    from formcraftd.daemon import Daemon  # noqa: PLC0415
    from formcraftd.ops import logs  # noqa: PLC0415 - the daemon's modules load only in this mode

    out = RESULTS / f"profile-{_variant(args)}.cprofile"
    logs.configure(stage.config.logging, stream=open("/dev/null", "w"))  # noqa: SIM115, ASYNC230
    daemon = Daemon(stage.config)
    await receiver.reset()
    task = asyncio.create_task(daemon.run())
    profiler = cProfile.Profile()
    try:
        await asyncio.wait_for(daemon.started.wait(), timeout=60)
        profiler.enable()
        rate = (await receiver.drain(args.jobs, timeout=600)).rate
        profiler.disable()
        print(f"drained {args.jobs} jobs at {rate:.0f} jobs/s under cProfile")
    finally:
        profiler.disable()
        profiler.dump_stats(out)
        daemon.request_shutdown()
        done, _ = await asyncio.wait([task], timeout=STOP_TIMEOUT_S)
        if not done:
            print(f"warning: the daemon had not stopped {STOP_TIMEOUT_S} s after "
                  "request_shutdown(); cancelling it")  # fmt: skip
            task.cancel()
            await asyncio.wait([task], timeout=STOP_TIMEOUT_S)
        logs.reset()
    return out


def summarize_cprofile(path: Path, top: int) -> None:
    stats = pstats.Stats(str(path))
    print(f"\nTop {top} functions by own time (tottime):")
    stats.sort_stats("tottime").print_stats(top)
    print(f"\nformcraftd functions by cumulative time (top {top}):")
    stats.sort_stats("cumulative").print_stats(r"formcraftd/", top)


# --- micro-benchmarks -----------------------------------------------------------------


def _per_call_us(fn: Callable[[], object], number: int = 5_000, repeat: int = 7) -> float:
    """The best of `repeat` runs (the usual timeit practice on a machine with neighbours)."""
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def micro() -> None:
    """Per-call cost of the hot path's pieces, in isolation (timeit; µs per call).

    These reach into formcraftd's internals, which change as it is optimised:
    a piece whose API moved prints "n/a" instead of stopping the rest.
    """
    import hashlib  # noqa: PLC0415 - this mode only
    import hmac  # noqa: PLC0415

    from formcraftd.amqp.settled import SettledDeliveries  # noqa: PLC0415
    from formcraftd.core import config, jobs  # noqa: PLC0415
    from formcraftd.core.attempts import Attempt, delivery_event  # noqa: PLC0415
    from formcraftd.core.handler import Delivered, JobContext  # noqa: PLC0415
    from formcraftd.core.redaction import redact  # noqa: PLC0415
    from formcraftd.core.stats import QueueStats  # noqa: PLC0415
    from formcraftd.ops import logs  # noqa: PLC0415
    from formcraftd.ops.reporting import log_attempt  # noqa: PLC0415
    from formcraftd.workers import webhook  # noqa: PLC0415
    from formcraftd.workers.webhook import handler as webhook_handler  # noqa: PLC0415
    from formcraftd.workers.webhook import request, signing, targets  # noqa: PLC0415

    body = job_body("http://127.0.0.1:8080/hook", 1)
    job: Any = jobs.decode(body)
    ctx = JobContext(job_id="0123456789abcdef0123456789abcdef", attempt=1, queue="webhook_tasks")
    worker = config.parse(
        '[workers.webhook]\nallowed_networks = ["127.0.0.1/32"]\n', source="micro", environ={}
    ).workers.webhook
    devnull = open(os.devnull, "w")  # noqa: SIM115 - closed at the end
    cases: list[tuple[str, Callable[[], Callable[[], object]]]] = []

    def case(label: str) -> Callable[[Callable[[], Callable[[], object]]], None]:
        def register(setup: Callable[[], Callable[[], object]]) -> None:
            cases.append((label, setup))

        return register

    def attempt() -> Any:
        return Attempt("webhook", "webhook_tasks", ctx, job, "success", None,
                       Delivered(200, "ok"), 0.0012)  # fmt: skip

    def logging_at(level: str) -> Callable[[], object]:
        text = f'[logging]\nlevel = "{level}"\n'
        logs.configure(config.parse(text, source="micro", environ={}).logging, stream=devnull)
        one = attempt()
        return lambda: log_attempt(one)

    case("job log line, JSON at info (to /dev/null)")(lambda: logging_at("info"))
    case("job log line, filtered out (level warning)")(lambda: logging_at("warning"))
    case("redact() of one short field")(lambda: lambda: redact("webhook_tasks"))

    def event() -> Callable[[], object]:
        one = attempt()
        return lambda: delivery_event(one)

    case("delivery_event(attempt)")(event)
    case("jobs.decode(body)")(lambda: lambda: jobs.decode(body))

    def build() -> Callable[[], object]:
        handler = webhook.WebhookHandler(worker, user_agent="formcraftd/bench")
        policy = webhook_handler._Settings.from_config(worker).policy
        return lambda: handler._build(job, ctx, policy)

    case("WebhookHandler._build (URL checks, signing, headers)")(build)
    key = signing.signing_key(job.payload.secret)
    signed = request.encode_body(job.payload.body)
    case("  sign(): both HMACs")(lambda: lambda: signing.sign(key, "msg_x", 1, signed))
    case("    hmac.new(key, body, 'sha256').hexdigest()")(
        lambda: lambda: hmac.new(key, signed, "sha256").hexdigest()
    )
    case("    hmac.digest(key, body, 'sha256').hex()")(
        lambda: lambda: hmac.digest(key, signed, "sha256").hex()
    )
    case("  webhook_id() (sha256)")(lambda: lambda: signing.webhook_id(ctx.job_id, "u"))
    case("  signing_key() (base64; the handler keeps one HMAC per secret)")(
        lambda: lambda: signing.signing_key(job.payload.secret)
    )
    case("breaker_key(url) (parsed once per URL)")(
        lambda: lambda: targets.breaker_key(job.payload.url)
    )
    case("hashlib.sha256 of a job id, for scale")(
        lambda: lambda: hashlib.sha256(ctx.job_id.encode()).digest()
    )

    def metric_ops() -> Callable[[], object]:
        stats = QueueStats()

        def ops() -> None:
            stats.success += 1
            stats.durations.observe(0.0012)

        return ops

    case("per-job metrics: success +1, duration observe")(metric_ops)

    def prometheus_ops() -> Callable[[], object]:
        import prometheus_client as prom  # noqa: PLC0415 - only this case needs it

        registry = prom.CollectorRegistry()
        counter = prom.Counter("c", "c", ["queue"], registry=registry).labels("webhook_tasks")
        gauge = prom.Gauge("g", "g", ["queue"], registry=registry).labels("webhook_tasks")
        histogram = prom.Histogram("h", "h", ["queue"], registry=registry).labels("webhook_tasks")

        def ops() -> None:
            gauge.inc()
            gauge.dec()
            counter.inc()
            histogram.observe(0.0012)

        return ops

    case("  the same as prometheus_client children, plus in-flight +1 -1 (before)")(prometheus_ops)

    def settled() -> Callable[[], object]:
        memory = SettledDeliveries(window_s=3600, size=100_000)
        counter = iter(range(10**9))
        for n in range(100_000):
            memory.add(f"{n:032x}", 0)
        return lambda: memory.add(f"x{next(counter):031x}", 0)

    case("SettledDeliveries.add (holding 100,000)")(settled)

    def admission(rate_limit: str) -> Callable[[], Callable[[], object]]:
        """What the pipeline does for a job's turn before its concurrency slot."""

        def setup() -> Callable[[], object]:
            text = f"[workers.webhook.rate_limit]\n{rate_limit}\n"
            section = config.parse(text, source="micro", environ={}).workers.webhook
            handler = webhook.WebhookHandler(section, user_agent="formcraftd/bench")

            def turn() -> object:
                limits = handler.rate_limits
                if limits is not None and limits.engaged:
                    return limits.admit(handler.breaker_key(job))
                return None

            return turn

        return setup

    case("rate limits: none configured (the shipped default)")(admission(""))
    case("rate limits: this destination limited, within its rate")(
        admission("requests_per_second = 1000000\nburst = 1000000")
    )
    case("rate limits: another destination limited, this one not")(
        admission('hosts = [{ host = "example.com", requests_per_second = 5 }]')
    )

    print("\nPer call, in isolation (timeit, best of 7, this machine):")
    for label, setup in cases:
        try:
            print(f"  {_per_call_us(setup()):7.2f} us  {label}")
        except Exception as exc:
            print(f"      n/a    {label} ({type(exc).__name__}: {exc})")
    logs.reset()
    devnull.close()

    async def loop_costs() -> None:
        n = 50_000

        async def nothing() -> None:
            pass

        async def plain() -> None:
            await nothing()

        async def under_timeout() -> None:
            async with asyncio.timeout(30):
                await nothing()

        started = time.perf_counter()
        for _ in range(n):
            await plain()
        base = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(n):
            await under_timeout()
        print(f"  {(time.perf_counter() - started - base) / n * 1e6:7.2f} us  "
              "async with asyncio.timeout() (uvloop)")  # fmt: skip
        started = time.perf_counter()
        for _ in range(n):
            asyncio.current_task()
        print(f"  {(time.perf_counter() - started) / n * 1e6:7.2f} us  asyncio.current_task()")
        started = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            for _ in range(n):
                group.create_task(nothing())
        print(f"  {(time.perf_counter() - started) / n * 1e6:7.2f} us  "
              "a task in a TaskGroup (create, run, finish)")  # fmt: skip

    uvloop.run(loop_costs())
    import tracemalloc  # noqa: PLC0415

    tracemalloc.start()
    memory = SettledDeliveries(window_s=3600, size=100_000)
    for n in range(100_000):
        memory.add(f"{n:032x}", 0)
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    print(f"\nSettledDeliveries holding 100,000 deliveries: {held / 1e6:.1f} MB "
          f"({held / 100_000:.0f} bytes each)")  # fmt: skip


# --- main -----------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> Path:
    RESULTS.mkdir(exist_ok=True)
    features = Features(
        events=not args.no_events,
        events_per_message=args.events_per_message,
        log_level=args.log_level,
        tracing=args.tracing,
    )
    async with Receiver() as receiver, Stage(args.concurrency, features) as stage:
        started = time.monotonic()
        await publish_jobs(stage.queue, args.jobs, receiver.url)
        print(f"queued {args.jobs} jobs in {time.monotonic() - started:.1f} s", flush=True)
        if args.tool == "py-spy":
            return await profile_py_spy(args, stage, receiver)
        return await profile_cprofile(args, stage, receiver)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--tool", choices=("py-spy", "cprofile"), default="py-spy")
    parser.add_argument(
        "--target",
        choices=("formcraftd", "bare"),
        default="formcraftd",
        help="py-spy only: profile the bare aio-pika consumer instead, for comparison",
    )
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--no-events", action="store_true")
    parser.add_argument(
        "--events-per-message", type=int, default=1, help="[events] events_per_message"
    )
    parser.add_argument(
        "--tracing", action="store_true", help="py-spy only: OpenTelemetry on, 100 %% sampled"
    )
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--micro", action="store_true", help="only time the hot path's pieces in isolation"
    )
    parser.add_argument(
        "--compare",
        nargs=2,
        type=Path,
        metavar=("BASE", "OTHER"),
        help="only compare two py-spy profiles written before (e.g. bare vs formcraftd)",
    )
    args = parser.parse_args()
    if args.micro:
        micro()
        return
    if args.compare:
        compare_py_spy(*args.compare, args.top)
        return
    out = uvloop.run(run(args))
    print(f"raw profile: {out}")
    if args.tool == "py-spy":
        summarize_py_spy(out, args.top)
    else:
        summarize_cprofile(out, args.top)


if __name__ == "__main__":
    main()
