"""The suppression list: addresses that get no more mail, in SQLite under `state_dir`.

An address lands here when an SMTP server refused it with a 5xx, when a bounce
or a complaint arrives (:mod:`.bounces`), or when an operator adds it
(`formcraftd suppression add ADDRESS`); the email worker checks every recipient
against it before each send. Each entry has a `kind` (why: ``hard_bounce``,
``soft_bounce``, ``complaint`` or ``manual``), a `source` (``smtp``, ``imap``,
``mailgun``, ``postmark``, ``cli``, ``admin``), the job that bounced if known,
and an expiry for soft bounces: an expired entry no longer suppresses. It is a plain SQLite file
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

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import functools
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

from formcraftd.core.errors import FormcraftError
from formcraftd.workers.email.mime import HeaderRefused, address_key, parse_address

__all__ = [
    "DB_NAME",
    "KINDS",
    "Suppressed",
    "SuppressionError",
    "SuppressionKind",
    "SuppressionList",
    "SuppressionStore",
    "normalize_address",
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
    added_at TEXT NOT NULL,
    kind     TEXT NOT NULL DEFAULT 'manual',
    job_id   TEXT,
    expires_at TEXT
) WITHOUT ROWID
"""
# Columns added after the first release, with how existing rows are filled in.
_ADDED_COLUMNS = {
    "kind": (
        "ALTER TABLE suppressed ADD COLUMN kind TEXT NOT NULL DEFAULT 'manual'",
        "UPDATE suppressed SET kind = 'hard_bounce' WHERE source = 'smtp'",
    ),
    "job_id": ("ALTER TABLE suppressed ADD COLUMN job_id TEXT",),
    "expires_at": ("ALTER TABLE suppressed ADD COLUMN expires_at TEXT",),
}
_COLUMNS = "address, reason, status, source, added_at, kind, job_id, expires_at"
SuppressionKind = Literal["hard_bounce", "soft_bounce", "complaint", "manual"]
KINDS: tuple[str, ...] = get_args(SuppressionKind)
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
    source: str  # "smtp", "imap", "mailgun", "postmark", "cli" or "admin"
    added_at: str  # RFC 3339, UTC
    kind: str = "manual"  # one of KINDS
    job_id: str | None = None  # the job whose mail bounced, when known
    expires_at: str | None = None  # RFC 3339, UTC; None = until removed


def _iso(instant: float) -> str:
    return dt.datetime.fromtimestamp(instant, dt.UTC).isoformat(timespec="seconds")


def _epoch(iso: str | None) -> float | None:
    return None if iso is None else dt.datetime.fromisoformat(iso).timestamp()


def normalize_address(raw: str) -> str:
    """The key an address is stored under: its addr-spec (IDNA domain), case-folded.

    Raises ValueError for anything that is not one email address.
    """
    try:
        return address_key(parse_address(raw, "address"))
    except HeaderRefused as exc:
        raise ValueError(str(exc)) from None


