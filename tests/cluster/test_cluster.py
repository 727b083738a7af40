"""Several daemons on a real three-node RabbitMQ cluster with quorum queues.

Skipped unless `FORMCRAFTD_CLUSTER_TESTS=1` (`make test-cluster`): the module
starts its own cluster (nodes fcc1, fcc2, fcc3 on 127.0.0.1:5701-5703), runs
formcraftd processes against it, and tears everything down afterwards.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import aiohttp
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from aiohttp import web

from formcraftd.amqp.connection import Broker as DaemonBroker
from formcraftd.amqp.topology import WorkerTopology
from formcraftd.core.errors import TopologyError
from formcraftd.workers.webhook.signing import webhook_id
from tests.cluster.cluster import RabbitCluster, unavailable_reason
from tests.support import Names, make_config, webhook_job
from tests.support.process import free_port, wait_exit, wait_healthy

_UNAVAILABLE = unavailable_reason()

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(
        os.environ.get("FORMCRAFTD_CLUSTER_TESTS") != "1",
        reason="starts a 3-node RabbitMQ cluster; run with `make test-cluster`",
    ),
    pytest.mark.skipif(_UNAVAILABLE is not None, reason=_UNAVAILABLE or ""),
    pytest.mark.timeout(600),
]

ADMIN_TOKEN = "cluster-test-token"
CONCURRENCY = 16
FAILOVER_JOBS = 5000
DEAD_LETTER_JOBS = 25
FLAKY_JOBS = 25
PHASE_JOBS = 4000

# Environment variables that formcraftd reads; the daemons must see only their config file.
_DAEMON_ENV_PREFIXES = (
    "RABBITMQ_",
    "FORMCRAFTD_",
    "WEBHOOK_",
    "EMAIL_",
    "SHEETS_",
    "WORKER_",
    "SMTP_",
    "GOOGLE_",
    "SENTRY_",
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[RabbitCluster]:
    """The cluster every test of this module shares; always torn down."""
    rabbit = RabbitCluster()
    try:
        rabbit.start()
        yield rabbit
    finally:
        rabbit.teardown()
        assert rabbit.alive() == [], "a cluster node outlived the tests"


# --- the webhook sink -----------------------------------------------------------------------


class Sink:
    """A webhook receiver on 127.0.0.1 that records the `webhook-id` of every delivery.

    `/ok` answers 200 (after `delay_s`), `/gone` 404, and `/flaky` 503 the
    first time it sees a webhook-id and 200 afterwards.
    """

    def __init__(self) -> None:
        self.ok: list[tuple[str, float]] = []  # (webhook-id, monotonic time) per 200 on /ok
        self.flaky_ok: list[str] = []
        self.flaky_refused: set[str] = set()
        self.gone: list[str] = []
        self.delay_s = 0.0
        self.port = 0
        self._runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    async def start(self) -> Sink:
        app = web.Application()
        app.router.add_post("/ok", self._ok)
        app.router.add_post("/gone", self._gone)
        app.router.add_post("/flaky", self._flaky)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def reset(self, delay_s: float = 0.0) -> None:
        self.ok.clear()
        self.delay_s = delay_s

    def ok_ids(self) -> set[str]:
        return {hook_id for hook_id, _ in self.ok}

    async def _ok(self, request: web.Request) -> web.Response:
        await request.read()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        self.ok.append((request.headers["webhook-id"], time.monotonic()))
        return web.Response(text="ok")

    async def _gone(self, request: web.Request) -> web.Response:
        await request.read()
        self.gone.append(request.headers["webhook-id"])
        return web.Response(status=404, text="gone")

    async def _flaky(self, request: web.Request) -> web.Response:
        await request.read()
        hook_id = request.headers["webhook-id"]
        if hook_id not in self.flaky_refused:
            self.flaky_refused.add(hook_id)
            return web.Response(status=503, text="try later")
        self.flaky_ok.append(hook_id)
        return web.Response(text="ok")


# --- publishing and inspecting, through a node that stays up -----------------------------


@dataclass
class Publisher:
    """The test's own AMQP connection to one node: confirmed publishes, dead-letter reads."""

    connection: AbstractConnection
    channel: AbstractChannel
    published: int = 0  # confirmed so far

    @classmethod
    async def connect(cls, url: str) -> Publisher:
        connection = await aio_pika.connect(
            url, client_properties={"connection_name": "cluster-test-publisher"}
        )
        channel = await connection.channel(publisher_confirms=True)
        return cls(connection, channel)

    async def publish(self, queue: str, jobs: list[tuple[str, bytes]], window: int = 250) -> None:
        """Publish `(job id, body)` pairs, `window` unconfirmed at a time."""
        for start in range(0, len(jobs), window):
            await asyncio.gather(
                *(
                    self.channel.default_exchange.publish(
                        aio_pika.Message(
                            body,
                            message_id=job_id,
                            content_type="application/json",
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        ),
                        routing_key=queue,
                    )
                    for job_id, body in jobs[start : start + window]
                )
            )
            self.published += len(jobs[start : start + window])

    async def take(self, queue: str, count: int, timeout: float) -> list[AbstractIncomingMessage]:
        """Take (and ack) at least `count` messages from `queue`, then whatever else is there."""
        channel = await self.connection.channel()
        taken: list[AbstractIncomingMessage] = []
        try:
            source = await channel.declare_queue(queue, passive=True)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                message = await source.get(no_ack=True, fail=False)
                if message is not None:
                    taken.append(message)
                elif len(taken) >= count:
                    break
                else:
                    await asyncio.sleep(0.1)
        finally:
            await channel.close()
        return taken

    async def close(self) -> None:
        await self.connection.close()


