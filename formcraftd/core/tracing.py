"""The tracing hooks the consumer and the workers call, whether tracing is on or not.

The consumer asks its :class:`Tracer` for an :class:`AttemptTrace` per attempt
(a consumer span when tracing is on) and hands it to the handler in
:attr:`JobContext.trace <formcraftd.core.handler.JobContext>`; the handler
wraps its remote calls in :meth:`AttemptTrace.client` spans. With tracing off
(the default) every hook is a method of a shared object that does nothing, so
no tracing library is imported or called. The OpenTelemetry implementation is
:mod:`formcraftd.ops.tracing`, which the daemon imports only when
``[tracing] enabled`` is true.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from types import TracebackType
from typing import Any, Protocol

__all__ = [
    "NO_TRACE",
    "NO_TRACER",
    "PREVIOUS_ATTEMPT_HEADER",
    "AttemptTrace",
    "AttributeValue",
    "ClientSpan",
    "Tracer",
]

AttributeValue = str | bool | int | float

PREVIOUS_ATTEMPT_HEADER = "x-formcraft-trace-previous"
"""AMQP header of a republished job: the W3C `traceparent` of the attempt before."""


class ClientSpan(Protocol):
    """One outgoing call (an HTTP request, an SMTP transaction), as a context manager.

    An exception leaving the block marks the span failed with the job-fate
    exception's code (else the exception's class name) as its error type.
    """

    def __enter__(self) -> ClientSpan: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def set_attribute(self, key: str, value: AttributeValue) -> None: ...

    def failed(self, error_type: str) -> None:
        """Mark the call failed (e.g. an HTTP status that is not 2xx) without an exception."""
        ...


class AttemptTrace(Protocol):
    """The tracing of one attempt of one job: a consumer span, or nothing."""

    def __enter__(self) -> AttemptTrace: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def client(
        self,
        name: str,
        describe: Callable[[], Mapping[str, AttributeValue]],
        *,
        carrier: MutableMapping[str, str] | None = None,
        links: Sequence[AttemptTrace] = (),
    ) -> ClientSpan:
        """A client span under this attempt, with the attributes `describe` returns
        (called only when the span is recorded, so it costs nothing with tracing off).

        The span's context is written into `carrier` (outgoing request headers)
        when one is given; `links` are other attempts the call serves too (a
        batched call)."""
        ...

    def carry(self, headers: dict[str, Any]) -> None:
        """Write the trace context into the headers of the job republished after this
        attempt (a retry, a delay, a dead letter), so the next attempt continues the trace."""
        ...

    def settled(self, outcome: str, failure: BaseException | None) -> None:
        """The attempt's outcome and, unless it succeeded, the failure that decided it."""
        ...


class Tracer(Protocol):
    """Starts the trace of each attempt."""

    def attempt(
        self,
        *,
        kind: str,
        queue: str,
        job_id: str,
        attempt: int,
        message_id: str | None,
        delivery_tag: int,
        body_size: int,
        headers: Mapping[str, Any] | None,
    ) -> AttemptTrace:
        """The trace of one attempt, continuing the context found in the message's headers."""
        ...


class _NoClientSpan:
    __slots__ = ()

    def __enter__(self) -> _NoClientSpan:
        return self

    def __exit__(self, *_exc: object) -> None:
        return None

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        return None

    def failed(self, error_type: str) -> None:
        return None


class _NoTrace:
    """The attempt trace with tracing off: every hook returns at once."""

    __slots__ = ()

    def __enter__(self) -> _NoTrace:
        return self

    def __exit__(self, *_exc: object) -> None:
        return None

    def client(
        self,
        name: str,
        describe: Callable[[], Mapping[str, AttributeValue]],
        *,
        carrier: MutableMapping[str, str] | None = None,
        links: Sequence[AttemptTrace] = (),
    ) -> ClientSpan:
        return _NO_CLIENT_SPAN

    def carry(self, headers: dict[str, Any]) -> None:
        return None

    def settled(self, outcome: str, failure: BaseException | None) -> None:
        return None


class _NoTracer:
    __slots__ = ()

    def attempt(
        self,
        *,
        kind: str,
        queue: str,
        job_id: str,
        attempt: int,
        message_id: str | None,
        delivery_tag: int,
        body_size: int,
        headers: Mapping[str, Any] | None,
    ) -> AttemptTrace:
        return NO_TRACE


_NO_CLIENT_SPAN = _NoClientSpan()
NO_TRACE: AttemptTrace = _NoTrace()
"""The attempt trace of every job while tracing is off."""
NO_TRACER: Tracer = _NoTracer()
"""The tracer while tracing is off (the default everywhere)."""
