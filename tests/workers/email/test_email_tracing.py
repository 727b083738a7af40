"""The SMTP transaction of an email job is a client span under the job's attempt."""

from __future__ import annotations

import dataclasses

import pytest
from opentelemetry.trace import SpanKind

from formcraftd.core.errors import RetryLater
from formcraftd.core.handler import JobContext
from tests.support.smtp import HandlerFactory, SmtpServer, email_job, job_context
from tests.support.tracing import Traced

pytestmark = [pytest.mark.email]


def traced_context(traced: Traced) -> JobContext:
    ctx = job_context()
    trace = traced.attempt(
        kind="email", queue=ctx.queue, job_id=ctx.job_id, message_id=None, delivery_tag=1
    )
    return dataclasses.replace(ctx, trace=trace)


async def test_an_smtp_send_is_a_client_span_naming_the_relay_and_no_address(
    smtp_server: SmtpServer,
    make_handler: HandlerFactory,
    traced: Traced,
) -> None:
    """The span has the relay's host and port and the recipient count, never an address."""
    handler = await make_handler(smtp_server)
    ctx = traced_context(traced)
    with ctx.trace:
        await handler.handle(email_job(), ctx)
    send, attempt = traced.spans()
    assert send.name == "smtp send"
    assert send.kind is SpanKind.CLIENT
    assert send.parent is not None
    assert send.parent.span_id == attempt.context.span_id
    attributes = dict(send.attributes or {})
    assert attributes["server.address"] == "127.0.0.1"
    assert attributes["server.port"] == smtp_server.port
    assert attributes["formcraftd.smtp.recipients"] == 1
    assert attributes["formcraftd.smtp.refused"] == 0
    assert "@" not in str(attributes)


async def test_an_unreachable_relay_marks_the_span_with_the_error_code(
    make_handler: HandlerFactory, traced: Traced
) -> None:
    """Connection refused: the span's error.type is SMTP_CONNECTION."""
    handler = await make_handler(None)
    ctx = traced_context(traced)
    with pytest.raises(RetryLater), ctx.trace:
        await handler.handle(email_job(), ctx)
    send, _attempt = traced.spans()
    assert send.attributes is not None
    assert send.attributes["error.type"] == "SMTP_CONNECTION"