def open_state_db(
    path: Path, what: str, create: Callable[[sqlite3.Connection], None]
) -> sqlite3.Connection:
    """One of the email worker's SQLite files, opened (and made, with `create`).

    Autocommit (each store opens its own transactions) and WAL, so that the
    daemon and the command line, or several daemons on one host, can share the
    file. A failure is a :class:`SuppressionError` naming `what`.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=5.0, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        create(db)
    except (OSError, sqlite3.Error) as exc:
        raise SuppressionError(f"{path}: cannot open {what}: {exc}") from None
    return db


def _create(db: sqlite3.Connection) -> None:
    """The table, and the columns a list made by an older release lacks."""
    db.execute(_SCHEMA)
    present = {row[1] for row in db.execute("PRAGMA table_info(suppressed)")}
    for column, statements in _ADDED_COLUMNS.items():
        if column not in present:
            for statement in statements:
                db.execute(statement)


class SuppressionStore:
    """The list itself, synchronous: one SQLite connection, used from one thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db = open_state_db(self.path, "the suppression list", _create)

    @classmethod
    def in_dir(cls, state_dir: str | Path) -> SuppressionStore:
        return cls(Path(state_dir) / DB_NAME)

    def close(self) -> None:
        self._db.close()

    def suppressed(self, addresses: Iterable[str]) -> set[str]:
        """Which of `addresses` (normalized keys) are on the list now."""
        keys = list(dict.fromkeys(addresses))
        found: set[str] = set()
        now = _iso(time.time())
        for start in range(0, len(keys), _LOOKUP_CHUNK):
            chunk = keys[start : start + _LOOKUP_CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = self._run(
                f"SELECT address FROM suppressed WHERE address IN ({marks})"
                " AND (expires_at IS NULL OR expires_at > ?)",
                [*chunk, now],
            )
            found.update(row[0] for row in rows)
        return found

    def add(
        self,
        address: str,
        *,
        reason: str,
        status: int | None = None,
        source: str,
        kind: SuppressionKind = "manual",
        job_id: str | None = None,
        expires_at: float | None = None,
    ) -> bool:
        """Put `address` on the list; False if it was already there (the entry is updated).

        An entry that expires (`expires_at`, unix time: a soft bounce) never
        replaces one that does not: a later soft bounce cannot shorten a hard one.
        """
        key = normalize_address(address)
        now = _iso(time.time())
        reason = " ".join(reason.split())[:_MAX_REASON]
        existed = bool(self.suppressed([key]))
        expires = None if expires_at is None else _iso(expires_at)
        self._run(
            f"INSERT INTO suppressed ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT(address) DO UPDATE SET reason = excluded.reason,"
            " status = excluded.status, source = excluded.source, kind = excluded.kind,"
            " job_id = excluded.job_id, expires_at = excluded.expires_at,"
            " added_at = excluded.added_at"
            " WHERE excluded.expires_at IS NULL OR suppressed.expires_at IS NOT NULL",
            (key, reason, status, source, now, kind, job_id, expires),
        )
        return not existed

    def remove(self, address: str) -> bool:
        """Take `address` off the list; False if it was not on it."""
        key = normalize_address(address)
        existed = bool(self._run("SELECT 1 FROM suppressed WHERE address = ?", (key,)))
        self._run("DELETE FROM suppressed WHERE address = ?", (key,))
        return existed

    def keys(self) -> dict[str, float | None]:
        """Every address on the list now, with when it stops being suppressed (None: never)."""
        rows = self._run(
            "SELECT address, expires_at FROM suppressed WHERE expires_at IS NULL OR expires_at > ?",
            (_iso(time.time()),),
        )
        return {address: _epoch(expires) for address, expires in rows}

    def prune(self) -> int:
        """Delete the entries that expired; how many."""
        before = self._db.total_changes
        self._run("DELETE FROM suppressed WHERE expires_at <= ?", (_iso(time.time()),))
        return self._db.total_changes - before

    def data_version(self) -> int:
        """Changes when another connection (the command line, another daemon) commits."""
        return int(self._run("PRAGMA data_version")[0][0])

    def entries(self, kind: str | None = None) -> list[Suppressed]:
        """The entries in force, oldest first; only those of `kind` if given."""
        where = "(expires_at IS NULL OR expires_at > ?)"
        params: list[Any] = [_iso(time.time())]
        if kind is not None:
            where += " AND kind = ?"
            params.append(kind)
        rows = self._run(
            f"SELECT {_COLUMNS} FROM suppressed WHERE {where} ORDER BY added_at, address", params
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
        self._keys: dict[str, float | None] = {}
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
            await self._call(store.prune)
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
        """Which of the normalized `keys` are on the list now."""
        now = time.time()
        found = set()
        for key in keys:
            if key in self._keys:
                expires = self._keys[key]
                if expires is None or expires > now:
                    found.add(key)
        return found

    async def add(
        self,
        address: str,
        *,
        reason: str,
        status: int | None,
        source: str,
        kind: SuppressionKind = "manual",
        job_id: str | None = None,
        expires_at: float | None = None,
    ) -> bool:
        """Put `address` on the list (see :meth:`SuppressionStore.add`)."""
        store = self._opened()
        add = functools.partial(
            store.add,
            address,
            reason=reason,
            status=status,
            source=source,
            kind=kind,
            job_id=job_id,
            expires_at=expires_at,
        )
        added = await self._call(add)
        key = normalize_address(address)
        if expires_at is None or (key in self._keys and self._keys[key] is None):
            self._keys[key] = None  # as the store does: an expiry never shortens a permanent entry
        else:
            self._keys[key] = expires_at
        return added

    async def entries(self, kind: str | None = None) -> list[Suppressed]:
        """The entries in force (for the admin API)."""
        return await self._call(self._opened().entries, kind)

    async def remove(self, address: str) -> bool:
        removed = await self._call(self._opened().remove, address)
        self._keys.pop(normalize_address(address), None)
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
