"""Webhook throughput: formcraftd, a bare aio-pika consumer and Celery, in one run.

For each round, N webhook jobs are queued on fresh, uniquely named queues, then
one consumer process drains them into a receiver process on loopback
(`receiver.py`). The rate is measured at the receiver, from its first request
to its N-th, so start-up time does not count. The contenders:

- formcraftd: `python -m formcraftd run` with every feature on: validation,
  signing, the SSRF guard (127.0.0.1/32 allowed), breakers, metrics, JSON job
  logs at info, monitoring (every second) and delivery events (to a unique
  exchange with a small queue bound to it, as the app's queue would be);
- bare aio-pika (`bare_consumer.py`): consume, POST, ack, nothing else;
- Celery (`celery_worker.py`): a `requests` POST task, threads pool, same
  concurrency, late acks, prefetch = 2 x concurrency like the others.

Rounds rotate the order of the contenders (A/B/C, B/C/A, C/A/B, ...); the
table shows medians.

    python bench/webhook_throughput.py [--jobs 10000] [--concurrency 64] [--rounds 3]
        [--only formcraftd,bare,celery] [--baseline CHECKOUT] [--json FILE]

`--only` may also name formcraftd with a feature off, to price that feature in
the same A/B run: formcraftd-noevents (no delivery events), formcraftd-quiet
(logging.level = "warning": no per-job log line), formcraftd-lean (both); with
events batched: formcraftd-batched (events_per_message = 100, so arrays of
events in fewer broker messages); or with tracing on: formcraftd-traced
(OpenTelemetry, every trace sampled, OTLP/HTTP to the receiver process standing
in for a collector; needs the otel extra).
`--baseline CHECKOUT` adds the formcraftd of another checkout (say a git
worktree of the commit before an optimisation) to the same rotation, with the
features of the first formcraftd contender named, which is how a change is
measured before/after on a noisy machine.

The helpers here (config, publishing, the receiver, clean-up) are shared by
latency.py, memory.py, startup.py and profile_webhook.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar

import aio_pika
import aiohttp
import orjson
import uvloop

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from formcraftd.amqp.connection import Broker  # noqa: E402
from formcraftd.amqp.topology import WorkerTopology  # noqa: E402
from formcraftd.core import config  # noqa: E402

T = TypeVar("T")

AMQP_URL = os.environ.get("FORMCRAFTD_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
SECRET = "whsec_YmVuY2htYXJrLXNlY3JldA=="
# Environment variables that would override the benchmark's config file.
_OVERRIDES = (
    "RABBITMQ_URL",
    "FORMCRAFTD_CONFIG",
    "FORMCRAFTD_ADMIN_TOKEN",
    "SENTRY_DSN",
    "DEBUG",
    "WORKER_MONITORING_ENABLED",
    "WORKER_MONITORING_INTERVAL",
    "WEBHOOK_WORKER_CONCURRENCY",
    "EMAIL_WORKER_CONCURRENCY",
    "SHEETS_WORKER_CONCURRENCY",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a child process, without anything that overrides its config."""
    env = {k: v for k, v in os.environ.items() if k not in _OVERRIDES}
    env.update(extra)
    return env


# --- formcraftd's config and topology -------------------------------------------------


@dataclass(frozen=True)
class Features:
    """What the formcraftd under test has switched on (all of it, by default)."""

    events: bool = True
    events_per_message: int = 1  # above 1: JSON arrays of events, fewer broker messages
    monitoring: bool = True
    log_level: str = "info"
    tracing: bool = False  # OpenTelemetry at 100 % sampling, exported to the receiver (OTLP)


