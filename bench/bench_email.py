"""Benchmark: formcraftd's email worker against naive one-connection-per-mail loops.

    .venv/bin/python bench/bench_email.py [--n 600] [--concurrency 3] [--rounds 3]

It starts aiosmtpd in a subprocess on 127.0.0.1 with two listeners, plain SMTP
and STARTTLS-required (a self-signed certificate made with `openssl`, trusted
through SSL_CERT_FILE), and for each of the two sends N copies of the shipped
`submission-notification` three ways, each from `--concurrency` tasks:

- naive worker: per mail, render the template with plain Jinja2, build the
  message with `EmailMessage`, `aiosmtplib.send` it on a new connection (TCP,
  EHLO and, with STARTTLS, a TLS handshake per mail) — what a straightforward
  worker does;
- naive, prebuilt: the same bytes rendered once, `aiosmtplib.send` per mail on
  a new connection: nothing but the cost of a connection per mail;
- formcraftd: N `email.send` jobs published to unique queues on the local
  RabbitMQ, then a Daemon started in this process (uvloop) and timed from
  "consuming" until the server has N mails: consume, render (sandboxed),
  build, check the suppression list, send over the kept-open pool, ack.

The naive loops share one TLS context, so only the handshakes differ. It
prints, per case, the median mails per second over `--rounds` rounds (each
round runs every case, interleaved, so that a burst of other load hits all of
them), the CPU time per mail of this process and of the SMTP server, and the
ratios of the medians; then it deletes the queues. Everything shares the
machine's CPUs with RabbitMQ and the SMTP server, as on a small VM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.policy
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aio_pika
import aiosmtplib
import jinja2
import orjson
import uvloop
from aiosmtpd.smtp import SMTP

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from formcraftd.amqp.connection import Broker
from formcraftd.amqp.topology import WorkerTopology
from formcraftd.amqp.topology import delete_topology as delete_declared
from formcraftd.core import config
from formcraftd.daemon import Daemon
from formcraftd.workers.email.templating import PACKAGE_TEMPLATES

AMQP_URL = os.environ.get("FORMCRAFTD_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
SENDER = "no-reply@bench.example"
SUBJECT = "New submission: Contact us"
DATA = {
    "form_name": "Contact us",
    "submitted_at": "2024-05-01 10:00 UTC",
    "submission_url": "https://app.formcraft.example/s/1",
    "answers": [
        {"label": "Name", "value": "Ada Lovelace"},
        {"label": "Email", "value": "ada@example.com"},
        {"label": "Message", "value": "I would like to know more about the engine. " * 5},
    ],
}


# --- the SMTP server (runs in its own process: `bench_email.py --serve`) ---------------------


def serve(cert: str, key: str) -> None:
    """Two aiosmtpd listeners; print their ports, then one line per accepted mail."""

    class Count:
        async def handle_DATA(self, _server: Any, _session: Any, _envelope: Any) -> str:
            sys.stdout.write("m\n")
            sys.stdout.flush()
            return "250 OK"

    async def run() -> None:
        loop = asyncio.get_running_loop()
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(cert, key)
        handler = Count()

        def plain() -> SMTP:
            return SMTP(handler, hostname="bench.local", loop=loop)

        def starttls() -> SMTP:
            return SMTP(
                handler, hostname="bench.local", tls_context=tls, require_starttls=True, loop=loop
            )

        servers = [
            await loop.create_server(plain, "127.0.0.1", 0, backlog=1024),
            await loop.create_server(starttls, "127.0.0.1", 0, backlog=1024),
        ]
        ports = [server.sockets[0].getsockname()[1] for server in servers]
        print("ready", *ports, flush=True)
        await asyncio.to_thread(sys.stdin.buffer.read)  # until the parent goes away

    asyncio.run(run())


class ServerProcess:
    """The SMTP server subprocess and the count of mails it accepted."""

    def __init__(self, process: asyncio.subprocess.Process, plain: int, tls: int) -> None:
        self.process = process
        self.plain_port, self.tls_port = plain, tls
        self.count = 0
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, cert: Path, key: Path) -> ServerProcess:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--serve",
            str(cert),
            str(key),
            stdin=subprocess.PIPE,  # the server exits when this closes, even if we crash
            stdout=subprocess.PIPE,
        )
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), timeout=30)
        _, plain, tls = line.decode().split()
        return cls(process, int(plain), int(tls))

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            if line == b"m\n":
                self.count += 1
                self._changed.set()

    async def wait_for(self, count: int, timeout: float = 300) -> None:
        async with asyncio.timeout(timeout):
            while self.count < count:
                self._changed.clear()
                await self._changed.wait()

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (Linux /proc)."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def stop(self) -> None:
        self._reader.cancel()
        if self.process.stdin is not None:
            self.process.stdin.close()
        with contextlib.suppress(ProcessLookupError):
            self.process.terminate()
        await self.process.wait()


def make_certificate(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


# --- the two contenders ---------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    label: str
    mails: int
    seconds: float
    connections: int
    client_cpu_s: float  # this process (the naive loop, or the whole daemon)
    server_cpu_s: float  # the aiosmtpd process

    @property
    def rate(self) -> float:
        return self.mails / self.seconds


class Stopwatch:
    """Wall time and the CPU time of this process and of the SMTP server, from now on.

    CPU per mail barely moves when other work shares the machine; mails per
    second does, so both are shown.
    """

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.wall = time.monotonic()
        self.client = time.process_time()
        self.server_cpu = server.cpu_seconds()

    def result(self, label: str, mails: int, connections: int) -> Result:
        return Result(
            label,
            mails,
            time.monotonic() - self.wall,
            connections,
            time.process_time() - self.client,
            self.server.cpu_seconds() - self.server_cpu,
        )


class NaiveWorker:
    """What a straightforward worker does per mail: render, build, connect, send, quit."""

    def __init__(self, fqdn: str) -> None:
        self.fqdn = fqdn
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(PACKAGE_TEMPLATES),
            autoescape=jinja2.select_autoescape(["html"]),
        )
        self.html = env.get_template("submission-notification.html")
        self.text = env.get_template("submission-notification.txt")

    def message(self, i: int) -> EmailMessage:
        context = {"data": DATA, "submission_id": f"sub-{i}", "subject": SUBJECT}
        message = EmailMessage()
        message["From"] = "FormCraft <no-reply@bench.example>"
        message["To"] = "owner@example.com"
        message["Subject"] = SUBJECT
        message["Message-ID"] = f"<naive-{i}@bench.example>"
        message.set_content(self.text.render(context))
        message.add_alternative(self.html.render(context), subtype="html")
        return message


async def run_naive(
    server: ServerProcess,
    port: int,
    security: str,
    args: argparse.Namespace,
    naive: NaiveWorker,
    *,
    prebuilt: bool,
) -> Result:
    """`aiosmtplib.send` per mail from `concurrency` tasks: a new connection every time.

    `prebuilt`: send one message's bytes over and over (no rendering or MIME
    work at all), which isolates the cost of a connection per mail.
    """
    tls = ssl.create_default_context() if security == "starttls" else None
    ready = naive.message(0).as_bytes(policy=email.policy.SMTP)

    async def send_one(i: int) -> None:
        options: dict[str, Any] = {
            "hostname": "127.0.0.1",
            "port": port,
            "start_tls": security == "starttls",
            "tls_context": tls,
            "local_hostname": naive.fqdn,
        }
        if prebuilt:
            recipients = ["owner@example.com"]
            await aiosmtplib.send(ready, sender=SENDER, recipients=recipients, **options)
        else:
            await aiosmtplib.send(naive.message(i), **options)

    async def worker(queue: asyncio.Queue[int]) -> None:
        while not queue.empty():
            await send_one(queue.get_nowait())

    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(args.n):
        queue.put_nowait(i)
    base = server.count
    watch = Stopwatch(server)
    async with asyncio.TaskGroup() as tg:
        for _ in range(args.concurrency):
            tg.create_task(worker(queue))
    await server.wait_for(base + args.n)
    label = f"naive, prebuilt ({security})" if prebuilt else f"naive worker ({security})"
    return watch.result(label, args.n, args.n)


def bench_config(port: int, security: str, args: argparse.Namespace, state: Path) -> config.Config:
    prefix = f"fcbench.{uuid.uuid4().hex[:10]}"
    workers: dict[str, Any] = {
        kind: {
            "enabled": kind == "email",
            "queue": f"{prefix}.{kind}_tasks",
            "dead_letter_exchange": f"{prefix}.dlx.{kind}",
        }
        for kind in config.WORKER_KINDS
    }
    workers["email"].update(
        concurrency=args.concurrency,
        smtp_host="127.0.0.1",
        smtp_port=port,
        smtp_security=security,
        from_address="FormCraft <no-reply@bench.example>",
        state_dir=str(state),
    )
    doc = {
        "broker": {"url": AMQP_URL, "connect_timeout_s": 10},
        "http": {"host": "127.0.0.1", "port": 0},
        "monitoring": {"enabled": False},
        "logging": {"level": "warning"},
        "workers": workers,
    }
    return config.parse_document(doc, source="bench", environ={})


async def run_formcraftd(
    server: ServerProcess, port: int, security: str, args: argparse.Namespace, state: Path
) -> Result:
    """Publish N jobs, start a daemon, time until the server has N mails."""
    cfg = bench_config(port, security, args, state)
    topology = WorkerTopology.build(cfg.workers.email, cfg.broker)
    connection = await aio_pika.connect_robust(AMQP_URL)
    try:
        await declare_and_publish(cfg, connection, topology, args.n)
        daemon = Daemon(cfg)
        task = asyncio.create_task(daemon.run())
        try:
            await asyncio.wait_for(daemon.started.wait(), timeout=30)
            base = server.count
            watch = Stopwatch(server)
            await server.wait_for(base + args.n)
            handler: Any = daemon.consumers[topology.main.name].handler
            result = watch.result(f"formcraftd ({security})", args.n, handler.pool.opened)
        finally:
            daemon.request_shutdown()
            await asyncio.wait_for(task, timeout=60)
    finally:
        with contextlib.suppress(Exception):
            await delete_topology(connection, topology)
        await connection.close()
    return result


async def declare_and_publish(
    cfg: config.Config,
    connection: aio_pika.abc.AbstractRobustConnection,
    topology: WorkerTopology,
    n: int,
) -> None:
    broker = Broker(cfg.broker)
    await broker.connect()
    try:
        await broker.declare(topology)
    finally:
        await broker.aclose()
    channel = await connection.channel(publisher_confirms=True)
    try:
        for i in range(n):
            body = {
                "type": "email.send",
                "payload": {
                    "to": ["owner@example.com"],
                    "subject": "New submission: {{ data.form_name }}",
                    "template": "submission-notification",
                    "data": DATA,
                },
                "metadata": {"formId": "form-bench", "submissionId": f"sub-{i}"},
            }
            await channel.default_exchange.publish(
                aio_pika.Message(orjson.dumps(body), message_id=f"bench-{i}"),
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


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--n", type=int, default=600, help="mails per case (default 600)")
    parser.add_argument("--concurrency", type=int, default=3, help="workers.email.concurrency")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians are shown")
    return parser.parse_args(argv)


CASES = ("naive worker", "naive, prebuilt", "formcraftd")


async def one_round(
    server: ServerProcess, args: argparse.Namespace, naive: NaiveWorker, folder: Path
) -> dict[tuple[str, str], Result]:
    """Every case once, the contenders interleaved so that a burst of load hits all of them."""
    results: dict[tuple[str, str], Result] = {}
    for security, port in (("none", server.plain_port), ("starttls", server.tls_port)):
        results[security, CASES[0]] = await run_naive(
            server, port, security, args, naive, prebuilt=False
        )
        results[security, CASES[1]] = await run_naive(
            server, port, security, args, naive, prebuilt=True
        )
        results[security, CASES[2]] = await run_formcraftd(
            server, port, security, args, folder / security
        )
    return results


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="fcbench-") as tmp:
        folder = Path(tmp)
        cert, key = make_certificate(folder)
        os.environ["SSL_CERT_FILE"] = str(cert)  # both sides trust the self-signed certificate
        naive = NaiveWorker(await asyncio.to_thread(socket.getfqdn))
        server = await ServerProcess.start(cert, key)
        print(
            f"{args.n} mails per case (the shipped submission-notification, "
            f"{len(naive.message(0).as_bytes())} bytes), concurrency {args.concurrency}, "
            f"{args.rounds} rounds, aiosmtpd in pid {server.process.pid}, {os.cpu_count()} CPUs"
        )
        rounds: list[dict[tuple[str, str], Result]] = []
        try:
            for number in range(args.rounds):
                rounds.append(await one_round(server, args, naive, folder / str(number)))
        finally:
            await server.stop()
    print_table(rounds)


def print_table(rounds: list[dict[tuple[str, str], Result]]) -> None:
    """Median rate per case over the rounds, and the ratios of the medians."""
    print(
        f"\n{'case':<28} {'mails/s':>8} {'each round':>22} {'connections':>12}"
        f" {'client CPU':>11} {'server CPU':>11}"
    )
    for security in ("none", "starttls"):
        medians: dict[str, float] = {}
        for case in CASES:
            results = [r[security, case] for r in rounds]
            medians[case] = statistics.median(r.rate for r in results)
            spread = " ".join(f"{r.rate:.0f}" for r in results)
            client = statistics.median(r.client_cpu_s / r.mails for r in results) * 1e6
            server = statistics.median(r.server_cpu_s / r.mails for r in results) * 1e6
            print(
                f"{case + f' ({security})':<28} {medians[case]:>8.0f} {spread:>22} "
                f"{results[0].connections:>12} {client:>8.0f} µs {server:>8.0f} µs"
            )
        for case in CASES[:2]:
            ratio = medians["formcraftd"] / medians[case]
            print(f"  formcraftd / {case:<18} {ratio:>6.2f}x")
        print()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        serve(sys.argv[2], sys.argv[3])
    else:
        uvloop.run(main(parse_args()))
