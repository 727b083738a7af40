"""Tracing: OpenTelemetry spans for attempts and remote calls, exported over OTLP/HTTP."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import pytest
from opentelemetry.trace import SpanKind, StatusCode

from formcraftd.core import config
from formcraftd.core.errors import ConfigError, PermanentFailure, RetryLater
from formcraftd.core.tracing import NO_TRACE, NO_TRACER, PREVIOUS_ATTEMPT_HEADER
from formcraftd.daemon import check_config
from formcraftd.ops import tracing
from tests.support import tracing as support
from tests.support.tracing import Collector, Traced

APP_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
APP_SPAN_ID = "00f067aa0ba902b7"
APP_TRACEPARENT = f"00-{APP_TRACE_ID}-{APP_SPAN_ID}-01"


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No OTEL_* variable (nor proxy) of the machine running the tests applies."""
    support.clean_environment(monkeypatch)


def hex_id(value: int, digits: int) -> str:
    return format(value, f"0{digits}x")


def test_an_attempt_is_a_consumer_span_under_the_context_the_app_sent(traced: Traced) -> None:
    """The attempt's span continues the message's traceparent and tracestate, with the
    messaging attributes of RabbitMQ."""
    with traced.attempt({"traceparent": APP_TRACEPARENT, "tracestate": "app=1"}) as trace:
        trace.settled("success", None)
    [span] = traced.spans()
    assert span.kind is SpanKind.CONSUMER
    assert span.name == "process webhook_tasks"
    assert hex_id(span.context.trace_id, 32) == APP_TRACE_ID
    assert span.parent is not None
    assert hex_id(span.parent.span_id, 16) == APP_SPAN_ID
    assert span.context.trace_state.get("app") == "1"
    assert dict(span.attributes or {}) == {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "webhook_tasks",
        "messaging.message.id": "msg-1",
        "messaging.rabbitmq.message.delivery_tag": 7,
        "messaging.message.body.size": 123,
        "formcraftd.job.id": "job-1",
        "formcraftd.job.kind": "webhook",
        "formcraftd.job.attempt": 1,
        "formcraftd.job.outcome": "success",
    }
    assert span.status.status_code is StatusCode.UNSET


@pytest.mark.parametrize(
    ("outcome", "failure", "code"),
    [
        ("retry", RetryLater("HTTP_STATUS", "HTTP 503"), "HTTP_STATUS"),
        ("dead_letter", PermanentFailure("SSRF_BLOCKED", "refused"), "SSRF_BLOCKED"),
    ],
)
def test_a_failed_attempt_carries_the_jobs_error_code(
    traced: Traced, outcome: str, failure: Exception, code: str
) -> None:
    """A retry or a dead letter sets error.type to the job's error code and the status to ERROR."""
    with traced.attempt({}) as trace:
        trace.settled(outcome, failure)
    [span] = traced.spans()
    assert span.attributes is not None
    assert span.attributes["formcraftd.job.outcome"] == outcome
    assert span.attributes["error.type"] == code
    assert span.status.status_code is StatusCode.ERROR


def test_a_client_span_is_a_child_of_its_attempt_and_its_context_goes_out(traced: Traced) -> None:
    """A client span's traceparent replaces one the job set, in whatever case, in the headers;
    the tracestate goes along, the app's baggage does not."""
    headers = {"Content-Type": "application/json", "TraceParent": "00-stale"}
    incoming = {"traceparent": APP_TRACEPARENT, "tracestate": "app=1", "baggage": "user=ada"}
    with (
        traced.attempt(incoming) as trace,
        trace.client("POST", lambda: {"server.address": "hooks.example"}, carrier=headers) as call,
    ):
        call.set_attribute("http.response.status_code", 503)
        call.failed("503")
    client, attempt = traced.spans()
    assert client.kind is SpanKind.CLIENT
    assert client.parent is not None
    assert client.parent.span_id == attempt.context.span_id
    assert client.context.trace_id == attempt.context.trace_id
    assert client.attributes is not None
    assert client.attributes["server.address"] == "hooks.example"
    assert client.attributes["error.type"] == "503"
    assert "TraceParent" not in headers
    assert headers["tracestate"] == "app=1"
    assert "baggage" not in headers
    assert headers["traceparent"] == (f"00-{APP_TRACE_ID}-{hex_id(client.context.span_id, 16)}-01")