def bench_config(prefix: str, port: int, concurrency: int, features: Features | None = None) -> str:
    """A config.toml for one formcraftd under test, on queues named after `prefix`."""
    features = features or Features()
    lines = [
        "[broker]",
        f'url = "{AMQP_URL}"',
        "connect_timeout_s = 60",
        "[http]",
        'host = "127.0.0.1"',
        f"port = {port}",
        "[logging]",
        f'level = "{features.log_level}"',
        "[events]",
        f"enabled = {str(features.events).lower()}",
        f'exchange = "{prefix}.events"',  # Stage binds a small sink queue to it
    ]
    if features.events_per_message != 1:  # only then: a --baseline checkout may predate the key
        lines.append(f"events_per_message = {features.events_per_message}")
    lines += [
        "[monitoring]",
        f"enabled = {str(features.monitoring).lower()}",
        "interval_ms = 1000",
        "[workers.webhook]",
        f'queue = "{prefix}.webhook_tasks"',
        f'dead_letter_exchange = "{prefix}.dlx.webhook"',
        f"concurrency = {concurrency}",
        'allowed_networks = ["127.0.0.1/32"]',
    ]
    if features.tracing:  # only then: a --baseline checkout may predate the section
        lines += ["[tracing]", "enabled = true"]
    for kind in ("email", "sheets"):
        lines += [
            f"[workers.{kind}]",
            "enabled = false",
            f'queue = "{prefix}.{kind}_tasks"',
            f'dead_letter_exchange = "{prefix}.dlx.{kind}"',
        ]
    return "\n".join(lines) + "\n"


class Stage:
    """One formcraftd under test: its config file and its topology, deleted on exit.

    With events on, a small queue (the last 1,000 events) is bound to the events
    exchange, as the app's queue would be: unroutable events would come back
    to the daemon as basic.return frames, a cost it does not have in service.
    """

    def __init__(self, concurrency: int, features: Features | None = None) -> None:
        self.features = features or Features()
        self.prefix = f"bench.{uuid.uuid4().hex[:10]}"
        self.events_exchange = f"{self.prefix}.events"
        self.events_sink = f"{self.prefix}.events.sink"
        self.http_port = free_port()
        self.text = bench_config(self.prefix, self.http_port, concurrency, features)
        self.config = config.parse(self.text, source="bench", environ={})
        self.topology = WorkerTopology.build(self.config.workers.webhook, self.config.broker)
        self.queue = self.topology.main.name
        self.path = ""

    async def __aenter__(self) -> Stage:
        broker = Broker(self.config.broker)
        await broker.connect()
        try:
            await broker.declare(self.topology)
            if self.features.events:
                channel = await broker.connection.channel()
                exchange = await channel.declare_exchange(
                    self.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True
                )
                sink = await channel.declare_queue(
                    self.events_sink,
                    arguments={"x-max-length": 1000, "x-overflow": "drop-head"},
                )
                await sink.bind(exchange, "#")
                await channel.close()
        finally:
            await broker.aclose()
        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as file:
            file.write(self.text)
        self.path = file.name
        return self

    async def __aexit__(self, *_exc: object) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        await delete_entities(
            queues=[spec.name for spec in self.topology.queues()] + [self.events_sink],
            exchanges=[self.topology.dead_letter_exchange, self.events_exchange],
        )

    def command(self) -> list[str]:
        return [sys.executable, "-m", "formcraftd", "run", "--config", self.path]


async def delete_entities(*, queues: list[str], exchanges: list[str]) -> None:
    """Delete queues and exchanges the benchmark made (missing ones are fine).

    The shared broker may be restarting under us: connecting is tried for up to 30 s.
    """
    for attempt in range(6):
        try:
            connection = await aio_pika.connect(AMQP_URL, timeout=10)
            break
        except (aio_pika.exceptions.AMQPError, OSError):
            if attempt == 5:
                raise
            await asyncio.sleep(5)
    try:
        for name in queues:
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.queue_delete(name)
            with contextlib.suppress(Exception):
                await channel.close()
        for name in exchanges:
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.exchange_delete(name)
            with contextlib.suppress(Exception):
                await channel.close()
    finally:
        await connection.close()


# --- publishing -----------------------------------------------------------------------