def jobs_for(url: str, count: int, tag: str) -> list[tuple[str, bytes]]:
    return [
        (uuid.uuid4().hex, webhook_job(url, form_id=f"form-{tag}", submission_id=f"{tag}-{i}"))
        for i in range(count)
    ]


def hook_ids(url: str, jobs: list[tuple[str, bytes]]) -> set[str]:
    return {webhook_id(job_id, url) for job_id, _ in jobs}


# --- daemons as processes ------------------------------------------------------------------


def write_config(path: Path, names: Names, *, url: str, port: int) -> Path:
    """A daemon config: quorum queues on the cluster, webhooks, and a single-active Sheets queue."""
    lines = [
        "[broker]",
        f'url = "{url}"',
        'queue_type = "quorum"',
        "connect_timeout_s = 30",
        "heartbeat_s = 10",
        "[http]",
        'host = "127.0.0.1"',
        f"port = {port}",
        f'admin_token = "{ADMIN_TOKEN}"',
        "[logging]",
        'level = "info"',
        "[daemon]",
        "shutdown_timeout_s = 10",
        "[monitoring]",
        "enabled = false",
        "[retry]",
        "initial_delay_ms = 200",
        "max_delay_ms = 800",
        "[workers.webhook]",
        f'queue = "{names.queue("webhook")}"',
        f'dead_letter_exchange = "{names.dlx("webhook")}"',
        f"concurrency = {CONCURRENCY}",
        "timeout_ms = 10000",
        'allowed_networks = ["127.0.0.1/32"]',
        "[workers.email]",
        "enabled = false",
        f'queue = "{names.queue("email")}"',
        f'dead_letter_exchange = "{names.dlx("email")}"',
        "[workers.sheets]",
        f'queue = "{names.queue("sheets")}"',
        f'dead_letter_exchange = "{names.dlx("sheets")}"',
        "concurrency = 1",
        "single_active_consumer = true",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Daemon:
    """One `formcraftd run` process."""

    label: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path
    queue: str

    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def admin(self, session: aiohttp.ClientSession, action: str) -> None:
        """Pause or resume the webhook queue through the admin API."""
        async with session.post(
            f"{self.base()}/admin/queues/{self.queue}/{action}",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as response:
            assert response.status == 200, await response.text()

    async def reconnects(self, session: aiohttp.ClientSession) -> float:
        async with session.get(f"{self.base()}/metrics") as response:
            text = await response.text()
        match = re.search(r"^formcraftd_reconnects_total (\S+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    async def healthy(self, session: aiohttp.ClientSession) -> bool:
        try:
            async with session.get(f"{self.base()}/healthz") as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def spawn_daemon(tmp_path: Path, label: str, names: Names, url: str) -> Daemon:
    port = free_port()
    config_file = write_config(tmp_path / f"{label}.toml", names, url=url, port=port)
    log = tmp_path / f"{label}.log"
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(_DAEMON_ENV_PREFIXES) and key != "DEBUG"
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "formcraftd", "run", "--config", str(config_file)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    return Daemon(label, process, port, log, names.queue("webhook"))


async def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, step: float = 0.05
) -> None:
    """Poll `condition()` until it is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(step)


def rate(deliveries: list[tuple[str, float]]) -> float:
    """Deliveries per second from the first to the last request."""
    times = sorted(at for _, at in deliveries)
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0


# --- the tests ---------------------------------------------------------------------------------


async def test_quorum_topology_is_replicated_on_every_node(cluster: RabbitCluster) -> None:
    """Every queue is quorum on all three nodes with safe dead-lettering; classic is refused."""
    names = Names(prefix=f"fcc.{uuid.uuid4().hex[:8]}")
    cfg = make_config(
        names,
        broker={"url": cluster.urls("fcc2", "fcc1", "fcc3"), "queue_type": "quorum"},
        sheets={"enabled": True, "single_active_consumer": True},
    )
    broker = DaemonBroker(cfg.broker)
    await broker.connect()
    try:
        assert broker.connection.url.port == cluster.node("fcc2").amqp_port  # the first URL
        topologies = [
            WorkerTopology.build(cfg.workers.webhook, cfg.broker),
            WorkerTopology.build(cfg.workers.sheets, cfg.broker),
        ]
        for topology in topologies:
            await broker.declare(topology)
    finally:
        await broker.aclose()

    rows = await asyncio.to_thread(
        cluster.list_queues, "fcc3", "name", "type", "leader", "members", "arguments"
    )
    queues = {row["name"]: row for row in rows}
    everyone = sorted(node.name for node in cluster.nodes)
    for topology in topologies:
        for spec in topology.queues():
            row = queues[spec.name]
            arguments = {name: value for name, _kind, value in row["arguments"]}
            assert row["type"] == "quorum", spec.name
            assert sorted(row["members"]) == everyone, spec.name
            assert row["leader"] == "fcc2@localhost", spec.name  # where it was declared
            if spec is not topology.dead_letter_queue:
                assert arguments["x-dead-letter-strategy"] == "at-least-once", spec.name
                assert arguments["x-overflow"] == "reject-publish", spec.name
        main = {name: value for name, _kind, value in queues[topology.main.name]["arguments"]}
        assert main["x-delivery-limit"] == cfg.broker.delivery_limit
    sheets = {name: value for name, _kind, value in queues[cfg.workers.sheets.queue]["arguments"]}
    assert sheets["x-single-active-consumer"] is True

    classic = make_config(names, broker={"url": cluster.urls("fcc1"), "queue_type": "classic"})
    broker = DaemonBroker(classic.broker)
    await broker.connect()
    try:
        with pytest.raises(TopologyError, match="already exists with other arguments"):
            await broker.declare(WorkerTopology.build(classic.workers.webhook, classic.broker))
    finally:
        await broker.aclose()


async def test_throughput_with_one_and_two_daemons(cluster: RabbitCluster, tmp_path: Path) -> None:
    """The same 4,000-job burst is delivered by one daemon, then by two; the rates are printed."""
    names = Names(prefix=f"fcc.{uuid.uuid4().hex[:8]}")
    sink = await Sink().start()
    publisher = await Publisher.connect(cluster.node("fcc1").url)
    daemons = [
        spawn_daemon(tmp_path, "a", names, cluster.urls("fcc1", "fcc2", "fcc3")),
        spawn_daemon(tmp_path, "b", names, cluster.urls("fcc2", "fcc3", "fcc1")),
    ]
    results: list[tuple[int, int, float, float]] = []
    try:
        await asyncio.gather(*(wait_healthy(daemon.port, timeout=60) for daemon in daemons))
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(daemon.admin(session, "pause") for daemon in daemons))
            for delay_ms in (0, 50):
                for count in (1, 2):
                    sink.reset(delay_ms / 1000)
                    jobs = jobs_for(sink.url("ok"), PHASE_JOBS, f"d{delay_ms}n{count}")
                    await publisher.publish(names.queue("webhook"), jobs)
                    active = daemons[:count]
                    await asyncio.gather(*(daemon.admin(session, "resume") for daemon in active))
                    await wait_until(
                        lambda: len(sink.ok) >= PHASE_JOBS, 180, f"{PHASE_JOBS} deliveries"
                    )
                    await asyncio.gather(*(daemon.admin(session, "pause") for daemon in active))
                    assert sink.ok_ids() == hook_ids(sink.url("ok"), jobs)
                    assert len(sink.ok) == PHASE_JOBS  # no duplicates without faults
                    times = [at for _, at in sink.ok]
                    results.append((delay_ms, count, rate(sink.ok), max(times) - min(times)))
        for daemon in daemons:
            daemon.process.send_signal(signal.SIGTERM)
        for daemon in daemons:
            assert await wait_exit(daemon.process, 30) == 0
    finally:
        for daemon in daemons:
            daemon.stop()
        await publisher.close()
        await sink.stop()

    print(f"\nthroughput on the 3-node cluster ({os.cpu_count()} CPUs, everything on one machine)")
    print(f"| receiver latency | daemons (concurrency {CONCURRENCY} each) | jobs/s | seconds |")
    print("|---|---|---|---|")
    for delay_ms, count, per_second, seconds in results:
        print(f"| {delay_ms} ms | {count} | {per_second:.0f} | {seconds:.1f} |")
    rates = {(delay_ms, count): per_second for delay_ms, count, per_second, _ in results}
    # Bound by the receiver's latency, a second daemon's concurrency slots add up.
    assert rates[50, 2] >= 1.3 * rates[50, 1]


async def test_a_node_and_a_daemon_die_mid_stream_and_nothing_is_lost(
    cluster: RabbitCluster, tmp_path: Path
) -> None:
    """A node stopped and a daemon SIGKILLed mid-stream lose none of 5,000 jobs or dead letters."""
    names = Names(prefix=f"fcc.{uuid.uuid4().hex[:8]}")
    queue = names.queue("webhook")
    sink = await Sink().start()
    started = time.monotonic()

    # Declared through fcc2 first, so every queue's leader is on the node that will stop.
    cfg = make_config(
        names,
        broker={"url": cluster.urls("fcc2"), "queue_type": "quorum"},
        sheets={"enabled": True, "single_active_consumer": True},
    )
    broker = DaemonBroker(cfg.broker)
    await broker.connect()
    try:
        for worker in (cfg.workers.webhook, cfg.workers.sheets):
            await broker.declare(WorkerTopology.build(worker, cfg.broker))
    finally:
        await broker.aclose()

    ok = jobs_for(sink.url("ok"), FAILOVER_JOBS, "ok")
    gone = jobs_for(sink.url("gone"), DEAD_LETTER_JOBS, "gone")
    flaky = jobs_for(sink.url("flaky"), FLAKY_JOBS, "flaky")
    # The failing jobs are spread over the middle third, so that their dead letters and
    # retries happen before, while and after the queues' leaders move off the stopped node.
    stream = list(ok)
    for i, job in enumerate(x for pair in zip(gone, flaky, strict=True) for x in pair):
        stream.insert(FAILOVER_JOBS // 3 + 100 + 30 * i, job)
    wanted = hook_ids(sink.url("ok"), ok)

    publisher = await Publisher.connect(cluster.node("fcc1").url)
    # a connects to fcc1 (stays up) and is killed; b connects to fcc2 (stopped) and fails over.
    a = spawn_daemon(tmp_path, "a", names, cluster.urls("fcc1", "fcc2", "fcc3"))
    b = spawn_daemon(tmp_path, "b", names, cluster.urls("fcc2", "fcc3", "fcc1"))
    stopped_node = False
    try:
        await asyncio.gather(wait_healthy(a.port, timeout=60), wait_healthy(b.port, timeout=60))
        ports = {
            row["port"]
            for row in await asyncio.to_thread(
                cluster.list_connections, "fcc1", "port", "client_properties"
            )
            if "formcraftd" in str(row["client_properties"])
        }
        assert ports == {cluster.node("fcc1").amqp_port, cluster.node("fcc2").amqp_port}
        sheets_consumers = [
            row
            for row in await asyncio.to_thread(
                cluster.list_consumers, "fcc1", "queue_name", "active"
            )
            if row["queue_name"] == names.queue("sheets")
        ]
        assert sorted(row["active"] for row in sheets_consumers) == [False, True]

        publishing = asyncio.create_task(publisher.publish(queue, stream))
        await wait_until(lambda: len(sink.ok) >= FAILOVER_JOBS // 3, 120, "a third delivered")
        killed_at, published_at = len(sink.ok), publisher.published
        a.process.send_signal(signal.SIGKILL)
        stopped_node = True
        await asyncio.to_thread(cluster.stop_app, "fcc2")
        stopped_at = len(sink.ok)
        await publishing
        await wait_until(lambda: wanted <= sink.ok_ids(), 180, "every job delivered", step=0.2)
        flaky_wanted = hook_ids(sink.url("flaky"), flaky)
        await wait_until(
            lambda: flaky_wanted <= set(sink.flaky_ok), 60, "every retried job delivered"
        )
        dead = await publisher.take(f"dlq.{queue}", DEAD_LETTER_JOBS, timeout=60)

        async with aiohttp.ClientSession() as session:
            assert await b.healthy(session)
            assert await b.reconnects(session) >= 1
        assert a.process.wait(timeout=10) == -signal.SIGKILL
        rows = await asyncio.to_thread(
            cluster.list_connections, "fcc1", "port", "client_properties"
        )
        b_port = {row["port"] for row in rows if "formcraftd" in str(row["client_properties"])}
        assert b_port == {cluster.node("fcc3").amqp_port}  # moved on from fcc2 to fcc3
        sheets_consumers = [
            row
            for row in await asyncio.to_thread(
                cluster.list_consumers, "fcc1", "queue_name", "active"
            )
            if row["queue_name"] == names.queue("sheets")
        ]
        assert [row["active"] for row in sheets_consumers] == [True]  # b took over

        await asyncio.to_thread(cluster.start_app, "fcc2")
        stopped_node = False
        everyone = sorted(node.name for node in cluster.nodes)
        assert sorted(await asyncio.to_thread(cluster.running_nodes, "fcc1")) == everyone
        for _ in range(60):  # the restarted node's replicas catch up and come back online
            rows = await asyncio.to_thread(cluster.list_queues, "fcc1", "name", "online")
            if all(sorted(row["online"]) == everyone for row in rows):
                break
            await asyncio.sleep(1)
        else:
            raise AssertionError(f"replicas still offline after fcc2 came back: {rows}")
        b.process.send_signal(signal.SIGTERM)
        assert await wait_exit(b.process, 30) == 0, b.log.read_text()[-3000:]
    finally:
        a.stop()
        b.stop()
        await publisher.close()
        await sink.stop()
        if stopped_node:
            await asyncio.to_thread(cluster.start_app, "fcc2")

    got = [hook_id for hook_id, _ in sink.ok]
    lost = wanted - set(got)
    duplicates = sum(n - 1 for n in Counter(got).values())
    dead_ids = {message.message_id for message in dead}
    codes = {(message.headers or {}).get("x-formcraft-error-code") for message in dead}
    print(
        f"\ncluster failover: {FAILOVER_JOBS} jobs, {len(set(got))} delivered, "
        f"{duplicates} duplicates, {len(lost)} lost; daemon a SIGKILLed at {killed_at} "
        f"delivered ({published_at} published), fcc2 stopped by {stopped_at}; "
        f"dead letters {len(dead_ids)}/{DEAD_LETTER_JOBS} ({len(dead)} messages), retried jobs "
        f"{len(set(sink.flaky_ok))}/{FLAKY_JOBS}; {time.monotonic() - started:.0f} s"
    )
    assert not lost
    # At most what the killed daemon and the cut-off connection had unacked (2 x prefetch each).
    assert duplicates <= 2 * 2 * 2 * CONCURRENCY
    assert dead_ids == {job_id for job_id, _ in gone}
    assert codes == {"HTTP_STATUS"}
