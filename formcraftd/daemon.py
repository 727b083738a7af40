"""The daemon: start, supervise, reload, shut down in phases.

Start: connect (or give up after `connect_timeout_s`), declare the topology,
start the handlers and one consumer per enabled worker, the monitor and the
HTTP server; READY=1 once every consumer consumes. Signal handlers only set
flags: SIGTERM/SIGINT ask for a graceful stop (a second one forces it), SIGHUP
asks for a reload. Shutdown: stop consuming, let in-flight jobs finish until
`shutdown_timeout_s`, return the rest to their queues, then close everything
in reverse order of opening.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

import msgspec
from aio_pika.abc import AbstractChannel
from aiohttp import web

from formcraftd import __version__
from formcraftd.admin import AdminOperations
from formcraftd.amqp.connection import Broker
from formcraftd.amqp.consumer import Consumer
from formcraftd.amqp.events import EventPublisher
from formcraftd.amqp.topology import WorkerTopology, priority_warning
from formcraftd.core.bounces import BackgroundReader, BounceIntake
from formcraftd.core.breakers import BreakerRegistry, BreakerState
from formcraftd.core.config import AnyWorkerConfig, Config, WorkerKind
from formcraftd.core.errors import ConfigError
from formcraftd.core.events import Emit
from formcraftd.core.handler import Handler, HandlerFactory
from formcraftd.core.stats import QueueStats
from formcraftd.core.tracing import NO_TRACER, Tracer
from formcraftd.ops import logs, systemd
from formcraftd.ops.endpoints import EndpointHealth
from formcraftd.ops.http import build_app, start_server
from formcraftd.ops.metrics import Metrics
from formcraftd.ops.monitor import Monitor, QueueSample
from formcraftd.ops.reload import Reloader
from formcraftd.ops.reporting import AttemptLog

if TYPE_CHECKING:
    from formcraftd.workers.email.suppression import SuppressionList

log = logging.getLogger("formcraftd.daemon")

USER_AGENT = f"formcraftd/{__version__}"
EVENTS_DRAIN_S = 3.0
MAILBOX_RESTART_S = 30.0

# Each worker's handler class, imported only when the worker is enabled.
HANDLERS: dict[WorkerKind, tuple[str, str]] = {
    "webhook": ("formcraftd.workers.webhook", "WebhookHandler"),
    "email": ("formcraftd.workers.email", "EmailHandler"),
    "sheets": ("formcraftd.workers.sheets", "SheetsHandler"),
}


def handler_factory(kind: WorkerKind) -> HandlerFactory | None:
    """The handler class of one worker kind; None for kinds this build does not have."""
    module_name, class_name = HANDLERS[kind]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        return None
    factory: HandlerFactory = getattr(module, class_name)
    return factory


def check_config(config: Config) -> None:
    """Everything `run` and a reload check of `config` before using it (for check-config).

    Raises ConfigError naming the key when an enabled worker cannot use its section.
    """
    for kind, worker in config.enabled_workers():
        factory = handler_factory(kind)
        if factory is not None:
            _named(config, factory.check, worker)
    if config.tracing.enabled:
        tracing_module(config)


def tracing_module(config: Config) -> ModuleType:
    """formcraftd.ops.tracing, imported only with tracing on; ConfigError without the extra.

    An error rather than Sentry's warning: `[tracing] enabled = true` is an
    explicit choice in the config file, which check-config and the start refuse
    instead of running without the traces asked for.
    """
    try:
        return importlib.import_module("formcraftd.ops.tracing")
    except ImportError as exc:
        raise ConfigError(
            f"{config.source or 'config'}: tracing.enabled is true but OpenTelemetry cannot be "
            f"imported ({exc}); install the formcraftd[otel] extra"
        ) from None


def _named(config: Config, call: Callable[[Any], Any], section: AnyWorkerConfig) -> Any:
    """`call(section)`, with a ConfigError's message naming the config file."""
    try:
        return call(section)
    except ConfigError as exc:
        raise ConfigError(f"{config.source or 'config'}: {exc}") from None