def job_body(url: str, i: int, body: dict[str, Any] | None = None) -> bytes:
    """A `webhook.send` job like the app publishes: a small form submission, signed."""
    return orjson.dumps(
        {
            "type": "webhook.send",
            "payload": {
                "url": url,
                "method": "POST",
                "headers": {},
                "body": body if body is not None else {"n": i, "answers": {"name": "Ada"}},
                "secret": SECRET,
            },
            "metadata": {"formId": "bench", "submissionId": str(i)},
        }
    )


def amqp_message(body: bytes, **properties: Any) -> aio_pika.Message:
    properties.setdefault("message_id", uuid.uuid4().hex)
    return aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **properties)


async def publish_messages(
    queue: str,
    count: int,
    make: Callable[[int], aio_pika.Message],
    *,
    batch: int = 1000,
    channels: int = 2,
) -> None:
    """Publish `count` messages to `queue` with confirms, `batch` in flight per channel."""
    connection = await aio_pika.connect(AMQP_URL)
    try:
        opened = [await connection.channel(publisher_confirms=True) for _ in range(channels)]

        async def fill(channel: aio_pika.abc.AbstractChannel, indices: range) -> None:
            for start in range(indices.start, indices.stop, batch):
                await asyncio.gather(
                    *(
                        channel.default_exchange.publish(make(i), routing_key=queue)
                        for i in range(start, min(start + batch, indices.stop))
                    )
                )

        share = -(-count // channels)
        await asyncio.gather(
            *(
                fill(channel, range(n * share, min((n + 1) * share, count)))
                for n, channel in enumerate(opened)
            )
        )
    finally:
        await connection.close()


async def publish_jobs(queue: str, count: int, url: str) -> None:
    await publish_messages(queue, count, lambda i: amqp_message(job_body(url, i)))


async def queue_state(queue: str) -> tuple[int, int]:
    """(messages ready, consumers) of `queue`, by a passive declare."""
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        result = declared.declaration_result
        return int(result.message_count or 0), int(result.consumer_count or 0)
    finally:
        await connection.close()


async def wait_consumer(queue: str, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Until something consumes `queue` (or the process died, or `timeout`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"consumer exited with {process.returncode} before consuming")
        if (await queue_state(queue))[1] > 0:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"nothing consumed {queue} within {timeout:.0f} s")


# --- processes ------------------------------------------------------------------------


class Receiver:
    """`receiver.py` in its own process: answers 200 and counts POSTs."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.process: subprocess.Popen[bytes] | None = None
        self._session: aiohttp.ClientSession | None = None

    def command(self) -> list[str]:
        """The receiver process to start (a subclass may serve something else)."""
        return [sys.executable, str(HERE / "receiver.py"), str(self.port)]

    async def __aenter__(self) -> Self:
        self.process = subprocess.Popen(self.command(), env=clean_env())
        self._session = aiohttp.ClientSession()
        deadline = time.monotonic() + 20
        while True:
            try:
                await self.count()
                return self
            except aiohttp.ClientError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise
                await asyncio.sleep(0.05)

    async def __aexit__(self, *_exc: object) -> None:
        if self._session is not None:
            await self._session.close()
        if self.process is not None:
            stop_process(self.process)

    async def count(self) -> int:
        assert self._session is not None
        async with self._session.get(f"http://127.0.0.1:{self.port}/count") as response:
            return int(await response.text())

    async def reset(self) -> None:
        assert self._session is not None
        async with self._session.post(f"http://127.0.0.1:{self.port}/reset") as response:
            await response.read()

    async def drain(self, jobs: int, timeout: float, pid: int | None = None) -> Drain:
        """Poll until `jobs` requests arrived; the rate and `pid`'s CPU time in between.

        Both are taken from the first request seen to the `jobs`-th, so the
        consumer's start-up counts in neither.
        """
        deadline = time.monotonic() + timeout
        first: tuple[float, int, float] | None = None
        while True:
            count = await self.count()
            now = time.monotonic()
            if count and first is None:
                first = (now, count, cpu_seconds(pid))
            if count >= jobs:
                assert first is not None
                jobs_seen = max(jobs - first[1], 1)
                return Drain(
                    rate=jobs_seen / max(now - first[0], 1e-9),
                    cpu_us_per_job=(cpu_seconds(pid) - first[2]) * 1e6 / jobs_seen,
                )
            if now > deadline:
                raise TimeoutError(f"only {count} of {jobs} jobs arrived in {timeout:.0f} s")
            await asyncio.sleep(0.01)


@dataclass(frozen=True)
class Drain:
    rate: float  # jobs per second at the receiver
    cpu_us_per_job: float  # the consumer process's user + system CPU per job


_CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of process `pid` (all its threads) so far; 0 if unknown."""
    if pid is None:
        return 0.0
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICK


def start_process(command: list[str], *, cwd: Path = ROOT, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
        env=clean_env(**env),
    )


STOP_TIMEOUT_S = 10
# Consumers that did not exit within STOP_TIMEOUT_S of SIGTERM (the figures still count:
# the drain was measured before the stop), reported with the results.
SLOW_STOPS: list[str] = []


def stop_process(
    process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_S, *, note: bool = True
) -> int | None:
    """SIGTERM, wait up to `timeout`, then SIGKILL (noted in SLOW_STOPS); the exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        if not note:
            return process.wait(timeout=10)
        args = [str(arg) for arg in process.args]  # type: ignore[union-attr]
        name = next((Path(arg).stem for arg in args[1:3] if not arg.startswith("-")), args[0])
        SLOW_STOPS.append(name)
        print(f"  warning: `{name}` had not exited {timeout:.0f} s after SIGTERM; killed")
        return process.wait(timeout=10)


# --- the contenders -------------------------------------------------------------------


@dataclass
class Settings:
    jobs: int = 10_000
    concurrency: int = 64
    features: Features = field(default_factory=Features)
    source: Path | None = None  # another checkout of formcraftd to run instead of this one


def start_formcraftd(
    stage: Stage, source: Path | None = None, **env: str
) -> subprocess.Popen[bytes]:
    """`python -m formcraftd run` of this tree, or of the checkout at `source`."""
    if source is None:
        return start_process(stage.command(), **env)
    return start_process(stage.command(), cwd=source, PYTHONPATH=str(source), **env)


def tracing_env(receiver: Receiver) -> dict[str, str]:
    """With tracing on: every trace sampled, exported over OTLP/HTTP to the receiver
    (which stands in for a collector on loopback)."""
    return {
        "OTEL_TRACES_SAMPLER": "always_on",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
        "OTEL_SERVICE_NAME": "formcraftd-bench",
    }


async def formcraftd_round(settings: Settings, receiver: Receiver) -> Drain:
    async with Stage(settings.concurrency, settings.features) as stage:
        await publish_jobs(stage.queue, settings.jobs, receiver.url)
        await receiver.reset()
        env = tracing_env(receiver) if settings.features.tracing else {}
        process = start_formcraftd(stage, settings.source, **env)
        try:
            drain = await receiver.drain(settings.jobs, timeout=300, pid=process.pid)
            metrics = await scrape_metrics(stage.http_port)
            if metrics.get(RECONNECTS):
                print(f"    (the broker connection was lost {metrics[RECONNECTS]:.0f} time(s))")
                RECONNECTED.append(f"formcraftd: {metrics[RECONNECTS]:.0f}")
            if metrics.get(EVENTS_DROPPED):
                print(f"    (delivery events dropped: {metrics[EVENTS_DROPPED]:.0f})")
            return drain
        finally:
            stop_process(process)


EVENTS_DROPPED = "formcraftd_events_dropped_total"
RECONNECTS = "formcraftd_reconnects_total"
# formcraftd rounds during which the broker dropped the connection (another suite's
# fault test, a broker restart): their figures are disturbed, and reported as such.
RECONNECTED: list[str] = []


async def scrape_metrics(port: int) -> dict[str, float]:
    """formcraftd's /metrics as {sample with labels: value}; empty if it does not answer."""
    samples: dict[str, float] = {}
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/metrics", timeout=aiohttp.ClientTimeout(5)) as r,
        ):
            text = await r.text()
    except (aiohttp.ClientError, TimeoutError):
        return samples
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                samples[name] = float(value)
    return samples


