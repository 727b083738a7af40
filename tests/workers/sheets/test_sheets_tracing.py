"""A Sheets API call is a client span under the first job's attempt, linked to the others."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import pytest
from opentelemetry.trace import SpanKind

from formcraftd.core import jobs
from formcraftd.core.config import SheetsWorkerConfig
from formcraftd.core.handler import JobContext
from formcraftd.core.jobs import SheetsJob
from formcraftd.core.limits import ResizableLimiter
from formcraftd.workers.sheets.handler import SheetsHandler
from tests.support.google import FakeGoogle, sheets_job_body
from tests.support.tracing import Traced

pytestmark = [pytest.mark.sheets, pytest.mark.timeout(30)]


@pytest.fixture
async def handler() -> AsyncIterator[tuple[SheetsHandler, FakeGoogle]]:
    """A started handler talking to the fake Google; both stopped afterwards."""
    google = await FakeGoogle().start()
    google.add_spreadsheet("sheet-1")
    section = google.sheets_config(requests_per_minute_per_user=60_000, requests_per_minute=60_000)
    handler = SheetsHandler(
        msgspec.convert(section, SheetsWorkerConfig), user_agent="formcraftd/test"
    )
    await handler.start()
    try:
        yield handler, google
    finally:
        await handler.aclose()
        await google.stop()


async def test_a_batched_call_is_one_span_linked_to_every_job_it_writes(
    handler: tuple[SheetsHandler, FakeGoogle], traced: Traced
) -> None:
    """Three jobs, one values.append: a child of the first attempt, linked to the other two."""
    sheets, google = handler
    refresh, access, expiry = google.add_user()
    slot = ResizableLimiter(3)

    async def run(n: int) -> None:
        decoded = jobs.decode(
            sheets_job_body(refresh_token=refresh, access_token=access, expiry_ms=expiry)
        )
        assert isinstance(decoded, SheetsJob)
        trace = traced.attempt(
            kind="sheets", queue="q", job_id=f"job-{n}", message_id=None, delivery_tag=n
        )
        with trace:
            await sheets.handle(decoded, JobContext(f"job-{n}", 1, "q", slot, trace))

    await asyncio.gather(*(run(n) for n in range(3)))
    assert len(google.calls) == 1
    [call] = [s for s in traced.spans() if s.kind is SpanKind.CLIENT]
    attempts = {
        s.attributes["formcraftd.job.id"]: s.context.span_id
        for s in traced.spans()
        if s.kind is SpanKind.CONSUMER and s.attributes
    }
    assert call.name == "sheets values.append"
    assert call.parent is not None
    assert call.parent.span_id == attempts["job-0"]
    assert [link.context.span_id for link in call.links] == [attempts["job-1"], attempts["job-2"]]
    assert call.attributes is not None
    assert call.attributes["http.response.status_code"] == 200
    assert call.attributes["formcraftd.sheets.jobs"] == 3
    assert access not in str(call.attributes)
