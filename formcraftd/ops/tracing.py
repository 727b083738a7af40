"""Tracing with OpenTelemetry: the implementation of :mod:`formcraftd.core.tracing`.

OpenTelemetry is the optional extra ``formcraftd[otel]``. The daemon imports
this module only when ``[tracing] enabled`` is true (and refuses to start, with
one line naming the extra, when it cannot), so with tracing off nothing of
OpenTelemetry is imported. Everything else is configured by the SDK's own ``OTEL_*`` variables:
the exporter's endpoint, headers and timeout, the service name and resource
attributes, the sampler, the batch processor and the propagators.

Each attempt of a job is a CONSUMER span (the OpenTelemetry messaging
conventions for RabbitMQ, operation ``process``), the child of the W3C trace
context found in the message's headers (``traceparent``, ``tracestate``) and
linked to the attempt before it (``x-formcraft-trace-previous``). A job
republished after an attempt (a retry, a delay, a dead letter) keeps the
context it came with, or gets this attempt's when it came with none, so every
attempt of a job, replays from the dead-letter queue included, is in one trace.
Remote calls are CLIENT spans under their attempt; the webhook request carries
its span's ``traceparent`` (and ``tracestate``, never ``baggage``) to the receiver.
Incoming context is read with the propagators of OTEL_PROPAGATORS (W3C trace
context and baggage by default).

Spans never carry a secret: URLs go through
:func:`~formcraftd.core.redaction.mask_url`, and no header or body is recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from types import TracebackType
from typing import Any, Self

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from formcraftd import __version__
from formcraftd.core.errors import JobFailure
from formcraftd.core.tracing import (
    PREVIOUS_ATTEMPT_HEADER,
    AttemptTrace,
    AttributeValue,
    ClientSpan,
)

__all__ = ["OtelTracer", "resource", "start"]

_W3C = TraceContextTextMapPropagator()


def resource() -> Resource:
    """The SDK's resource (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, ...), named
    `formcraftd` with this version unless the environment names it."""
    detected = Resource.create()
    ours: dict[str, AttributeValue] = {}
    if str(detected.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        ours[SERVICE_NAME] = "formcraftd"
    if SERVICE_VERSION not in detected.attributes:
        ours[SERVICE_VERSION] = __version__
    return detected.merge(Resource(ours)) if ours else detected


def start(processor: SpanProcessor | None = None) -> OtelTracer:
    """A tracer on a provider of its own, exporting over OTLP as the OTEL_* variables say.

    `processor` replaces the batch processor and its OTLP exporter (the tests
    give an in-memory exporter). The sampler is the SDK's default (parent-based,
    always on) unless OTEL_TRACES_SAMPLER names another.
    """
    provider = TracerProvider(resource=resource())
    provider.add_span_processor(processor or BatchSpanProcessor(OTLPSpanExporter()))
    return OtelTracer(provider)


class _HeadersGetter(Getter[Mapping[str, Any]]):
    """Reads W3C fields from AMQP headers (text; long strings may arrive as bytes)."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        if isinstance(value, bytes):
            value = value.decode("ascii", errors="replace")
        return [value] if isinstance(value, str) else None

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return list(carrier)


class _HeadersSetter(Setter[MutableMapping[str, Any]]):
    """Writes a field, replacing one of the same name in another case (HTTP headers)."""

    def set(self, carrier: MutableMapping[str, Any], key: str, value: str) -> None:
        lowered = key.lower()
        for name in [name for name in carrier if name.lower() == lowered and name != key]:
            del carrier[name]
        carrier[key] = value


_GETTER = _HeadersGetter()
_SETTER = _HeadersSetter()


