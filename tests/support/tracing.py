"""A tracer whose spans end up in memory, for the tracing tests of every layer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from formcraftd.core.tracing import AttemptTrace
from formcraftd.ops import tracing
from formcraftd.ops.tracing import OtelTracer
from tests.support import serving

OTEL_VARIABLES = (
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_PROPAGATORS",
    "OTEL_SDK_DISABLED",
)


def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No OTEL_* variable (nor proxy) of the machine running the tests applies."""
    for name in (*OTEL_VARIABLES, "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)


@dataclass
class Traced:
    """A tracer whose spans end up in memory."""

    tracer: OtelTracer
    exporter: InMemorySpanExporter

    @classmethod
    def start(cls) -> Traced:
        """A tracer exporting to memory; call `tracer.shutdown()` when done."""
        exporter = InMemorySpanExporter()
        return cls(tracing.start(SimpleSpanProcessor(exporter)), exporter)

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def attempt(
        self,
        headers: dict[str, Any] | None = None,
        attempt: int = 1,
        *,
        kind: str = "webhook",
        queue: str = "webhook_tasks",
        job_id: str = "job-1",
        message_id: str | None = "msg-1",
        delivery_tag: int = 7,
        body_size: int = 123,
    ) -> AttemptTrace:
        """The trace of one attempt, as the consumer starts it."""
        return self.tracer.attempt(
            kind=kind,
            queue=queue,
            job_id=job_id,
            attempt=attempt,
            message_id=message_id,
            delivery_tag=delivery_tag,
            body_size=body_size,
            headers=headers,
        )


class Collector:
    """A stand-in for an OpenTelemetry collector on loopback: POST /v1/traces (protobuf)."""

    def __init__(self) -> None:
        self.port = 0
        self.requests: list[ExportTraceServiceRequest] = []
        self.changed = asyncio.Condition()  # notified after each export

    @property
    def spans(self) -> list[Any]:
        """Every span received, in the order they came."""
        return [
            span
            for request in self.requests
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]

    @property
    def resources(self) -> list[dict[str, str]]:
        """The resource attributes of each batch of spans received."""
        return [
            {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for request in self.requests
            for resource_spans in request.resource_spans
        ]

    async def handle(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        self.requests.append(ExportTraceServiceRequest.FromString(await request.read()))
        async with self.changed:
            self.changed.notify_all()
        return web.Response(content_type="application/x-protobuf", body=b"")


@contextlib.asynccontextmanager
async def running_collector() -> AsyncIterator[Collector]:
    """A collector serving on 127.0.0.1; stopped afterwards."""
    collector = Collector()
    app = web.Application()
    app.router.add_post("/v1/traces", collector.handle)
    async with serving(app) as collector.port:
        yield collector