async def bare_round(settings: Settings, receiver: Receiver) -> Drain:
    async with Stage(settings.concurrency, settings.features) as stage:
        await publish_jobs(stage.queue, settings.jobs, receiver.url)
        await receiver.reset()
        process = start_process(bare_command(stage.queue, settings.concurrency))
        try:
            return await receiver.drain(settings.jobs, timeout=300, pid=process.pid)
        finally:
            stop_process(process)


def bare_command(queue: str, concurrency: int) -> list[str]:
    return [sys.executable, str(HERE / "bare_consumer.py"), AMQP_URL, queue, str(concurrency)]


async def celery_round(settings: Settings, receiver: Receiver) -> Drain:
    import celery_worker  # noqa: PLC0415 - Celery is a bench-only extra, loaded when used

    names = celery_worker.Names.unique()
    await celery_worker.declare(names, AMQP_URL)
    try:
        app = celery_worker.make_app(names, AMQP_URL)
        await publish_messages(
            names.queue,
            settings.jobs,
            lambda i: celery_worker.task_message(
                app, receiver.url, orjson.dumps({"n": i, "answers": {"name": "Ada"}})
            ),
        )
        await receiver.reset()
        with tempfile.TemporaryFile() as log:  # its warnings (running as root...) unless it fails
            process = subprocess.Popen(
                celery_worker.command(names, settings.concurrency),
                stdout=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
                stderr=log,
                env=clean_env(**celery_worker.env(names, AMQP_URL)),
            )
            try:
                return await receiver.drain(settings.jobs, timeout=300, pid=process.pid)
            except BaseException:
                log.seek(0)
                print(log.read().decode(errors="replace")[-3000:], file=sys.stderr)
                raise
            finally:
                stop_process(process, note=False)  # a warm shutdown of Celery may take a while
    finally:
        await delete_entities(queues=names.queues(), exchanges=names.exchanges())


