"""Batches: items with the same key that arrive close together share one flush.

``await batcher.submit(key, item, rows=..., size=...)`` adds the item to the open
batch of its key and returns (or raises) once that batch has been flushed and
the item's own outcome is known. The first item of a batch starts the window;
when it ends the batch is flushed as soon as the key's previous batch is done
(batches of one key are flushed one at a time, in the order they were opened,
so items reach the remote side in arrival order), and it keeps taking items
until then. A batch that reaches `max_rows` rows or `max_bytes` bytes closes at
once, and an item that would overflow it opens the next batch; an item larger
than the limits on its own goes out alone. A window of 0 closes every batch
at once, so each item goes alone.

A submitter cancelled before its batch is sent is taken out of it; once the
send has started it is too late and only its outcome is dropped. Flushes run in
tasks this object owns; :meth:`aclose` cancels those still running.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from formcraftd.core.errors import RetryLater

__all__ = ["Batcher", "FlushFunction"]

log = logging.getLogger("formcraftd.sheets")

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")

FlushFunction = Callable[[K, list[T]], Awaitable[list[BaseException | None]]]
"""Sends a batch; returns each item's outcome in order (None = success)."""


@dataclass(eq=False, slots=True)
class _Pending(Generic[T]):
    item: T
    rows: int
    size: int
    future: asyncio.Future[None]


@dataclass(eq=False, slots=True)
class _Batch(Generic[K, T]):
    key: K
    entries: list[_Pending[T]] = field(default_factory=list)
    rows: int = 0
    size: int = 0
    timer: asyncio.Task[None] | None = None  # the window, while it runs
    runner: bool = False  # a task will send it (maybe waiting for the key's turn)
    closed: bool = False  # takes no more items
    sent: bool = False  # its entries are on their way: too late to withdraw

    def add(self, pending: _Pending[T]) -> None:
        self.entries.append(pending)
        self.rows += pending.rows
        self.size += pending.size

    def remove(self, pending: _Pending[T]) -> None:
        self.entries.remove(pending)
        self.rows -= pending.rows
        self.size -= pending.size


@dataclass(eq=False, slots=True)
class _KeyTurn:
    """Whose turn it is to flush one key: a FIFO lock, dropped when nobody uses it."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


@dataclass(frozen=True, slots=True)
class _Limits:
    window_s: float
    max_rows: int
    max_bytes: int


class Batcher(Generic[K, T]):
    """Groups items by key for `window_s` and flushes each group with one call."""

    def __init__(
        self,
        flush: FlushFunction[K, T],
        *,
        window_s: float,
        max_rows: int,
        max_bytes: int,
    ) -> None:
        self._flush = flush
        self._limits = _Limits(window_s, max_rows, max_bytes)
        self._open: dict[K, _Batch[K, T]] = {}
        self._turns: dict[K, _KeyTurn] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def waiting(self) -> int:
        """Items in batches not yet flushed."""
        return sum(len(batch.entries) for batch in self._open.values())

    def reconfigure(self, *, window_s: float, max_rows: int, max_bytes: int) -> None:
        """New limits, for batches opened from now on."""
        self._limits = _Limits(window_s, max_rows, max_bytes)

    async def submit(self, key: K, item: T, *, rows: int, size: int) -> None:
        """Add `item` to its key's batch and wait for that batch's outcome for it."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        limits = self._limits
        pending = _Pending(item, rows, size, asyncio.get_running_loop().create_future())
        batch = self._open.get(key)
        if batch is not None and not _fits(batch, pending, limits):
            self._close(batch)
            batch = None
        if batch is None:
            batch = self._open[key] = _Batch(key)
            if limits.window_s > 0:
                batch.timer = self._spawn(self._flush_later(batch, limits.window_s))
        batch.add(pending)
        if limits.window_s <= 0 or batch.rows >= limits.max_rows or batch.size >= limits.max_bytes:
            self._close(batch)
        try:
            await pending.future
        except asyncio.CancelledError:
            if not batch.sent:
                self._withdraw(batch, pending)
            raise

    async def aclose(self) -> None:
        """Refuse new items; cancel pending timers and flushes and wait for them."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _withdraw(self, batch: _Batch[K, T], pending: _Pending[T]) -> None:
        batch.remove(pending)
        if batch.entries:
            return
        if batch.timer is not None:
            batch.timer.cancel()
            batch.timer = None
        if self._open.get(batch.key) is batch:
            del self._open[batch.key]

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _close(self, batch: _Batch[K, T]) -> None:
        """Take no more items into `batch`; make sure a task will send it."""
        if self._open.get(batch.key) is batch:
            del self._open[batch.key]
        if batch.closed:
            return
        batch.closed = True
        if not batch.runner:
            if batch.timer is not None:
                batch.timer.cancel()  # still in its window: runner is set when the window ends
                batch.timer = None
            batch.runner = True
            self._spawn(self._run(batch))

    async def _flush_later(self, batch: _Batch[K, T], window_s: float) -> None:
        await asyncio.sleep(window_s)
        batch.timer = None
        if batch.runner:
            return
        batch.runner = True
        await self._run(batch)

    async def _run(self, batch: _Batch[K, T]) -> None:
        """Wait for the key's earlier batches (FIFO), then send this one."""
        turn = self._turns.get(batch.key)
        if turn is None:
            turn = self._turns[batch.key] = _KeyTurn()
        turn.users += 1
        try:
            async with turn.lock:
                self._close(batch)
                batch.sent = True
                await self._run_now(batch)
        finally:
            turn.users -= 1
            if turn.users == 0:
                del self._turns[batch.key]

    async def _run_now(self, batch: _Batch[K, T]) -> None:
        """Flush the batch's live entries and hand each its outcome."""
        entries = [pending for pending in batch.entries if not pending.future.done()]
        if not entries:
            return
        try:
            outcomes = await self._flush(batch.key, [pending.item for pending in entries])
            if len(outcomes) != len(entries):
                raise RuntimeError(f"{len(outcomes)} outcomes for {len(entries)} items")
        except asyncio.CancelledError:
            _settle_all(
                entries, lambda: RetryLater("SHUTDOWN", "shut down while the batch was being sent")
            )
            raise
        except Exception as exc:
            log.exception("flushing a batch of %d failed unexpectedly", len(entries))
            name = type(exc).__name__
            _settle_all(entries, lambda: RetryLater("INTERNAL_ERROR", f"internal error: {name}"))
            return
        for pending, outcome in zip(entries, outcomes, strict=True):
            if pending.future.done():
                continue
            if outcome is None:
                pending.future.set_result(None)
            else:
                pending.future.set_exception(outcome)


def _fits(batch: _Batch[K, T], pending: _Pending[T], limits: _Limits) -> bool:
    if not batch.entries:
        return True
    return (
        batch.rows + pending.rows <= limits.max_rows
        and batch.size + pending.size <= limits.max_bytes
    )


def _settle_all(entries: list[_Pending[T]], failure: Callable[[], BaseException]) -> None:
    for pending in entries:
        if not pending.future.done():
            pending.future.set_exception(failure())
