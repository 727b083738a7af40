"""The suppression list: addresses that get no more mail, in SQLite under `state_dir`.

An address lands here when an SMTP server refused it with a 5xx, or when an
operator adds it (`formcraftd suppression add ADDRESS`); the email worker
checks every recipient against it before each send. It is a plain SQLite file
(``<state_dir>/suppression.sqlite3``, WAL mode), so it survives restarts and the
command line can change it while the daemon runs.

Addresses are compared case-insensitively (the whole address is case-folded):
strictly the local part is case-sensitive, but no mail system that matters
treats it so, and a bounce for ``Ada@Example.com`` should stop ``ada@example.com``.

The daemon never touches SQLite on the event loop: :class:`SuppressionList`
runs the synchronous :class:`SuppressionStore` on one dedicated thread and
answers lookups from an in-memory copy that it keeps in step with the file.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import functools
import logging
import sqlite3
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson

from formcraftd.core.config import Config
from formcraftd.core.errors import FormcraftError
from formcraftd.workers.email.mime import HeaderRefused, address_key, parse_address

__all__ = [
    "DB_NAME",
    "Suppressed",
    "SuppressionError",
    "SuppressionList",
    "SuppressionStore",
    "add_cli",
    "normalize_address",
    "run_cli",
]

log = logging.getLogger("formcraftd.email")

DB_NAME = "suppression.sqlite3"
REFRESH_S = 1.0
_SCHEMA = """
CREATE TABLE IF NOT EXISTS suppressed (
    address  TEXT PRIMARY KEY,
    reason   TEXT NOT NULL,
    status   INTEGER,
    source   TEXT NOT NULL,
    added_at TEXT NOT NULL
) WITHOUT ROWID
"""
_LOOKUP_CHUNK = 500  # well under SQLite's limit on bound parameters
_MAX_REASON = 500

T = TypeVar("T")


class SuppressionError(FormcraftError):
    """The suppression list cannot be read or written."""


@dataclass(frozen=True, slots=True)
class Suppressed:
    """One address on the list, and why it is there."""

    address: str
    reason: str
    status: int | None  # the SMTP code that put it here, if any
    source: str  # "smtp" or "cli"
    added_at: str  # RFC 3339, UTC


def normalize_address(raw: str) -> str:
    """The key an address is stored under: its addr-spec (IDNA domain), case-folded.

    Raises ValueError for anything that is not one email address.
    """
    try:
        return address_key(parse_address(raw, "address"))
    except HeaderRefused as exc:
        raise ValueError(str(exc)) from None


class SuppressionStore:
    """The list itself, synchronous: one SQLite connection, used from one thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise SuppressionError(
                f"{self.path}: cannot open the suppression list: {exc}"
            ) from None

    @classmethod
    def in_dir(cls, state_dir: str | Path) -> SuppressionStore:
        return cls(Path(state_dir) / DB_NAME)

    def close(self) -> None:
        self._db.close()

    def suppressed(self, addresses: Iterable[str]) -> set[str]:
        """Which of `addresses` (normalized keys) are on the list."""
        keys = list(dict.fromkeys(addresses))
        found: set[str] = set()
        for start in range(0, len(keys), _LOOKUP_CHUNK):
            chunk = keys[start : start + _LOOKUP_CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = self._run(f"SELECT address FROM suppressed WHERE address IN ({marks})", chunk)
            found.update(row[0] for row in rows)
        return found

    def add(self, address: str, *, reason: str, status: int | None = None, source: str) -> bool:
        """Put `address` on the list; False if it was already there (its reason is updated)."""
        key = normalize_address(address)
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        reason = " ".join(reason.split())[:_MAX_REASON]
        existed = bool(self._run("SELECT 1 FROM suppressed WHERE address = ?", (key,)))
        self._run(
            "INSERT INTO suppressed (address, reason, status, source, added_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT(address) DO UPDATE SET"
            " reason = excluded.reason, status = excluded.status, source = excluded.source",
            (key, reason, status, source, now),
        )
        return not existed

    def remove(self, address: str) -> bool:
        """Take `address` off the list; False if it was not on it."""
        key = normalize_address(address)
        existed = bool(self._run("SELECT 1 FROM suppressed WHERE address = ?", (key,)))
        self._run("DELETE FROM suppressed WHERE address = ?", (key,))
        return existed

    def keys(self) -> set[str]:
        """Every address on the list."""
        return {row[0] for row in self._run("SELECT address FROM suppressed")}

    def data_version(self) -> int:
        """Changes when another connection (the command line, another daemon) commits."""
        return int(self._run("PRAGMA data_version")[0][0])

    def entries(self) -> list[Suppressed]:
        rows = self._run(
            "SELECT address, reason, status, source, added_at FROM suppressed ORDER BY added_at"
        )
        return [Suppressed(*row) for row in rows]

    def _run(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._db.execute(sql, tuple(params)).fetchall()
        except sqlite3.Error as exc:
            raise SuppressionError(f"{self.path}: {exc}") from None


class SuppressionList:
    """The list for the event loop: an in-memory copy, with SQLite on its own thread.

    :meth:`suppressed` answers from memory, so checking every recipient of
    every job costs no I/O. The copy is loaded at :meth:`open`, updated by
    :meth:`add` and :meth:`remove` once SQLite has them, and reloaded when
    another process changed the file (checked every `refresh_s`): an address
    the command line adds is honoured within that time.
    """

    def __init__(self, state_dir: str | Path, *, refresh_s: float = REFRESH_S) -> None:
        self.path = Path(state_dir) / DB_NAME
        self.refresh_s = refresh_s
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._store: SuppressionStore | None = None
        self._keys: set[str] = set()
        self._version = 0
        self._refresher: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Open (and create if needed) the database; raises :class:`SuppressionError`."""
        if self._store is not None:
            return
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="formcraftd-suppression"
        )
        try:
            self._store = store = await self._call(SuppressionStore, self.path)
            self._version = await self._call(store.data_version)
            self._keys = await self._call(store.keys)
        except BaseException:
            await self.aclose()
            raise
        self._refresher = asyncio.create_task(self._refresh(), name="suppression-refresh")

    async def aclose(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        store, executor = self._store, self._executor
        self._store = self._executor = None
        if store is not None and executor is not None:
            await asyncio.get_running_loop().run_in_executor(executor, store.close)
        if executor is not None:
            executor.shutdown(wait=False)

    def suppressed(self, keys: Iterable[str]) -> set[str]:
        """Which of the normalized `keys` are on the list."""
        return {key for key in keys if key in self._keys}

    async def add(self, address: str, *, reason: str, status: int | None, source: str) -> bool:
        store = self._opened()
        added = await self._call(
            functools.partial(store.add, address, reason=reason, status=status, source=source)
        )
        self._keys.add(normalize_address(address))
        return added

    async def remove(self, address: str) -> bool:
        removed = await self._call(self._opened().remove, address)
        self._keys.discard(normalize_address(address))
        return removed

    async def _refresh(self) -> None:
        """Reload the copy whenever someone else changed the file."""
        while True:
            await asyncio.sleep(self.refresh_s)
            store = self._opened()
            try:
                version = await self._call(store.data_version)
                if version != self._version:
                    self._keys = await self._call(store.keys)
                    self._version = version
                    log.info("suppression list reloaded: %d addresses", len(self._keys))
            except SuppressionError as exc:
                log.error("cannot reload the suppression list: %s", exc)

    def _opened(self) -> SuppressionStore:
        if self._store is None:
            raise SuppressionError("the suppression list is not open")
        return self._store

    async def _call(self, func: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(func, *args))


# --- `formcraftd suppression list|add|remove` ------------------------------------------


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register `suppression list|add|remove` on the command line's subparsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "suppression", help="list, add or remove addresses that get no email"
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=None,
        help="config file (default: $FORMCRAFTD_CONFIG, else ./config.toml)",
    )
    actions = parser.add_subparsers(dest="suppression_action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="print the suppressed addresses")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    add = actions.add_parser("add", help="suppress an address")
    add.add_argument("address", metavar="ADDRESS")
    add.add_argument("--reason", default="added by an operator", help="why (kept with it)")
    remove = actions.add_parser("remove", help="let an address get email again")
    remove.add_argument("address", metavar="ADDRESS")
    for action in (listing, add, remove):  # `--config` after the action works too
        action.add_argument(
            "--config", metavar="PATH", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
    return parser


def run_cli(args: argparse.Namespace, config: Config) -> int:
    """Run one `suppression` action; 0 when done, 1 for bad input or an unusable list."""
    try:
        store = SuppressionStore.in_dir(config.workers.email.state_dir)
    except SuppressionError as exc:
        return _fail(str(exc))
    try:
        return _run_action(args, store)
    except ValueError as exc:
        return _fail(str(exc))
    except SuppressionError as exc:
        return _fail(str(exc))
    finally:
        store.close()


def _run_action(args: argparse.Namespace, store: SuppressionStore) -> int:
    action = args.suppression_action
    if action == "list":
        listed = 0
        for entry in store.entries():
            listed += 1
            if args.json:
                line = orjson.dumps(entry).decode()
            else:
                status = "" if entry.status is None else str(entry.status)
                line = "\t".join(
                    (entry.address, entry.added_at, status, entry.source, entry.reason)
                )
            sys.stdout.write(line + "\n")
        if not listed:  # on stderr: stdout stays one address per line, for scripts
            print(f"no suppressed addresses in {store.path}", file=sys.stderr)
        return 0
    if action == "add":
        added = store.add(args.address, reason=args.reason, status=None, source="cli")
        print(f"{normalize_address(args.address)} {'added' if added else 'was already suppressed'}")
        return 0
    if store.remove(args.address):
        print(f"{normalize_address(args.address)} removed")
        return 0
    return _fail(f"{normalize_address(args.address)} is not on the suppression list")


def _fail(message: str) -> int:
    print(f"formcraftd: {message}", file=sys.stderr)
    return 1