def _traceparent(span: Span) -> str | None:
    """The span's context as a W3C `traceparent` value."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent")


def _previous_link(headers: Mapping[str, Any]) -> list[Link]:
    """A link to the attempt before, from its `traceparent` in our header."""
    value = _GETTER.get(headers, PREVIOUS_ATTEMPT_HEADER)
    if not value:
        return []
    context = _W3C.extract({"traceparent": value[0]})
    previous = trace.get_current_span(context).get_span_context()
    return [Link(previous, {"formcraftd.link": "previous_attempt"})] if previous.is_valid else []


def _error_type(exc: BaseException) -> str:
    return exc.code if isinstance(exc, JobFailure) else type(exc).__qualname__


def _failed(span: Span, error_type: str) -> None:
    """Mark `span` failed, with the job's error code (or the exception's name) as error.type."""
    span.set_attribute("error.type", error_type)
    span.set_status(Status(StatusCode.ERROR))


class _Scoped:
    """A span ended when the `with` block around it ends, failed if an exception leaves it."""

    __slots__ = ("_span",)

    def __init__(self, span: Span) -> None:
        self._span = span

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            _failed(self._span, _error_type(exc))
        self._span.end()


class _ClientSpan(_Scoped):
    __slots__ = ()

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        self._span.set_attribute(key, value)

    def failed(self, error_type: str) -> None:
        _failed(self._span, error_type)


class _AttemptSpan(_Scoped):
    """One attempt's CONSUMER span; ended when the `with` block around the attempt ends."""

    __slots__ = ("_continued", "_tracer")

    def __init__(self, tracer: trace.Tracer, span: Span, continued: bool) -> None:
        super().__init__(span)
        self._tracer = tracer
        self._continued = continued  # the message came with a valid trace context

    @property
    def span(self) -> Span:
        return self._span

    def client(
        self,
        name: str,
        describe: Callable[[], Mapping[str, AttributeValue]],
        *,
        carrier: MutableMapping[str, str] | None = None,
        links: Sequence[AttemptTrace] = (),
    ) -> ClientSpan:
        span = self._tracer.start_span(
            name,
            context=trace.set_span_in_context(self._span),
            kind=SpanKind.CLIENT,
            attributes=describe() if self._span.is_recording() else None,
            links=[
                Link(other.span.get_span_context())
                for other in links
                if isinstance(other, _AttemptSpan)
            ],
        )
        if carrier is not None:
            # W3C trace context only, whatever OTEL_PROPAGATORS says: the receiver is a
            # third party, and baggage (the app's own key-values) is not for it.
            _W3C.inject(carrier, context=trace.set_span_in_context(span), setter=_SETTER)
        return _ClientSpan(span)

    def carry(self, headers: dict[str, Any]) -> None:
        previous = _traceparent(self._span)
        if previous is not None:
            headers[PREVIOUS_ATTEMPT_HEADER] = previous
        if not self._continued:
            # A job that came without a (valid) context continues this attempt's trace.
            propagate.inject(headers, context=trace.set_span_in_context(self._span))

    def settled(self, outcome: str, failure: BaseException | None) -> None:
        span = self._span
        span.set_attribute("formcraftd.job.outcome", outcome)
        if failure is not None:
            span.set_attribute("error.type", _error_type(failure))
        if outcome in ("retry", "dead_letter"):
            span.set_status(Status(StatusCode.ERROR))


class OtelTracer:
    """The :class:`~formcraftd.core.tracing.Tracer` of the daemon with tracing on."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("formcraftd", __version__)

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
        carried = headers or {}
        parent: Context = propagate.extract(carried, getter=_GETTER)
        continued = trace.get_current_span(parent).get_span_context().is_valid
        attributes: dict[str, AttributeValue] = {
            "messaging.system": "rabbitmq",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": queue,
            "messaging.rabbitmq.message.delivery_tag": delivery_tag,
            "messaging.message.body.size": body_size,
            "formcraftd.job.id": job_id,
            "formcraftd.job.kind": kind,
            "formcraftd.job.attempt": attempt,
        }
        if message_id:
            attributes["messaging.message.id"] = message_id
        span = self._tracer.start_span(
            f"process {queue}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            links=_previous_link(carried),
        )
        return _AttemptSpan(self._tracer, span, continued)

    def shutdown(self) -> None:
        """Export what is queued and stop (blocking: run it in a thread from the loop)."""
        self.provider.shutdown()
