"""A bounded set of threads that render templates for the event loop, with a timeout.

A Python thread cannot be stopped from outside: a render that overruns its
timeout is abandoned, not killed, and keeps its thread until it returns. So
the threads are bounded (the worker's concurrency, one per job the consumer
runs at once): a caller waits for a thread that is busy with a live render,
the timeout counting only from the moment its own render starts, and is
refused at once (:class:`RenderThreadsBusy`) when every thread is held by an
abandoned render, instead of queueing behind renders that may never end.
They are daemon threads: `ThreadPoolExecutor` joins its threads at
interpreter exit, and a render stuck in a loop must not keep the daemon from
exiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from formcraftd.core.errors import FormcraftError

__all__ = ["RenderThreads", "RenderThreadsBusy"]

T = TypeVar("T")


class RenderThreadsBusy(FormcraftError):
    """No render thread can take a call: all are held by abandoned renders, or closed."""


@dataclass(slots=True)
class _Work(Generic[T]):
    call: Callable[[], T]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[T]
    returned: bool = field(default=False)  # the call is over, whoever still waits for it
    abandoned: bool = field(default=False)  # the caller gave up before the call was over


class RenderThreads:
    """At most `size` daemon threads running blocking calls for one event loop.

    The counts are kept on the event loop; the threads only run calls and
    hand the outcome back with `call_soon_threadsafe`.
    """

    def __init__(self, size: int, *, name: str = "email-render") -> None:
        self.size = size
        self._name = name
        self._work: queue.SimpleQueue[_Work[Any] | None] = queue.SimpleQueue()
        self._threads = 0
        self._busy = 0  # threads running a call, abandoned or not
        self._abandoned = 0  # calls whose caller gave up, still running
        self._freed = asyncio.Event()  # replaced each time it is set
        self._closed = False

    @property
    def busy(self) -> int:
        """Threads running a call, abandoned ones included."""
        return self._busy

    @property
    def abandoned(self) -> int:
        """Calls that overran their timeout (or whose caller was cancelled), still running."""
        return self._abandoned

    async def run(self, call: Callable[[], T], timeout_s: float) -> T:
        """`call()` in a render thread, TimeoutError after `timeout_s` of running.

        Waits while every thread is busy with live calls; raises
        :class:`RenderThreadsBusy` when the busy ones are all abandoned.
        """
        while self._busy >= self.size or self._closed:
            if self._closed:
                raise RenderThreadsBusy("the render threads are closed")
            if self._abandoned >= self.size:
                raise RenderThreadsBusy(
                    f"all {self.size} render threads are held by renders that overran their timeout"
                )
            await self._freed.wait()
        loop = asyncio.get_running_loop()
        work: _Work[T] = _Work(call, loop, loop.create_future())
        self._busy += 1
        if self._busy > self._threads:
            self._start_thread()
        self._work.put(work)
        try:
            async with asyncio.timeout(timeout_s):
                return await work.future
        except BaseException:  # the timeout, or the caller was cancelled
            if not work.returned:
                work.abandoned = True
                self._abandoned += 1
                self._wake()  # waiters may now have to give up
            raise

    def resize(self, size: int) -> None:
        """Allow `size` calls at once from now on (threads beyond it stay, idle)."""
        self.size = size
        self._wake()

    def close(self) -> None:
        """Accept no more calls; each thread exits once it has returned from its current one."""
        self._closed = True
        self._wake()
        for _ in range(self._threads):
            self._work.put(None)
        self._threads = 0

    def _start_thread(self) -> None:
        self._threads += 1
        thread = threading.Thread(target=self._serve, name=f"{self._name}-{self._threads}")
        thread.daemon = True
        thread.start()

    def _serve(self) -> None:
        while (work := self._work.get()) is not None:
            result: Any = None
            error: Exception | None = None
            try:
                result = work.call()
            except Exception as exc:  # handed to the caller
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop has closed meanwhile
                work.loop.call_soon_threadsafe(self._returned, work, result, error)

    def _returned(self, work: _Work[Any], result: Any, error: Exception | None) -> None:
        """On the loop: free the thread, then give the caller (if still there) the outcome."""
        self._busy -= 1
        work.returned = True
        if work.abandoned:
            self._abandoned -= 1
        elif work.future.done():
            pass  # cancelled just now; the caller is about to find out
        elif error is not None:
            work.future.set_exception(error)
        else:
            work.future.set_result(result)
        self._wake()

    def _wake(self) -> None:
        """Let every waiting caller look again."""
        self._freed.set()
        self._freed = asyncio.Event()