@dataclass(frozen=True)
class Contender:
    name: str  # as shown in the table
    run: Callable[[Settings, Receiver], Awaitable[Drain]]
    features: Features = Features()
    source: Path | None = None


CONTENDERS = {
    "formcraftd": Contender("formcraftd", formcraftd_round),
    "bare": Contender("bare aio-pika", bare_round),
    "celery": Contender("celery", celery_round),
    "formcraftd-batched": Contender(
        "formcraftd, events batched", formcraftd_round, Features(events_per_message=100)
    ),
    "formcraftd-noevents": Contender(
        "formcraftd, no events", formcraftd_round, Features(events=False)
    ),
    "formcraftd-quiet": Contender(
        "formcraftd, no job logs", formcraftd_round, Features(log_level="warning")
    ),
    "formcraftd-lean": Contender(
        "formcraftd, neither", formcraftd_round, Features(events=False, log_level="warning")
    ),
    "formcraftd-traced": Contender(
        "formcraftd, traced 100 %", formcraftd_round, Features(tracing=True)
    ),
}


def rotations(names: Sequence[T], rounds: int) -> Iterator[list[T]]:
    """Round r runs the contenders rotated by r: each one takes every position in turn."""
    for r in range(rounds):
        shift = r % len(names)
        yield [*names[shift:], *names[:shift]]


