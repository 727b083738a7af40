"""Live reload (SIGHUP, POST /admin/reload): parse, validate, apply, or change nothing.

The whole file is read and validated first; a bad file is one ERROR line and
the running config stays. A good one is handed to the daemon, which applies
it live (:meth:`formcraftd.daemon.Daemon.apply_config`). Settings that only a
restart can change keep their running values (:func:`keeping_running`), so the
daemon's config always says what runs, and ``restart_needed`` lists the settings
whose file value differs from the running one: a setting changed and changed
back needs no restart. The result is kept for `/healthz` and
`/admin/status`, and counted in `formcraftd_config_reloads_total`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from formcraftd.core import config as config_module
from formcraftd.core.config import Config
from formcraftd.core.errors import FormcraftError
from formcraftd.ops import systemd

log = logging.getLogger("formcraftd.reload")

# Dotted prefixes of the settings a running daemon cannot change.
RESTART_ONLY = (
    "broker.",
    "http.host",
    "http.port",
    "events.",
    "tracing.",
    "logging.sentry_dsn",
    "logging.config_file",
    "workers.*.enabled",
    "workers.*.queue",
    "workers.*.dead_letter_exchange",
    "workers.*.dead_letter_ttl_ms",
    "workers.*.max_priority",
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


def keeping_running(new: Config, running: Config) -> Config:
    """`new`, with the running value of every restart-only setting it changes."""
    kept = needs_restart(changed_keys(running, new))
    if not kept:
        return new
    doc, now = msgspec.to_builtins(new), msgspec.to_builtins(running)
    for key in kept:
        *parents, leaf = key.split(".")
        source, target = now, doc
        for part in parents:
            source, target = source.get(part, {}), target.setdefault(part, {})
        if leaf in source:
            target[leaf] = source[leaf]
        else:
            target.pop(leaf, None)
    return msgspec.convert(doc, Config)


class Reconfigurable(Protocol):
    """What the reloader reloads: the daemon, through its own methods."""

    @property
    def config(self) -> Config: ...

    @property
    def config_path(self) -> str | None: ...

    async def apply_config(self, new: Config) -> None:
        """Apply every live setting of `new`; raise FormcraftError if it cannot be."""
        ...


class Reloader:
    """Performs reloads for one daemon, one at a time, and remembers the last result."""

    def __init__(
        self, target: Reconfigurable, *, on_result: Callable[[str], None] | None = None
    ) -> None:
        self._target = target
        self._on_result = on_result
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
            if self._on_result is not None:
                self._on_result(result["result"])
            return result

    async def _reload(self) -> dict[str, Any]:
        at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        target = self._target
        path = target.config_path
        try:
            if not path:
                raise FormcraftError("this daemon was not started from a config file")
            new = await asyncio.to_thread(config_module.load, path)
            keys = changed_keys(target.config, new)
            await target.apply_config(keeping_running(new, target.config))
        except FormcraftError as exc:
            log.error("config reload failed, keeping the running config: %s", exc)
            return {"result": "failure", "at": at, "error": str(exc)}
        restart = needs_restart(keys)
        if restart:
            log.warning("reloaded, but these settings need a restart: %s", ", ".join(restart))
        log.info("config reloaded (%d settings changed)", len(keys))
        return {"result": "success", "at": at, "changed": keys, "restart_needed": restart}
