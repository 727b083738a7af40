"""The interface between the consumer and the workers.

A worker is a :class:`Handler`: it takes a typed job and either returns
(optionally saying what it delivered) or raises a job-fate exception from
:mod:`formcraftd.core.errors`. It knows nothing of AMQP; the consumer owns acks,
retries, dead letters and metrics, once, for every worker.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from formcraftd.core.events import Emit
from formcraftd.core.jobs import EmailJob, SheetsJob, WebhookJob
from formcraftd.core.ratelimits import DestinationLimits
from formcraftd.core.tracing import NO_TRACE, AttemptTrace

J = TypeVar("J", WebhookJob, EmailJob, SheetsJob)


class _NoSlot(contextlib.AbstractAsyncContextManager[None]):
    """The slot of a handler that does not batch: the consumer already holds one."""

    async def __aexit__(self, *_exc: object) -> None:
        return None


_NO_SLOT = _NoSlot()


@dataclass(frozen=True, slots=True)
class JobContext:
    """What a handler may know about the delivery besides the job itself.

    `slot` is the queue's concurrency limit for handlers that batch
    (`Handler.batching`): they hold it around each remote call only, so jobs
    waiting to join a batch do not occupy the queue's slots. `trace` is the
    attempt's tracing: remote calls go in its client spans (no-ops with tracing off).
    """

    job_id: str
    attempt: int  # 1 for the first try
    queue: str
    slot: contextlib.AbstractAsyncContextManager[None] = _NO_SLOT
    trace: AttemptTrace = NO_TRACE


class Delivered:
    """What a handler may report about a successful delivery (for delivery events).

    The snippet may be given as text or as a function that makes it: that runs
    once, and only if something reads `snippet` (a delivery event); most
    successes are never described, and masking a response costs a little.
    """

    __slots__ = ("_describe", "_snippet", "status")

    def __init__(
        self,
        status: int | None = None,
        snippet: str | None = None,
        *,
        describe: Callable[[], str | None] | None = None,
    ) -> None:
        self.status = status
        self._snippet = snippet
        self._describe = describe

    @property
    def snippet(self) -> str | None:
        if self._describe is not None:
            self._snippet, self._describe = self._describe(), None
        return self._snippet

    def __repr__(self) -> str:
        return f"Delivered(status={self.status!r})"


class Handler(Protocol[J]):
    """A worker: takes a typed job, returns on success or raises a job-fate exception.

    It knows nothing of AMQP. `breaker_key` names the remote service the job
    will call (`webhook:host:port`), so the consumer can consult its breaker.
    """

    kind: str
    job_type: type[J]
    # False: the consumer holds a concurrency slot for the whole of `handle`.
    # True: `handle` may wait to join a batch and holds `ctx.slot` around its remote call.
    batching: bool

    @property
    def rate_limits(self) -> DestinationLimits | None:
        """Per-destination rate limits (keyed by `breaker_key`) that the consumer waits
        for before a job takes a concurrency slot; None for a worker without them."""
        ...

    def prefetch(self, concurrency: int) -> int:
        """How many unacked messages the broker may push to this worker."""
        ...

    def prepare(self, config: Any) -> Callable[[], None]:
        """Validate and build a reloaded section (raise ConfigError if unusable), changing
        nothing; the returned call, which never raises, applies it."""
        ...

    def breaker_key(self, job: J) -> str: ...

    async def handle(self, job: J, ctx: JobContext) -> Delivered | None: ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...


class HandlerFactory(Protocol):
    """How the daemon builds a worker's handler: its config section, the User-Agent
    to send, and `emit` for the worker's own delivery events (None with events off)."""

    def __call__(self, config: Any, *, user_agent: str, emit: Emit | None) -> Handler[Any]: ...

    def check(self, config: Any) -> None:
        """Raise ConfigError if the section cannot be used (check-config, start, reload)."""
        ...
