"""The stdout handler: buffers lines below WARNING briefly while an event loop runs.

A JSON line per job is written for every attempt; writing each on its own
costs a system call per job, so lines below WARNING wait in a buffer while an
event loop runs in the logging thread: one timer on that loop writes them out
within :data:`FLUSH_DELAY_S`, unless :data:`BUFFER_CHARS` pile up first. A
WARNING or worse is written at once, after the lines before it. Without a
running loop every line is written at once. ``flush()`` writes the buffer out
now; logging's own shutdown hook calls it at interpreter exit.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Final, TextIO

FLUSH_DELAY_S: Final = 0.05  # how long a line below WARNING may wait
BUFFER_CHARS: Final = 64 * 1024  # how much may wait


class StdoutHandler(logging.StreamHandler[TextIO]):
    """A buffering stream handler that, given no stream, writes to the *current* sys.stdout.

    Following sys.stdout (rather than keeping the object seen when it was made)
    keeps logging working when a test runner swaps the stream. Write errors go to
    :meth:`handleError`, as in any handler, and never reach the caller.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream if stream is not None else sys.stdout)
        self._follow_stdout = stream is None
        self._lines: list[str] = []  # formatted lines, without terminators
        self._chars = 0
        self._timer_loop: asyncio.AbstractEventLoop | None = None  # where a flush is due

    def emit(self, record: logging.LogRecord) -> None:
        """Format `record`, then buffer or write it (``handle()`` holds the lock)."""
        try:
            text = self.format(record)
        except RecursionError:  # as StreamHandler.emit: never swallowed
            raise
        except Exception:
            self.handleError(record)
            return
        if self._follow_stdout and self.stream is not sys.stdout:
            self._write_out()  # lines logged before the swap belong to the old stream
            self.stream = sys.stdout
        self._lines.append(text)
        self._chars += len(text)
        if record.levelno >= logging.WARNING or self._chars >= BUFFER_CHARS:
            self._write_out()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop in this thread to write the buffer out later
            self._write_out()
            return
        # One timer per buffer, on the loop of the thread that logs: a timer left on
        # a loop that has stopped since must not hold the lines of another one.
        if self._timer_loop is not loop:
            self._timer_loop = loop
            loop.call_later(FLUSH_DELAY_S, self._flush_due, loop)

    def flush(self) -> None:
        """Write out the buffered lines now."""
        self.acquire()
        try:
            self._write_out()
        finally:
            self.release()

    def _flush_due(self, loop: asyncio.AbstractEventLoop) -> None:
        self.acquire()
        try:
            if self._timer_loop is loop:
                self._timer_loop = None
            self._write_out()
        finally:
            self.release()

    def _write_out(self) -> None:
        """Write and flush the buffered lines, or report the failure (lock held)."""
        lines = self._lines
        if not lines:
            return
        self._lines = []
        self._chars = 0
        try:
            self.stream.write(self.terminator.join(lines) + self.terminator)
            self.stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(
                logging.makeLogRecord(
                    {"name": "formcraftd", "msg": "%d log lines lost", "args": (len(lines),)}
                )
            )
