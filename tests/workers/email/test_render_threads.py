"""The render threads: off the event loop, bounded, and never in the way of exiting."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator

import pytest

from formcraftd.workers.email.render_threads import RenderThreads, RenderThreadsBusy

pytestmark = [pytest.mark.email]


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """An event that blocked calls wait for; set at the end so no thread is left waiting."""
    event = threading.Event()
    yield event
    event.set()


@pytest.fixture
def threads() -> Iterator[RenderThreads]:
    """Two render threads, closed afterwards."""
    render_threads = RenderThreads(2, name="test-render")
    yield render_threads
    render_threads.close()


async def test_a_call_runs_in_a_render_thread_and_returns_its_result(
    threads: RenderThreads,
) -> None:
    """The result comes back to the event loop; the work ran in another thread."""
    name = await threads.run(lambda: threading.current_thread().name, timeout_s=5)
    assert name.startswith("test-render-")
    assert threads.busy == 0


async def test_an_exception_in_the_call_reaches_the_caller(threads: RenderThreads) -> None:
    """Whatever the call raises is raised by `run`, and the thread is free again."""

    def fail() -> None:
        raise ValueError("bad template")

    with pytest.raises(ValueError, match="bad template"):
        await threads.run(fail, timeout_s=5)
    assert threads.busy == 0


async def test_threads_are_reused_and_never_more_than_the_size(threads: RenderThreads) -> None:
    """Many calls one after another are served by the threads already started."""
    names = {await threads.run(lambda: threading.current_thread().name, 5) for _ in range(20)}
    assert len(names) == 1
    assert threads.busy == 0


async def test_a_caller_waits_for_a_busy_thread_and_its_timeout_starts_with_its_call(
    release: threading.Event,
) -> None:
    """More callers than threads: the extra one waits, and the wait is not held against it."""
    threads = RenderThreads(1)
    try:
        first = asyncio.create_task(threads.run(release.wait, timeout_s=30))
        second = asyncio.create_task(threads.run(lambda: "second", timeout_s=0.05))
        with pytest.raises(TimeoutError):  # waiting longer than its own timeout, still fine
            await asyncio.wait_for(asyncio.shield(second), timeout=0.2)
        release.set()
        assert await first is True
        assert await second == "second"
    finally:
        threads.close()


async def test_an_overrunning_call_times_out_and_keeps_its_thread_until_it_returns(
    threads: RenderThreads, release: threading.Event
) -> None:
    """TimeoutError for the caller; the thread stays taken until the call returns."""
    with pytest.raises(TimeoutError):
        await threads.run(release.wait, timeout_s=0.05)
    assert threads.busy == 1
    assert await threads.run(lambda: "other thread", timeout_s=5) == "other thread"
    release.set()
    assert await threads.run(lambda: "after release", timeout_s=5) == "after release"


async def test_when_every_thread_is_taken_a_call_is_refused_at_once(
    threads: RenderThreads, release: threading.Event
) -> None:
    """With both threads held by abandoned calls, the next is RenderThreadsBusy, not queued."""
    for _ in range(2):
        with pytest.raises(TimeoutError):
            await threads.run(release.wait, timeout_s=0.05)
    with pytest.raises(RenderThreadsBusy, match="all 2 render threads"):
        await threads.run(lambda: None, timeout_s=5)
    threads.resize(3)
    assert await threads.run(lambda: "third", timeout_s=5) == "third"


async def test_closed_threads_accept_no_more_calls(threads: RenderThreads) -> None:
    """After close(), a call is refused instead of waiting for a thread that is gone."""
    await threads.run(lambda: None, timeout_s=5)
    threads.close()
    with pytest.raises(RenderThreadsBusy, match="closed"):
        await threads.run(lambda: None, timeout_s=5)


def test_a_stuck_render_does_not_keep_the_process_from_exiting() -> None:
    """A call that never returns is abandoned at exit: the interpreter does not wait for it."""
    program = textwrap.dedent(
        """
        import asyncio, threading
        from formcraftd.workers.email.render_threads import RenderThreads

        async def main():
            threads = RenderThreads(1)
            try:
                await threads.run(threading.Event().wait, timeout_s=0.05)
            except TimeoutError:
                print("abandoned", flush=True)

        asyncio.run(main())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=30, check=True
    )
    assert done.stdout == "abandoned\n"
