"""Live reload (SIGHUP, POST /admin/reload): parse, validate, apply, or change nothing.

The whole file is read and validated first; a bad file is one ERROR line and
the running config stays. A good one is applied live — concurrency (the
limiter resizes at once; a consumer whose prefetch changes is re-subscribed on
its own channel, so no message is lost or delivered twice), retry schedule (new
wait queues declared first), breakers, monitoring, logging and each handler's
own settings. Settings that only a restart can change are logged as such.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import TYPE_CHECKING, Any

import msgspec

from formcraftd import config as config_module
from formcraftd import logs, systemd
from formcraftd.broker import WorkerTopology
from formcraftd.config import Config
from formcraftd.errors import FormcraftError

if TYPE_CHECKING:
    from formcraftd.daemon import Daemon

log = logging.getLogger("formcraftd.reload")

# Dotted prefixes of the settings a running daemon cannot change.
RESTART_ONLY = (
    "broker.",
    "http.host",
    "http.port",
    "events.",
    "logging.sentry_dsn",
    "workers.*.enabled",
    "workers.*.queue",
    "workers.*.dead_letter_exchange",
    "workers.*.dead_letter_ttl_ms",
    "workers.sheets.single_active_consumer",
)


def changed_keys(old: Config, new: Config) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    changed: list[str] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(a.keys() | b.keys()):
                walk(a.get(key), b.get(key), f"{prefix}{key}.")
        elif a != b:
            changed.append(prefix.rstrip("."))

    walk(msgspec.to_builtins(old), msgspec.to_builtins(new), "")
    return [key for key in changed if key != "source"]


def needs_restart(keys: list[str]) -> list[str]:
    def matches(key: str, pattern: str) -> bool:
        parts, wanted = key.split("."), pattern.rstrip(".").split(".")
        if len(parts) < len(wanted):
            return False
        return all(w in ("*", p) for w, p in zip(wanted, parts, strict=False)) and (
            pattern.endswith(".") or len(parts) == len(wanted)
        )

    return [key for key in keys if any(matches(key, pattern) for pattern in RESTART_ONLY)]


class Reloader:
    """Performs reloads for one daemon, one at a time, and remembers the last result."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self._lock = asyncio.Lock()
        self.last: dict[str, Any] | None = None

    async def reload(self) -> dict[str, Any]:
        async with self._lock:
            systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={systemd.monotonic_usec()}")
            try:
                result = await self._reload()
            finally:
                systemd.notify("READY=1")
            self.last = result
            self._daemon.metrics.config_reloads.labels(result["result"]).inc()
            return result

    async def _reload(self) -> dict[str, Any]:
        at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        path = self._daemon.config_path
        try:
            if not path:
                raise FormcraftError("this daemon was not started from a config file")
            new = await asyncio.to_thread(config_module.load, path)
            keys = changed_keys(self._daemon.config, new)
            await self._apply(new)
        except FormcraftError as exc:
            log.error("config reload failed, keeping the running config: %s", exc)
            return {"result": "failure", "at": at, "error": str(exc)}
        restart = needs_restart(keys)
        if restart:
            log.warning("reloaded, but these settings need a restart: %s", ", ".join(restart))
        log.info("config reloaded (%d settings changed)", len(keys))
        return {"result": "success", "at": at, "changed": keys, "restart_needed": restart}

    async def _apply(self, new: Config) -> None:
        """Declare what the new config needs, then swap every live setting."""
        daemon = self._daemon
        for queue in daemon.consumers:
            running = daemon.config.worker(daemon.kinds[queue])
            retry = new.worker(daemon.kinds[queue]).retry
            if retry != running.retry:  # new wait queues must exist before a retry uses them
                updated = msgspec.structs.replace(running, retry=retry)
                await daemon.broker.declare(WorkerTopology.build(updated, daemon.config.broker))
        # Handlers first: they may still refuse a setting (ConfigError) before
        # anything else has changed.
        for queue, consumer in daemon.consumers.items():
            consumer.handler.reconfigure(new.worker(daemon.kinds[queue]))
        logs.configure(new.logging)
        daemon.breakers.reconfigure(new.breaker)
        daemon.monitor.reconfigure(new.monitoring)
        for queue, consumer in daemon.consumers.items():
            worker = new.worker(daemon.kinds[queue])
            consumer.reconfigure(worker, new.breaker, new.daemon)
            await consumer.set_prefetch(consumer.handler.prefetch(worker.concurrency))
        daemon.config = new
