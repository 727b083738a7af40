"""Tracing end to end: a job published in the app's trace stays in it, retries included."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator, Sequence

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from formcraftd.amqp import dead_letters
from formcraftd.core.tracing import PREVIOUS_ATTEMPT_HEADER
from formcraftd.ops import tracing
from tests.conftest import DaemonFactory, ReceiverFactory
from tests.support import Broker, Names, make_config, sequence, webhook_job
from tests.support.tracing import Collector, clean_environment

pytestmark = pytest.mark.e2e

APP_TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
APP_SPAN_ID = "b7ad6b7169203331"
APP_TRACEPARENT = f"00-{APP_TRACE_ID}-{APP_SPAN_ID}-01"


class NotifyingExporter(InMemorySpanExporter):
    """Keeps finished spans and sets `changed` (the daemon ends spans in the loop's thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = asyncio.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = super().export(spans)
        self.changed.set()
        return result


class Spans:
    """The spans the daemon finished, kept in memory."""

    def __init__(self) -> None:
        self.exporter = NotifyingExporter()
        self.tracer = tracing.start(SimpleSpanProcessor(self.exporter))

    async def wait_for(
        self, kind: SpanKind, count: int, timeout: float = 15.0
    ) -> list[ReadableSpan]:
        """The first `count` finished spans of `kind`, in the order they ended."""
        async with asyncio.timeout(timeout):
            while True:
                self.exporter.changed.clear()
                found = [s for s in self.exporter.get_finished_spans() if s.kind is kind]
                if len(found) >= count:
                    return found[:count]
                await self.exporter.changed.wait()


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[Spans]:
    """A tracer exporting to memory (the machine's OTEL_* variables do not apply)."""
    clean_environment(monkeypatch)
    spans = Spans()
    yield spans
    spans.tracer.shutdown()


def span_id(span: ReadableSpan) -> str:
    return format(span.context.span_id, "016x")


async def test_the_receiver_sees_the_trace_id_the_app_sent(
    names: Names,
    amqp: Broker,
    receiver_factory: ReceiverFactory,
    start_daemon: DaemonFactory,
    spans: Spans,
) -> None:
    """A job published with a traceparent reaches the receiver in the same trace, under
    the request's client span, itself under the attempt's consumer span."""
    receiver = await receiver_factory(sequence(200))
    cfg = make_config(names)
    await start_daemon(cfg, tracer=spans.tracer)
    await amqp.publish(
        cfg.workers.webhook.queue,
        webhook_job(receiver.url + "?token=s3cret"),
        headers={"traceparent": APP_TRACEPARENT},
    )
    [request] = await receiver.wait_for(1)
    [attempt] = await spans.wait_for(SpanKind.CONSUMER, 1)
    [call] = await spans.wait_for(SpanKind.CLIENT, 1)
    version, trace_id, parent_id, _flags = request.headers["traceparent"].split("-")
    assert (version, trace_id) == ("00", APP_TRACE_ID)
    assert parent_id == span_id(call)
    assert call.parent is not None
    assert call.parent.span_id == attempt.context.span_id
    assert attempt.parent is not None
    assert format(attempt.parent.span_id, "016x") == APP_SPAN_ID
    assert call.attributes is not None
    assert call.attributes["http.response.status_code"] == 200
    assert call.attributes["server.address"] == "127.0.0.1"
    assert "s3cret" not in str(call.attributes["url.full"])
    assert attempt.attributes is not None
    assert attempt.attributes["messaging.destination.name"] == cfg.workers.webhook.queue
    assert attempt.attributes["formcraftd.job.outcome"] == "success"


async def test_a_retried_job_stays_in_its_trace_and_links_each_attempt_to_the_one_before(
    names: Names,
    amqp: Broker,
    receiver_factory: ReceiverFactory,
    start_daemon: DaemonFactory,
    spans: Spans,
) -> None:
    """503, 503, 200: three attempts under the app's span, each linked to the one before."""
    receiver = await receiver_factory(sequence(503, 503, 200))
    cfg = make_config(names)
    await start_daemon(cfg, tracer=spans.tracer)
    await amqp.publish(
        cfg.workers.webhook.queue,
        webhook_job(receiver.url),
        headers={"traceparent": APP_TRACEPARENT},
    )
    requests = await receiver.wait_for(3)
    attempts = await spans.wait_for(SpanKind.CONSUMER, 3)
    assert {r.headers["traceparent"].split("-")[1] for r in requests} == {APP_TRACE_ID}
    for span in attempts:
        assert span.parent is not None
        assert format(span.parent.span_id, "016x") == APP_SPAN_ID
    assert [s.attributes["formcraftd.job.attempt"] for s in attempts if s.attributes] == [1, 2, 3]
    outcomes = [s.attributes["formcraftd.job.outcome"] for s in attempts if s.attributes]
    assert outcomes == ["retry", "retry", "success"]
    assert attempts[0].attributes is not None
    assert attempts[0].attributes["error.type"] == "HTTP_STATUS"
    assert not attempts[0].links
    for before, after in itertools.pairwise(attempts):
        [link] = after.links
        assert link.context.span_id == before.context.span_id


async def test_a_dead_letter_carries_the_trace_for_a_replay(
    names: Names,
    amqp: Broker,
    receiver_factory: ReceiverFactory,
    start_daemon: DaemonFactory,
    spans: Spans,
) -> None:
    """The dead-lettered message keeps the app's traceparent and names its last attempt."""
    receiver = await receiver_factory(sequence(410))
    cfg = make_config(names)
    await start_daemon(cfg, tracer=spans.tracer)
    await amqp.publish(
        cfg.workers.webhook.queue,
        webhook_job(receiver.url),
        headers={"traceparent": APP_TRACEPARENT},
    )
    [dead] = await amqp.take(f"dlq.{cfg.workers.webhook.queue}", 1)
    [attempt] = await spans.wait_for(SpanKind.CONSUMER, 1)
    assert dead.headers["traceparent"] == APP_TRACEPARENT
    assert dead.headers[PREVIOUS_ATTEMPT_HEADER] == f"00-{APP_TRACE_ID}-{span_id(attempt)}-01"
    assert attempt.attributes is not None
    assert attempt.attributes["formcraftd.job.outcome"] == "dead_letter"
    assert attempt.attributes["error.type"] == "HTTP_STATUS"


async def test_a_replayed_dead_letter_continues_the_trace_linked_to_its_last_attempt(
    names: Names,
    amqp: Broker,
    receiver_factory: ReceiverFactory,
    start_daemon: DaemonFactory,
    spans: Spans,
) -> None:
    """410, then a replay from the DLQ and 200: both attempts under the app's span, the
    replayed one linked to the dead-lettered one."""
    receiver = await receiver_factory(sequence(410, 200))
    cfg = make_config(names)
    await start_daemon(cfg, tracer=spans.tracer)
    queue = cfg.workers.webhook.queue
    await amqp.publish(queue, webhook_job(receiver.url), headers={"traceparent": APP_TRACEPARENT})
    # The attempt's span ends once the dead letter is confirmed: it is in the DLQ by then.
    await spans.wait_for(SpanKind.CONSUMER, 1)
    channel = await amqp.connection.channel(publisher_confirms=True)
    try:
        assert (await dead_letters.replay(channel, queue)).replayed == 1
    finally:
        await channel.close()
    await receiver.wait_for(2)
    first, replayed = await spans.wait_for(SpanKind.CONSUMER, 2)
    assert replayed.context.trace_id == first.context.trace_id
    assert replayed.parent is not None
    assert format(replayed.parent.span_id, "016x") == APP_SPAN_ID
    [link] = replayed.links
    assert link.context.span_id == first.context.span_id
    assert replayed.attributes is not None
    assert replayed.attributes["formcraftd.job.outcome"] == "success"


async def test_a_daemon_with_tracing_enabled_exports_over_otlp_http(
    names: Names,
    amqp: Broker,
    receiver_factory: ReceiverFactory,
    start_daemon: DaemonFactory,
    collector: Collector,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """[tracing] enabled and OTEL_EXPORTER_OTLP_ENDPOINT: the attempt and the request
    reach the collector in the app's trace, under the service name of OTEL_SERVICE_NAME."""
    clean_environment(monkeypatch)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{collector.port}")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "formcraftd-e2e")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # export within 50 ms
    receiver = await receiver_factory(sequence(200))
    cfg = make_config(names, tracing={"enabled": True})
    await start_daemon(cfg)
    await amqp.publish(
        cfg.workers.webhook.queue,
        webhook_job(receiver.url),
        headers={"traceparent": APP_TRACEPARENT},
    )
    [request] = await receiver.wait_for(1)
    async with asyncio.timeout(15), collector.changed:
        await collector.changed.wait_for(lambda: len(collector.spans) >= 2)
    consumer, client = Span.SPAN_KIND_CONSUMER, Span.SPAN_KIND_CLIENT
    [attempt] = [span for span in collector.spans if span.kind == consumer]
    [call] = [span for span in collector.spans if span.kind == client]
    assert attempt.trace_id.hex() == call.trace_id.hex() == APP_TRACE_ID
    assert attempt.parent_span_id.hex() == APP_SPAN_ID
    assert call.parent_span_id == attempt.span_id
    assert request.headers["traceparent"].split("-")[2] == call.span_id.hex()
    assert collector.resources[0]["service.name"] == "formcraftd-e2e"