def test_an_exception_leaving_a_client_span_gives_its_error_type(traced: Traced) -> None:
    """A job-fate exception out of the call names its code; the span still ends."""
    with (
        pytest.raises(RetryLater),
        traced.attempt({}) as trace,
        trace.client("smtp send", dict),
    ):
        raise RetryLater("SMTP_CONNECTION", "connection refused")
    client, attempt = traced.spans()
    assert client.attributes is not None
    assert client.attributes["error.type"] == "SMTP_CONNECTION"
    assert attempt.attributes is not None
    assert attempt.attributes["error.type"] == "SMTP_CONNECTION"


def test_a_retried_job_keeps_its_trace_and_links_to_the_attempt_before(traced: Traced) -> None:
    """The republished headers keep the app's context and name the attempt that failed."""
    headers: dict[str, Any] = {"traceparent": APP_TRACEPARENT}
    with traced.attempt(headers) as first:
        republished = dict(headers)
        first.carry(republished)
    assert republished["traceparent"] == APP_TRACEPARENT
    with traced.attempt(republished, attempt=2):
        pass
    one, two = traced.spans()
    assert republished[PREVIOUS_ATTEMPT_HEADER] == (
        f"00-{APP_TRACE_ID}-{hex_id(one.context.span_id, 16)}-01"
    )
    assert two.parent is not None
    assert hex_id(two.parent.span_id, 16) == APP_SPAN_ID
    [link] = two.links
    assert link.context.span_id == one.context.span_id
    assert link.context.trace_id == one.context.trace_id


def test_a_job_without_a_context_continues_the_trace_of_its_first_attempt(
    traced: Traced,
) -> None:
    """With no traceparent from the app, the first attempt's context is carried."""
    with traced.attempt(None) as first:
        republished: dict[str, Any] = {}
        first.carry(republished)
    with traced.attempt(republished, attempt=2):
        pass
    one, two = traced.spans()
    assert one.parent is None
    assert two.context.trace_id == one.context.trace_id
    assert two.parent is not None
    assert two.parent.span_id == one.context.span_id


def test_hostile_trace_headers_start_a_new_trace(traced: Traced) -> None:
    """Undecodable or mistyped trace headers are ignored, never an error."""
    headers = {"traceparent": b"\xff\xfe not a traceparent", PREVIOUS_ATTEMPT_HEADER: 42}
    with traced.attempt(headers):
        pass
    [span] = traced.spans()
    assert span.parent is None
    assert not span.links


def test_a_batched_call_links_every_attempt_it_serves(traced: Traced) -> None:
    """One Sheets call for three jobs: a child of the first attempt, linked to the others."""
    first, second, third = (traced.attempt({}) for _ in range(3))
    with first.client("sheets values.append", dict, links=[second, third]):
        pass
    for attempt in (first, second, third):
        with attempt:
            pass
    call, *attempts = traced.spans()
    assert call.parent is not None
    assert call.parent.span_id == attempts[0].context.span_id
    assert [link.context.span_id for link in call.links] == [
        span.context.span_id for span in attempts[1:]
    ]


