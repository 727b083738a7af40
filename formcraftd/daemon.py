"""The daemon: start, supervise the consumers, shut down in phases.

Start: connect (or give up after `connect_timeout_s`), declare the topology,
start the HTTP server and the handlers, then run one consumer per enabled
worker inside an `asyncio.TaskGroup`. Signal handlers only set flags (the
first asks for a graceful stop, a second one forces it). Shutdown: stop
consuming, let in-flight jobs finish until `shutdown_timeout_s`, return the
rest to their queues, then close everything in reverse order of opening.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from formcraftd import __version__, systemd
from formcraftd.breakers import BreakerRegistry
from formcraftd.broker import Broker, WorkerTopology
from formcraftd.config import AnyWorkerConfig, Config, WorkerKind
from formcraftd.consumer import Consumer
from formcraftd.jobs import Handler
from formcraftd.metrics import Metrics
from formcraftd.web import build_app, start_server

log = logging.getLogger("formcraftd.daemon")

USER_AGENT = f"formcraftd/{__version__}"


# Each worker's handler class, imported only when the worker is enabled.
HANDLERS: dict[WorkerKind, tuple[str, str]] = {
    "webhook": ("formcraftd.workers.webhook", "WebhookHandler"),
    "email": ("formcraftd.workers.email", "EmailHandler"),
    "sheets": ("formcraftd.workers.sheets", "SheetsHandler"),
}


def build_handler(kind: WorkerKind, worker: AnyWorkerConfig) -> Handler[Any] | None:
    """The handler for one worker kind; None for kinds this build does not have."""
    module_name, class_name = HANDLERS[kind]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        return None
    handler: Handler[Any] = getattr(module, class_name)(worker, user_agent=USER_AGENT)
    return handler


class Daemon:
    """One formcraftd process."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics(__version__)
        self.breakers = BreakerRegistry(
            config.breaker,
            on_change=self.metrics.breaker_changed,
            on_evict=self.metrics.breaker_evicted,
        )
        self.broker = Broker(config.broker, on_state=self._broker_state_changed)
        self.consumers: dict[str, Consumer] = {}
        self.http_runner: web.AppRunner | None = None
        self.started = asyncio.Event()
        self._should_exit = asyncio.Event()
        self._force_exit = False
        self._was_connected = False
        self._handlers: list[Handler[Any]] = []
        self._closers: list[tuple[str, Callable[[], Awaitable[object]]]] = []

    # --- signals ------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.handle_exit, sig)

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

    # --- run ------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until asked to stop; raises BrokerUnreachable/TopologyError at start."""
        try:
            await self._start()
            async with asyncio.TaskGroup() as tg:
                for consumer in self.consumers.values():
                    tg.create_task(consumer.run(), name=f"consumer:{consumer.queue_name}")
                for consumer in self.consumers.values():
                    await consumer.subscribed.wait()
                self.started.set()
                systemd.notify("READY=1")
                log.info(
                    "formcraftd %s consuming %s",
                    __version__,
                    ", ".join(self.consumers) or "nothing",
                )
                watchdog = tg.create_task(self._watchdog(), name="watchdog")
                await self._should_exit.wait()
                systemd.notify("STOPPING=1")
                deadline = time.monotonic() + (
                    0 if self._force_exit else self.config.daemon.shutdown_timeout_s
                )
                for consumer in self.consumers.values():
                    consumer.stop(deadline)
                watchdog.cancel()
        finally:
            await self._close()
        log.info("stopped")

    async def _start(self) -> None:
        await self.broker.connect()
        self._closers.append(("broker", self.broker.aclose))
        for kind, worker in self.config.enabled_workers():
            handler = build_handler(kind, worker)
            if handler is None:
                log.warning(
                    "the %s worker is not available in this version; %s is not consumed",
                    kind,
                    worker.queue,
                )
                continue
            topology = WorkerTopology.build(worker, self.config.broker)
            await self.broker.declare(topology)
            await handler.start()
            self._closers.append((f"{kind} handler", handler.aclose))
            channel = await self.broker.channel(prefetch=handler.prefetch(worker.concurrency))
            self.consumers[worker.queue] = Consumer(
                worker=worker,
                topology=topology,
                handler=handler,
                channel=channel,
                breakers=self.breakers,
                breaker_config=self.config.breaker,
                daemon_config=self.config.daemon,
                metrics=self.metrics.queue(worker.queue),
            )
        self.http_runner = await start_server(
            build_app(self), self.config.http.host, self.config.http.port
        )
        self._closers.append(("http server", self.http_runner.cleanup))

    async def _close(self) -> None:
        """Close what was opened, in reverse order; log and continue on errors."""
        while self._closers:
            name, close = self._closers.pop()
            try:
                await asyncio.wait_for(close(), timeout=10)
            except Exception as exc:
                log.warning("closing the %s failed: %s", name, exc)

    async def _watchdog(self) -> None:
        interval = systemd.watchdog_interval()
        if interval is None:
            return
        while True:
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def request_shutdown(self) -> None:
        self.handle_exit(None)

    # --- state ----------------------------------------------------------------------

    def _broker_state_changed(self, connected: bool) -> None:
        self.metrics.broker_connected.set(1 if connected else 0)
        if connected and self._was_connected:
            self.metrics.reconnects.inc()
        self._was_connected = self._was_connected or connected

    def health(self) -> tuple[bool, dict[str, Any]]:
        connected = self.broker.connected
        queues = {
            name: {
                "state": consumer.state if connected else "disconnected",
                "consuming": connected and consumer.consuming,
                "in_flight": consumer.in_flight,
                "concurrency": consumer.limiter.limit,
            }
            for name, consumer in self.consumers.items()
        }
        healthy = (
            self.started.is_set()
            and not self._should_exit.is_set()
            and connected
            and all(q["consuming"] for q in queues.values())
        )
        body = {
            "status": "ok" if healthy else "unavailable",
            "version": __version__,
            "broker": {"connected": connected, "reconnects": self.broker.reconnects},
            "queues": queues,
            "last_reload": None,
        }
        return healthy, body

    def render_metrics(self) -> bytes:
        return self.metrics.render()


async def run_daemon(config: Config, *, handle_signals: bool = True) -> None:
    """Entry point for `formcraftd run`."""
    daemon = Daemon(config)
    if handle_signals:
        daemon.install_signal_handlers()
    await daemon.run()