class Tally:
    """Each contender's rate and CPU per job, round after round, printed as they come."""

    def __init__(self, names: Iterable[str], width: int = 24) -> None:
        self.rates: dict[str, list[float]] = {name: [] for name in names}
        self.cpu: dict[str, list[float]] = {name: [] for name in self.rates}
        self._width = max(width, *map(len, self.rates))  # a long name widens the column

    def add(self, number: int, name: str, drain: Drain) -> None:
        self.rates[name].append(drain.rate)
        self.cpu[name].append(drain.cpu_us_per_job)
        print(
            f"  round {number}: {name:{self._width}} {drain.rate:8.0f} jobs/s "
            f"{drain.cpu_us_per_job:6.0f} us CPU/job",
            flush=True,
        )

    def result(self, args: argparse.Namespace) -> dict[str, Any]:
        """The run's figures: every round's, and the medians."""
        return {
            "jobs": args.jobs,
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "rates": self.rates,
            "cpu_us_per_job": self.cpu,
            "medians": {name: statistics.median(v) for name, v in self.rates.items()},
            "cpu_medians": {name: statistics.median(v) for name, v in self.cpu.items()},
        }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    contenders = [CONTENDERS[name] for name in args.only.split(",")]
    if args.baseline:
        # the baseline runs with the features of the first formcraftd contender named
        same = next((c for c in contenders if c.run is formcraftd_round), CONTENDERS["formcraftd"])
        contenders.append(
            Contender(f"{same.name} (baseline)", formcraftd_round, same.features, args.baseline)
        )
    tally = Tally(c.name for c in contenders)
    async with Receiver() as receiver:
        for number, order in enumerate(rotations(contenders, args.rounds), start=1):
            for contender in order:
                settings = Settings(
                    args.jobs, args.concurrency, contender.features, contender.source
                )
                drain = await one_round_with_retry(contender, settings, receiver)
                tally.add(number, contender.name, drain)
    return tally.result(args) | {"slow_stops": SLOW_STOPS, "reconnected": RECONNECTED}


async def one_round_with_retry(
    contender: Contender, settings: Settings, receiver: Receiver
) -> Drain:
    """One round; once more if the shared broker went away under it."""
    for attempt in (1, 2):
        try:
            return await contender.run(settings, receiver)
        except (aio_pika.exceptions.AMQPError, OSError, RuntimeError, TimeoutError) as exc:
            if attempt == 2:
                raise
            print(f"  {contender.name}: round failed ({type(exc).__name__}: {exc}); again")
            await asyncio.sleep(5)
    raise AssertionError("unreachable")


def report(result: dict[str, Any]) -> None:
    medians, cpu = result["medians"], result["cpu_medians"]
    base = medians.get("bare aio-pika")
    print(
        f"\nwebhook throughput: {result['jobs']} jobs, concurrency {result['concurrency']}, "
        f"median of {result['rounds']} rounds"
    )
    width = max(24, *map(len, medians))
    print(f"{'consumer':{width}} {'jobs/s':>8} {'vs bare':>8} {'CPU us/job':>11}  rounds (jobs/s)")
    for name, median in medians.items():
        ratio = f"{median / base:7.2f}x" if base else "       -"
        rounds = " ".join(f"{rate:.0f}" for rate in result["rates"][name])
        print(f"{name:{width}} {median:8.0f} {ratio} {cpu[name]:11.0f}  {rounds}")
    if "formcraftd" in medians and "celery" in medians:
        print(f"formcraftd / celery: {medians['formcraftd'] / medians['celery']:.1f}x")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--only",
        default="formcraftd,bare,celery",
        help=f"comma-separated, among {', '.join(CONTENDERS)}",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout of the project (e.g. a git worktree of the commit before a "
        "change): its formcraftd joins the rounds with the features of the first formcraftd "
        "contender named, as '<that contender> (baseline)'",
    )
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.baseline is not None:
        args.baseline = args.baseline.resolve()
        if not (args.baseline / "formcraftd" / "__main__.py").is_file():
            parser.error(f"--baseline: no formcraftd package in {args.baseline}")
    for name in args.only.split(","):
        if name not in CONTENDERS:
            parser.error(f"--only: unknown contender {name!r}")
    return args


def run_and_report(
    args: argparse.Namespace,
    run: Callable[[argparse.Namespace], Awaitable[dict[str, Any]]],
    report: Callable[[dict[str, Any]], None],
) -> None:
    """Run a benchmark, print its report and, with `--json FILE`, write the result there."""
    result = uvloop.run(run(args))
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def main() -> None:
    run_and_report(parse_args(), run, report)


if __name__ == "__main__":
    main()