def build_handler(
    kind: WorkerKind, worker: AnyWorkerConfig, *, emit: Emit | None = None
) -> Handler[Any] | None:
    """The handler for one worker kind; None for kinds this build does not have."""
    factory = handler_factory(kind)
    if factory is None:
        return None
    return factory(worker, user_agent=USER_AGENT, emit=emit)


class Daemon(AdminOperations):
    """One formcraftd process."""

    def __init__(
        self, config: Config, *, config_path: str | None = None, tracer: Tracer | None = None
    ) -> None:
        self.config = config
        self.config_path = config_path
        # None: OpenTelemetry when [tracing] enabled, started with the daemon.
        self.tracer: Tracer = tracer or NO_TRACER
        self._own_tracer = tracer is None
        self.metrics = Metrics(__version__)
        self.events = EventPublisher(config.events, config.broker, self.metrics.events_dropped)
        self.endpoints = EndpointHealth(self.events.emit if self.events.enabled else None)
        self.breakers = BreakerRegistry(
            config.breaker,
            on_change=self._breaker_changed,
            on_evict=self._breaker_evicted,
        )
        self.broker = Broker(config.broker, on_state=self._broker_state_changed)
        self.consumers: dict[str, Consumer] = {}
        self.kinds: dict[str, WorkerKind] = {}
        self.monitor = Monitor(config.monitoring, source=self, metrics=self.metrics)
        self.reloader = Reloader(
            self, on_result=lambda result: self.metrics.config_reloads.labels(result).inc()
        )
        self.http_runner: web.AppRunner | None = None
        self.started = asyncio.Event()
        self.started_at = time.time()
        self._should_exit = asyncio.Event()
        self._reload_requested = asyncio.Event()
        self._force_exit = False
        self._was_connected = False
        self._admin_channel: AbstractChannel | None = None
        self._closers: list[tuple[str, Callable[[], Awaitable[object]]]] = []
        self._bounces: BounceIntake | None = None  # the email worker's, when configured
        self._suppression: SuppressionList | None = None  # the email worker's

    # --- signals ------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.handle_exit, sig)
        loop.add_signal_handler(signal.SIGHUP, self._reload_requested.set)

    def handle_exit(self, sig: int | None = None) -> None:
        """First call: graceful shutdown. Second call: force it (no more waiting)."""
        if self._should_exit.is_set():
            self._force_exit = True
            log.warning("second stop signal: forcing shutdown")
            for consumer in self.consumers.values():
                consumer.stop(time.monotonic())
            return
        name = signal.Signals(sig).name if sig is not None else "request"
        log.info("shutting down (%s)", name)
        self._should_exit.set()

    def request_shutdown(self) -> None:
        self.handle_exit(None)

    def request_reload(self) -> None:
        self._reload_requested.set()

    # --- run ------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until asked to stop; raises BrokerUnreachable/TopologyError at start."""
        try:
            await self._start()
            async with asyncio.TaskGroup() as tg:
                consuming = [
                    tg.create_task(consumer.run(), name=f"consumer:{consumer.queue_name}")
                    for consumer in self.consumers.values()
                ]
                for consumer in self.consumers.values():
                    await consumer.subscribed.wait()
                # Modules, config and handlers live as long as the process: move them
                # out of the collector's sight so full collections stay short (p99).
                gc.collect()
                gc.freeze()
                self.started.set()
                systemd.notify("READY=1")
                log.info(
                    "formcraftd %s consuming %s; HTTP on %s (/healthz, /metrics, status page /)",
                    __version__,
                    ", ".join(self.consumers) or "nothing",
                    self.http_url(),
                )
                helpers = [
                    tg.create_task(self._watchdog(), name="watchdog"),
                    tg.create_task(self.monitor.run(), name="monitor"),
                    tg.create_task(self._reload_loop(), name="reload"),
                ]
                if self._bounces is not None and self._bounces.mailbox is not None:
                    mailbox = self._bounces.mailbox
                    helpers.append(tg.create_task(self._supervise(mailbox), name="bounces"))
                events = tg.create_task(self.events.run(), name="events")
                await self._should_exit.wait()
                systemd.notify("STOPPING=1")
                timeout = 0 if self._force_exit else self.config.daemon.shutdown_timeout_s
                for consumer in self.consumers.values():
                    consumer.stop(time.monotonic() + timeout)
                for task in helpers:
                    task.cancel()
                if consuming:
                    await asyncio.wait(consuming)
                # the events of the last jobs: a moment to publish them, no more
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0 if self._force_exit else EVENTS_DRAIN_S):
                        await self.events.drained()
                events.cancel()
        finally:
            await self._close()
        log.info("stopped")
        logs.flush()

    async def _start(self) -> None:
        if self._own_tracer and self.config.tracing.enabled:
            self._start_tracing()
        await self.broker.connect()
        self._closers.append(("broker", self.broker.aclose))
        for kind, worker in self.config.enabled_workers():
            await self._start_worker(kind, worker)
        self.http_runner = await start_server(
            build_app(self), self.config.http.host, self.config.http.port
        )
        self._closers.append(("http server", self.http_runner.cleanup))

    def _start_tracing(self) -> None:
        """OpenTelemetry, as the OTEL_* variables configure it; closed last."""
        tracer = tracing_module(self.config).start()
        self.tracer = tracer
        self._closers.append(("tracer", lambda: asyncio.to_thread(tracer.shutdown)))
        log.info("tracing on: OpenTelemetry spans exported as the OTEL_* variables say")

    async def _start_worker(self, kind: WorkerKind, worker: AnyWorkerConfig) -> None:
        emit = self.events.emit if self.events.enabled else None
        # Workers' own events (a 410 Gone, a refreshed token) go through the endpoint
        # health first, which remembers what the status page shows, then out if enabled.
        handler = build_handler(kind, worker, emit=self.endpoints.emit)
        if handler is None:
            log.warning(
                "the %s worker is not available in this build; %s is not consumed",
                kind,
                worker.queue,
            )
            return
        topology = WorkerTopology.build(worker, self.config.broker)
        if warning := priority_warning(kind, worker, self.config.broker):
            log.warning("%s", warning)
        await self.broker.declare(topology)
        await handler.start()
        self._closers.append((f"{kind} handler", handler.aclose))
        if kind == "email":
            self._suppression = getattr(handler, "suppression", None)
            intake = getattr(handler, "bounce_intake", None)
            if isinstance(intake, BounceIntake):
                self._bounces = intake
                self.metrics.watch_bounces(intake.counts)
        prefetch = handler.prefetch(worker.concurrency)
        self.kinds[worker.queue] = kind
        consumer = self.consumers[worker.queue] = Consumer(
            kind=kind,
            worker=worker,
            topology=topology,
            handler=handler,
            broker=self.broker,
            breakers=self.breakers,
            breaker_config=self.config.breaker,
            daemon_config=self.config.daemon,
            stats=QueueStats(),
            reporter=AttemptLog(emit),
            prefetch=prefetch,
            tracer=self.tracer,
        )
        self.metrics.watch_queue(
            worker.queue,
            consumer.stats,
            in_flight=lambda: consumer.in_flight,
            concurrency=lambda: consumer.limiter.limit,
            rate_limits=handler.rate_limits,
        )

    async def _close(self) -> None:
        """Close what was opened, in reverse order; log and continue on errors."""
        while self._closers:
            name, close = self._closers.pop()
            try:
                async with asyncio.timeout(10):
                    await close()
            except Exception as exc:
                log.warning("closing the %s failed: %s", name, exc)

    async def _watchdog(self) -> None:
        """WATCHDOG=1 from the event loop itself, so a blocked loop gets restarted."""
        interval = systemd.watchdog_interval()
        if interval is None:
            return
        while True:
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _supervise(self, mailbox: BackgroundReader) -> None:
        """The bounce mailbox reader; it retries its own failures, and a bug in it is
        logged and restarted here, never taking the daemon (or the queues) down."""
        while True:
            try:
                await mailbox.run()
            except Exception:
                log.exception("the bounce mailbox reader failed; restarting it")
            await asyncio.sleep(MAILBOX_RESTART_S)

    async def _reload_loop(self) -> None:
        while True:
            await self._reload_requested.wait()
            self._reload_requested.clear()
            await self.reload()

    async def reload(self) -> dict[str, Any]:
        """Re-read and apply the config file (SIGHUP and POST /admin/reload)."""
        return await self.reloader.reload()

    async def apply_config(self, new: Config) -> None:
        """Apply every live setting of `new`, or none (the reloader calls this).

        Everything that can refuse the new config does so first: each handler
        builds its new settings without applying them, and the wait queues a new
        retry schedule needs are declared (harmless if the reload then fails).
        Only then is anything swapped in, by steps that cannot fail.
        """
        commits = [
            _named(new, consumer.handler.prepare, new.worker(self.kinds[queue]))
            for queue, consumer in self.consumers.items()
        ]
        for queue in self.consumers:
            running = self.config.worker(self.kinds[queue])
            retry = new.worker(self.kinds[queue]).retry
            if retry != running.retry:  # new wait queues must exist before a retry uses them
                updated = msgspec.structs.replace(running, retry=retry)
                await self.broker.declare(WorkerTopology.build(updated, self.config.broker))
        for commit in commits:
            commit()
        logs.configure(new.logging)
        self.breakers.reconfigure(new.breaker)
        self.monitor.reconfigure(new.monitoring)
        for queue, consumer in self.consumers.items():
            consumer.reconfigure(new.worker(self.kinds[queue]), new.breaker, new.daemon)
        self.config = new
        for consumer in self.consumers.values():
            worker = new.worker(consumer.kind)
            try:
                await consumer.set_prefetch(consumer.handler.prefetch(worker.concurrency))
            except Exception as exc:  # the channel went; its next one has the new prefetch
                log.warning("%s: prefetch not changed now: %s", consumer.queue_name, exc)

    def http_url(self) -> str:
        """The base URL the HTTP server listens on (its real port when configured as 0)."""
        if self.http_runner is None:
            return "(not started)"
        for address in self.http_runner.addresses:
            if isinstance(address, tuple):
                host = str(address[0])
                return (
                    f"http://[{host}]:{address[1]}"
                    if ":" in host
                    else f"http://{host}:{address[1]}"
                )
        return "(not listening)"

    # --- state for health, status, the monitor ----------------------------------------

    def _breaker_changed(self, key: str, state: BreakerState) -> None:
        self.metrics.breaker_changed(key, state)
        breaker = self.breakers.peek(key)
        if breaker is not None:
            self.endpoints.breaker_changed(breaker, state)

    def _breaker_evicted(self, key: str) -> None:
        self.metrics.breaker_evicted(key)
        self.endpoints.forget(key)

    def _broker_state_changed(self, connected: bool) -> None:
        self.metrics.broker_connected.set(1 if connected else 0)
        if connected and self._was_connected:
            self.metrics.reconnects.inc()
        self._was_connected = self._was_connected or connected
        self.monitor.broker_state_changed(connected)

    @property
    def broker_connected(self) -> bool:
        return self.broker.connected

    def samples(self) -> Sequence[QueueSample]:
        return [
            QueueSample(name, c.stats.finished, c.stats.failed, c.oldest_in_flight_s())
            for name, c in self.consumers.items()
        ]

    async def monitor_channel(self) -> AbstractChannel:
        """A channel for passive declares and DLQ tools (reopened when closed)."""
        if self._admin_channel is None or self._admin_channel.is_closed:
            self._admin_channel = await self.broker.connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
        return self._admin_channel


async def run_daemon(config: Config, *, config_path: str | None = None) -> None:
    """Entry point for `formcraftd run`: signals handled, reload from `config_path`."""
    daemon = Daemon(config, config_path=config_path)
    daemon.install_signal_handlers()
    try:
        await daemon.run()
    finally:
        logs.flush()  # INFO lines may wait in the log buffer for up to 50 ms