def test_attributes_are_not_built_for_a_span_the_sampler_drops(
    clean_environment: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OTEL_TRACES_SAMPLER=always_off: nothing recorded, and `describe` is never called."""
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    traced = Traced.start()

    def describe() -> dict[str, str]:
        raise AssertionError("describe called for a span that is not recorded")

    headers: dict[str, str] = {}
    attempt = traced.attempt()
    with attempt, attempt.client("POST", describe, carrier=headers):
        pass
    traced.tracer.shutdown()
    assert not traced.spans()
    flags = int(headers["traceparent"].rsplit("-", 1)[1], 16)
    assert not flags & 1  # the receiver is told the trace is not sampled


def test_the_service_is_named_formcraftd_unless_the_environment_names_it(
    clean_environment: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """service.name defaults to formcraftd; OTEL_SERVICE_NAME wins."""
    assert tracing.resource().attributes["service.name"] == "formcraftd"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "formcraftd-eu1")
    assert tracing.resource().attributes["service.name"] == "formcraftd-eu1"


def test_with_tracing_off_the_hooks_do_nothing() -> None:
    """NO_TRACER hands out NO_TRACE, whose client spans never call `describe`."""
    attempt = NO_TRACER.attempt(
        kind="webhook",
        queue="q",
        job_id="j",
        attempt=1,
        message_id=None,
        delivery_tag=1,
        body_size=0,
        headers={"traceparent": APP_TRACEPARENT},
    )
    assert attempt is NO_TRACE

    def describe() -> dict[str, str]:
        raise AssertionError("describe called with tracing off")

    headers: dict[str, Any] = {}
    with attempt, attempt.client("POST", describe, carrier=headers) as call:
        call.failed("500")
    attempt.carry(headers)
    assert headers == {}


def test_with_tracing_off_nothing_of_opentelemetry_is_imported() -> None:
    """The daemon, every worker and a config check load no OpenTelemetry module."""
    code = (
        "import sys\n"
        "import formcraftd.daemon, formcraftd.cli\n"
        "import formcraftd.workers.webhook, formcraftd.workers.email, formcraftd.workers.sheets\n"
        "from formcraftd.core import config\n"
        "formcraftd.daemon.check_config(config.Config())\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_tracing_enabled_without_the_extra_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """check-config and the start refuse [tracing] enabled when OpenTelemetry is missing."""
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    monkeypatch.delitem(sys.modules, "formcraftd.ops.tracing", raising=False)
    cfg = config.parse_document({"tracing": {"enabled": True}}, source="test.toml", environ={})
    with pytest.raises(ConfigError, match=r"^test.toml: tracing.enabled .*formcraftd\[otel\]"):
        check_config(cfg)


# --- OTLP/HTTP to a collector on loopback ------------------------------------------------


async def test_spans_are_exported_over_otlp_http_as_the_environment_says(
    clean_environment: None, collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OTEL_EXPORTER_OTLP_ENDPOINT and OTEL_SERVICE_NAME configure the exporter and resource."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{collector.port}")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "formcraftd-test")
    tracer = tracing.start()
    attempt = tracer.attempt(
        kind="webhook",
        queue="webhook_tasks",
        job_id="job-9",
        attempt=1,
        message_id="msg-9",
        delivery_tag=1,
        body_size=10,
        headers={"traceparent": APP_TRACEPARENT},
    )
    with attempt:
        attempt.settled("success", None)
    # The exporter blocks (requests) and the collector runs in this loop: from a thread.
    await asyncio.to_thread(tracer.shutdown)
    [request] = collector.requests
    [resource_spans] = request.resource_spans
    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert resource["service.name"] == "formcraftd-test"
    [scope_spans] = resource_spans.scope_spans
    assert scope_spans.scope.name == "formcraftd"
    [span] = scope_spans.spans
    assert span.name == "process webhook_tasks"
    assert span.trace_id.hex() == APP_TRACE_ID
    assert span.parent_span_id.hex() == APP_SPAN_ID
    assert span.kind == span.SPAN_KIND_CONSUMER
    attributes = {a.key: a.value for a in span.attributes}
    assert attributes["messaging.system"].string_value == "rabbitmq"
    assert attributes["messaging.message.id"].string_value == "msg-9"
