"""What a later bounce needs to know: the jobs sent lately, and each address's soft bounces.

A bounce arrives minutes or days after its mail, and names the job only by a
token (the VERP return path, the Message-ID). The ledger keeps, for
`sent_memory_s`, each sent job's token, id, form id, submission id and
accepted recipients, so the bounce can be matched to the job (and the
bounced address checked to be one of its recipients), and so its delivery
event can name the form and submission. It also keeps the times of each
address's soft bounces within the policy's window.

It is a SQLite file beside the suppression list (``<state_dir>/bounces.sqlite3``),
used from one thread of its own, never from the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson

from formcraftd.workers.email.suppression import SuppressionError, open_state_db

__all__ = ["DB_NAME", "BounceLedger", "LedgerStore", "SentJob"]

DB_NAME = "bounces.sqlite3"
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS sent_jobs (
        token TEXT PRIMARY KEY,
        job_id TEXT NOT NULL,
        form_id TEXT,
        submission_id TEXT,
        recipients TEXT NOT NULL,
        sent_at REAL NOT NULL
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS sent_jobs_sent_at ON sent_jobs (sent_at)",
    "CREATE TABLE IF NOT EXISTS soft_bounces (address TEXT NOT NULL, at REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS soft_bounces_address ON soft_bounces (address, at)",
)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class SentJob:
    """A job whose mail went out: what its bounces and their events need."""

    token: str
    job_id: str
    form_id: str | None
    submission_id: str | None
    recipients: frozenset[str]  # suppression-list keys of the accepted recipients


def _create(db: sqlite3.Connection) -> None:
    for statement in _SCHEMA:
        db.execute(statement)


class LedgerStore:
    """The ledger, synchronous: one SQLite connection, used from one thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db = open_state_db(self.path, "the bounce ledger", _create)

    def close(self) -> None:
        self._db.close()

    def record_sent(self, job: SentJob, at: float) -> None:
        """Remember `job`; a retry of the same job adds its recipients to the first try's."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute(
                "SELECT recipients FROM sent_jobs WHERE token = ?", (job.token,)
            ).fetchone()
            recipients = set(job.recipients)
            if row is not None:
                recipients.update(orjson.loads(row[0]))
            self._db.execute(
                "INSERT OR REPLACE INTO sent_jobs VALUES (?, ?, ?, ?, ?, ?)",
                (
                    job.token,
                    job.job_id,
                    job.form_id,
                    job.submission_id,
                    orjson.dumps(sorted(recipients)).decode(),
                    at,
                ),
            )

    def find(self, tokens: Iterable[str]) -> SentJob | None:
        """The first of `tokens` that names a remembered job."""
        for token in dict.fromkeys(tokens):
            row = self._db.execute(
                "SELECT token, job_id, form_id, submission_id, recipients FROM sent_jobs"
                " WHERE token = ?",
                (token,),
            ).fetchone()
            if row is not None:
                _, job_id, form_id, submission_id, recipients = row
                return SentJob(
                    token, job_id, form_id, submission_id, frozenset(orjson.loads(recipients))
                )
        return None

    def soft_bounce(self, address: str, at: float, window_s: float) -> int:
        """Record a soft bounce of `address`; how many it had within the window, this one too."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("INSERT INTO soft_bounces VALUES (?, ?)", (address, at))
            row = self._db.execute(
                "SELECT COUNT(*) FROM soft_bounces WHERE address = ? AND at > ?",
                (address, at - window_s),
            ).fetchone()
        return int(row[0])

    def forget_soft_bounces(self, address: str) -> None:
        """Start counting afresh (the address was suppressed for them)."""
        self._db.execute("DELETE FROM soft_bounces WHERE address = ?", (address,))

    def prune(self, now: float, sent_memory_s: float, window_s: float) -> None:
        """Forget jobs older than `sent_memory_s` and soft bounces outside the window."""
        self._db.execute("DELETE FROM sent_jobs WHERE sent_at <= ?", (now - sent_memory_s,))
        self._db.execute("DELETE FROM soft_bounces WHERE at <= ?", (now - window_s,))


class BounceLedger:
    """The ledger for the event loop: every call runs on the ledger's own thread."""

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / DB_NAME
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._store: LedgerStore | None = None

    async def open(self) -> None:
        """Open (and create if needed) the file; raises :class:`SuppressionError`."""
        if self._store is not None:
            return
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="formcraftd-bounces"
        )
        try:
            self._store = await self._call(LedgerStore, self.path)
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        store, executor = self._store, self._executor
        self._store = self._executor = None
        if store is not None and executor is not None:
            await asyncio.get_running_loop().run_in_executor(executor, store.close)
        if executor is not None:
            executor.shutdown(wait=False)

    async def record_sent(self, job: SentJob, at: float) -> None:
        await self._call(self._opened().record_sent, job, at)

    async def find(self, tokens: Iterable[str]) -> SentJob | None:
        return await self._call(self._opened().find, list(tokens))

    async def soft_bounce(self, address: str, at: float, window_s: float) -> int:
        return await self._call(self._opened().soft_bounce, address, at, window_s)

    async def forget_soft_bounces(self, address: str) -> None:
        await self._call(self._opened().forget_soft_bounces, address)

    async def prune(self, now: float, sent_memory_s: float, window_s: float) -> None:
        await self._call(self._opened().prune, now, sent_memory_s, window_s)

    def _opened(self) -> LedgerStore:
        if self._store is None:
            raise SuppressionError("the bounce ledger is not open")
        return self._store

    async def _call(self, func: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, functools.partial(func, *args))
        except sqlite3.Error as exc:
            raise SuppressionError(f"{self.path}: {exc}") from None
