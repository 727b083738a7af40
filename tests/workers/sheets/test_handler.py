"""The Sheets handler against the fake Google on loopback (no broker involved)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest

from formcraftd.core import jobs
from formcraftd.core.config import SheetsWorkerConfig
from formcraftd.core.errors import PermanentFailure, RetryLater
from formcraftd.core.events import Emit, Event, TokenRefreshedEvent
from formcraftd.core.handler import JobContext
from formcraftd.core.jobs import SheetsJob
from formcraftd.core.limits import ResizableLimiter
from formcraftd.workers.sheets.api import load_discovery
from formcraftd.workers.sheets.batch import Batcher
from formcraftd.workers.sheets.handler import SheetsHandler
from tests.support.google import CLIENT_SECRET, Failure, FakeGoogle, sheets_job_body
from tests.support.process import free_port

pytestmark = [pytest.mark.sheets, pytest.mark.timeout(30)]

SHEET = "sheet-1"
HOUR_MS = 3_600_000


@pytest.fixture
async def google() -> AsyncIterator[FakeGoogle]:
    """The fake Google with one spreadsheet, stopped afterwards."""
    fake = await FakeGoogle().start()
    fake.add_spreadsheet(SHEET)
    yield fake
    await fake.stop()


HandlerFactory = Callable[..., Awaitable[SheetsHandler]]


@pytest.fixture
async def make_handler(google: FakeGoogle) -> AsyncIterator[HandlerFactory]:
    """Started handlers talking to the fake; closed afterwards."""
    handlers: list[SheetsHandler] = []

    async def make(*, emit: Emit | None = None, **overrides: Any) -> SheetsHandler:
        # Rate limits out of the way unless a test is about them.
        section = google.sheets_config(
            **{"requests_per_minute_per_user": 60_000, "requests_per_minute": 60_000, **overrides}
        )
        handler = SheetsHandler(
            msgspec.convert(section, SheetsWorkerConfig), user_agent="formcraftd/test", emit=emit
        )
        await handler.start()
        handlers.append(handler)
        return handler

    yield make
    for handler in handlers:
        await handler.aclose()


class Runner:
    """Runs jobs through a handler the way the consumer does: one task each, one slot."""

    def __init__(self, handler: SheetsHandler, concurrency: int = 2) -> None:
        self.handler = handler
        self.slot = ResizableLimiter(concurrency)
        self._ids = itertools.count(1)

    def context(self) -> JobContext:
        return JobContext(job_id=f"job-{next(self._ids)}", attempt=1, queue="q", slot=self.slot)

    async def run(self, job: SheetsJob) -> BaseException | None:
        """The job's outcome: None, or the job-fate exception it raised."""
        try:
            await self.handler.handle(job, self.context())
        except (PermanentFailure, RetryLater) as exc:
            return exc
        return None

    async def run_all(self, batch: list[SheetsJob]) -> list[BaseException | None]:
        """Start every job in order (as the consumer does) and gather their outcomes."""
        tasks = [asyncio.ensure_future(self.run(job)) for job in batch]
        return list(await asyncio.gather(*tasks))


def job(refresh: str, access: str = "", expiry_ms: int = 0, **fields: Any) -> SheetsJob:
    body = sheets_job_body(
        refresh_token=refresh, access_token=access, expiry_ms=expiry_ms, **fields
    )
    decoded = jobs.decode(body)
    assert isinstance(decoded, SheetsJob)
    return decoded


def now_ms() -> int:
    return int(time.time() * 1000)


# --- OAuth ---------------------------------------------------------------------


async def test_valid_job_token_is_used_without_refresh(
    google: FakeGoogle, make_handler: HandlerFactory
) -> None:
    """A job token with more than a minute left is sent as is."""
    refresh, access, expiry = google.add_user()
    outcome = await Runner(await make_handler()).run(job(refresh, access, expiry))
    assert outcome is None
    assert google.grants == []
    assert [call.token for call in google.calls] == [access]


async def test_expired_token_is_refreshed_before_the_call(
    google: FakeGoogle, make_handler: HandlerFactory
) -> None:
    """A job whose expiry_date has passed gets a fresh token before the Sheets call."""
    refresh, _, _ = google.add_user()
    outcome = await Runner(await make_handler()).run(job(refresh, "ya29.expired", now_ms() - 1000))
    assert outcome is None
    assert [grant.status for grant in google.grants] == [200]
    assert [call.status for call in google.calls] == [200]
    assert google.calls[0].token != "ya29.expired"


async def test_token_expiring_within_a_minute_is_refreshed(
    google: FakeGoogle, make_handler: HandlerFactory
) -> None:
    """A token with 30 s left counts as expired (the margin is 60 s)."""
    refresh, access, _ = google.add_user(lifetime_s=30)
    outcome = await Runner(await make_handler()).run(job(refresh, access, now_ms() + 30_000))
    assert outcome is None
    assert len(google.grants) == 1
    assert google.calls[0].token != access


async def test_401_triggers_one_refresh_and_one_retry(
    google: FakeGoogle, make_handler: HandlerFactory
) -> None:
    """A token Google no longer accepts is refreshed once and the call retried once."""
    refresh, _, _ = google.add_user()
    outcome = await Runner(await make_handler()).run(
        job(refresh, "ya29.revoked-by-google", now_ms() + HOUR_MS)
    )
    assert outcome is None
    assert [call.status for call in google.calls] == [401, 200]
    assert len(google.grants) == 1


async def test_401_with_a_fresh_token_is_auth_revoked(
    google: FakeGoogle, make_handler: HandlerFactory
) -> None:
    """When the retried call is refused too, the job fails as AUTH_REVOKED."""
    refresh, access, expiry = google.add_user()
    google.always = Failure(401, error_status="UNAUTHENTICATED", message="nope")
    outcome = await Runner(await make_handler()).run(job(refresh, access, expiry))
    assert isinstance(outcome, PermanentFailure)
    assert (outcome.code, outcome.status) == ("AUTH_REVOKED", 401)
    assert len(google.calls) == 2


async def test_concurrent_jobs_share_a_single_refresh(
    google: FakeGoogle, make_handler: HandlerFactory
) -> None:
    """Twenty concurrent calls with the same expired token cause one token request."""
    refresh, _, _ = google.add_user()
    google.token_delay_s = 0.2
    handler = await make_handler(batch_window_ms=0)
    batch = [job(refresh, "ya29.old", 1, range_=f"Sheet1!A{i}") for i in range(20)]
    outcomes = await Runner(handler, concurrency=20).run_all(batch)
    assert outcomes == [None] * 20
    assert len(google.grants) == 1
    assert len({call.token for call in google.calls}) == 1
    assert len(google.calls) == 20


async def test_cached_token_is_reused_by_later_jobs_with_the_stale_token(
    google: FakeGoogle, make_handler: HandlerFactory
) -> None:
    """A later job still carrying the expired token uses the cached fresh one."""
    refresh, _, _ = google.add_user()
    runner = Runner(await make_handler(batch_window_ms=0))
    assert await runner.run(job(refresh, "ya29.old", 1)) is None
    assert await runner.run(job(refresh, "ya29.old", 1)) is None
    assert len(google.grants) == 1
    assert google.calls[0].token == google.calls[1].token


async def test_invalid_grant_is_auth_revoked_without_a_sheets_call(
    google: FakeGoogle, make_handler: HandlerFactory
) -> None:
    """A revoked refresh token fails the job permanently as AUTH_REVOKED."""
    refresh, _, _ = google.add_user()
    google.revoke(refresh)
    outcome = await Runner(await make_handler()).run(job(refresh, "ya29.old", 1))
    assert isinstance(outcome, PermanentFailure)
    assert outcome.code == "AUTH_REVOKED"
    assert not outcome.reached_service
    assert google.calls == []


async def test_concurrent_jobs_share_one_invalid_grant(
    google: FakeGoogle, make_handler: HandlerFactory
) -> None:
    """Calls waiting for a refresh that ends in invalid_grant all fail without asking again."""
    refresh, _, _ = google.add_user()
    google.revoke(refresh)
    google.token_delay_s = 0.1
    handler = await make_handler(batch_window_ms=0)
    outcomes = await Runner(handler, concurrency=10).run_all(
        [job(refresh, "ya29.old", 1, range_=f"Sheet1!A{i}") for i in range(10)]
    )
    assert {getattr(outcome, "code", None) for outcome in outcomes} == {"AUTH_REVOKED"}
    assert len({id(outcome) for outcome in outcomes}) == 10
    assert len(google.grants) == 1


async def test_token_endpoint_outage_is_retryable(
    google: FakeGoogle, make_handler: HandlerFactory
) -> None:
    """A 503 from the token endpoint is a RetryLater with its Retry-After."""
    refresh, _, _ = google.add_user()
    google.token_failures.append(Failure(503, retry_after="7", error_status="unavailable"))
    outcome = await Runner(await make_handler()).run(job(refresh, "ya29.old", 1))
    assert isinstance(outcome, RetryLater)
    assert (outcome.status, outcome.after) == (503, 7.0)
    assert outcome.code == "OAUTH_UNAVAILABLE"


async def test_a_refresh_emits_the_form_id_and_new_token(
    google: FakeGoogle, make_handler: HandlerFactory
) -> None:
    """A refresh emits `sheets.token_refreshed` with the job's form id and the new token."""
    refresh, _, _ = google.add_user()
    emitted: list[Event] = []
    handler = await make_handler(emit=emitted.append)
    await Runner(handler).run(job(refresh, "ya29.old", 1, form_id="form-42"))
    [event] = emitted
    assert isinstance(event, TokenRefreshedEvent)
    assert (event.form_id, event.access_token) == ("form-42", google.calls[0].token)


async def test_tokens_and_secret_stay_out_of_reasons_and_logs(
    google: FakeGoogle, make_handler: HandlerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Neither the tokens nor the client secret appear in failures or log lines."""
    caplog.set_level(logging.DEBUG)
    refresh, access, expiry = google.add_user()
    google.script.append(Failure(500, message=f"echo {access}"))
    handler = await make_handler(batch_window_ms=0)
    runner = Runner(handler)
    first = await runner.run(job(refresh, access, expiry))
    google.revoke(refresh)
    second = await runner.run(job(refresh, "ya29.old", 1))
    text = " ".join([str(first), repr(first), str(second), repr(second), caplog.text])
    for secret in (refresh, access, "ya29.old", CLIENT_SECRET):
        assert secret not in text
    assert isinstance(first, RetryLater)
    assert isinstance(second, PermanentFailure)


# --- batching --------------------------------------------------------------------


async def test_jobs_within_the_window_become_one_append_in_order(
    google: FakeGoogle, make_handler: HandlerFactory
) -> None:
    """Thirty jobs for one range go out as one values.append, rows in arrival order."""
    refresh, access, expiry = google.add_user()
    handler = await make_handler(batch_window_ms=100)
    batch = [job(refresh, access, expiry, values=[[f"row-{i}", i]]) for i in range(30)]
    outcomes = await Runner(handler).run_all(batch)
    assert outcomes == [None] * 30
    assert len(google.calls) == 1
    assert google.rows(SHEET, "Sheet1!A:C") == [[f"row-{i}", i] for i in range(30)]
    assert google.calls[0].query["insertDataOption"] == "INSERT_ROWS"


async def test_batch_max_rows_splits_batches_and_keeps_order(
    google: FakeGoogle, make_handler: HandlerFactory
) -> None:
    """Twenty-five two-row jobs with batch_max_rows=10 make five calls of ten rows."""
    refresh, access, expiry = google.add_user()
    handler = await make_handler(batch_window_ms=100, batch_max_rows=10)
    batch = [job(refresh, access, expiry, values=[[i, "a"], [i, "b"]]) for i in range(25)]
    outcomes = await Runner(handler).run_all(batch)
    assert outcomes == [None] * 25
    assert [len(call.rows) for call in google.calls] == [10, 10, 10, 10, 10]
    expected = [[i, half] for i in range(25) for half in ("a", "b")]
    assert google.rows(SHEET, "Sheet1!A:C") == expected


async def test_window_zero_sends_every_job_alone(
    google: FakeGoogle, make_handler: HandlerFactory
) -> None:
    """With batch_window_ms=0 each job is its own call."""
    refresh, access, expiry = google.add_user()
    handler = await make_handler(batch_window_ms=0)
    await Runner(handler).run_all([job(refresh, access, expiry) for _ in range(5)])
    assert len(google.calls) == 5


async def test_different_ranges_and_users_are_not_merged(
    google: FakeGoogle, make_handler: HandlerFactory
) -> None:
    """Batches are per (spreadsheet, range, refresh token)."""
    user_a = google.add_user()
    user_b = google.add_user()
    handler = await make_handler(batch_window_ms=50)
    batch = [
        job(*user_a, range_="Sheet1!A:C"),
        job(*user_a, range_="Sheet2!A:C"),
        job(*user_b, range_="Sheet1!A:C"),
        job(*user_a, range_="Sheet1!A:C"),
    ]
    await Runner(handler).run_all(batch)
    sizes = sorted((call.range, len(call.rows)) for call in google.calls)
    assert sizes == [("Sheet1!A:C", 1), ("Sheet1!A:C", 2), ("Sheet2!A:C", 1)]


async def test_update_mode_sends_one_batch_update_per_spreadsheet(
    google: FakeGoogle, make_handler: HandlerFactory
) -> None:
    """In update mode, jobs for one spreadsheet become one values.batchUpdate, in order."""
    refresh, access, expiry = google.add_user()
    handler = await make_handler(write_mode="update", batch_window_ms=50)
    batch = [job(refresh, access, expiry, range_=f"Sheet1!A{i}", values=[[i]]) for i in range(6)]
    outcomes = await Runner(handler).run_all(batch)
    assert outcomes == [None] * 6
    [call] = google.calls
    assert call.method == "batchUpdate"
    assert call.data == [(f"Sheet1!A{i}", [[i]]) for i in range(6)]


async def test_a_failing_batch_gives_each_job_its_own_failure(
    google: FakeGoogle, make_handler: HandlerFactory
) -> None:
    """A 500 for a batched call fails every job in it, each with its own RetryLater."""
    refresh, access, expiry = google.add_user()
    google.script.append(Failure(500))
    handler = await make_handler(batch_window_ms=50)
    outcomes = await Runner(handler).run_all([job(refresh, access, expiry) for _ in range(5)])
    assert all(isinstance(outcome, RetryLater) for outcome in outcomes)
    assert {getattr(outcome, "status", None) for outcome in outcomes} == {500}
    assert {getattr(outcome, "code", None) for outcome in outcomes} == {"SHEETS_UNAVAILABLE"}
    assert len({id(outcome) for outcome in outcomes}) == 5
    assert len(google.calls) == 1


async def test_a_400_batch_is_resent_job_by_job(
    google: FakeGoogle, make_handler: HandlerFactory
) -> None:
    """One bad row rejects only its own job; its neighbours are written in order."""
    refresh, access, expiry = google.add_user()
    handler = await make_handler(batch_window_ms=50)
    values = [[["ok", 0]], [["bad"]], [["ok", 2]]]
    outcomes = await Runner(handler).run_all(
        [job(refresh, access, expiry, values=v) for v in values]
    )
    assert outcomes[0] is None
    assert outcomes[2] is None
    assert isinstance(outcomes[1], PermanentFailure)
    assert (outcomes[1].code, outcomes[1].status) == ("SHEETS_REQUEST_REJECTED", 400)
    assert google.rows(SHEET, "Sheet1!A:C") == [["ok", 0], ["ok", 2]]


async def test_a_cancelled_job_leaves_its_unsent_batch(
    google: FakeGoogle, make_handler: HandlerFactory
) -> None:
    """A job cancelled while its batch waits is not written; the others are."""
    refresh, access, expiry = google.add_user()
    handler = await make_handler(batch_window_ms=200)
    runner = Runner(handler)
    tasks = [
        asyncio.ensure_future(runner.run(job(refresh, access, expiry, values=[[i]])))
        for i in range(3)
    ]
    await asyncio.sleep(0.05)
    tasks[1].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[1], asyncio.CancelledError)
    assert google.rows(SHEET, "Sheet1!A:C") == [[0], [2]]


async def test_the_range_is_escaped_in_the_url(
    google: FakeGoogle, make_handler: HandlerFactory
) -> None:
    """A range with a slash, quotes and spaces arrives intact as one path segment."""
    refresh, access, expiry = google.add_user()
    range_ = "'Q1/Q2 leads'!A1:C"
    outcome = await Runner(await make_handler()).run(job(refresh, access, expiry, range_=range_))
    assert outcome is None
    assert google.calls[0].range == range_


async def test_calls_reuse_one_keep_alive_connection(
    google: FakeGoogle, make_handler: HandlerFactory
) -> None:
    """Successive calls, successful or not, go over the same kept-open connection."""
    refresh, access, expiry = google.add_user()
    google.script.append(Failure(500))
    runner = Runner(await make_handler(batch_window_ms=0), concurrency=1)
    for _ in range(3):
        await runner.run(job(refresh, access, expiry))
    assert len({call.client_port for call in google.calls}) == 1


# --- statuses ---------------------------------------------------------------------


async def test_unknown_spreadsheet_is_rejected_with_404(
    google: FakeGoogle, make_handler: HandlerFactory
) -> None:
    """A 404 is a permanent SHEETS_REQUEST_REJECTED with status 404."""
    refresh, access, expiry = google.add_user()
    outcome = await Runner(await make_handler()).run(
        job(refresh, access, expiry, spreadsheet_id="gone")
    )
    assert isinstance(outcome, PermanentFailure)
    assert (outcome.code, outcome.status) == ("SHEETS_REQUEST_REJECTED", 404)
    assert "NOT_FOUND" in outcome.reason


async def test_403_is_rejected(google: FakeGoogle, make_handler: HandlerFactory) -> None:
    """A 403 PERMISSION_DENIED is permanent."""
    refresh, access, expiry = google.add_user()
    google.script.append(Failure(403, error_status="PERMISSION_DENIED"))
    outcome = await Runner(await make_handler()).run(job(refresh, access, expiry))
    assert isinstance(outcome, PermanentFailure)
    assert (outcome.code, outcome.status) == ("SHEETS_REQUEST_REJECTED", 403)


async def test_429_retry_after_is_honoured_and_pauses_the_bucket(
    google: FakeGoogle, make_handler: HandlerFactory
) -> None:
    """A 429 with Retry-After: 1 retries the job after 1 s and holds back the next call."""
    refresh, access, expiry = google.add_user()
    google.script.append(Failure(429, retry_after="1", error_status="RESOURCE_EXHAUSTED"))
    runner = Runner(await make_handler(batch_window_ms=0))
    first = await runner.run(job(refresh, access, expiry))
    second = await runner.run(job(refresh, access, expiry))
    assert isinstance(first, RetryLater)
    assert (first.status, first.after) == (429, 1.0)
    assert first.code == "SHEETS_RATE_LIMITED"
    assert second is None
    assert google.calls[1].at - google.calls[0].at >= 0.95


async def test_a_connection_error_names_the_host_port_and_os_error(
    make_handler: HandlerFactory, google: FakeGoogle
) -> None:
    """A Sheets API on a closed port: RetryLater naming host:port, errno and strerror."""
    refresh, access, expiry = google.add_user()
    port = free_port()
    handler = await make_handler(api_root_url=f"http://127.0.0.1:{port}/")
    outcome = await Runner(handler).run(job(refresh, access, expiry))
    assert isinstance(outcome, RetryLater)
    assert outcome.reason == (
        f"values.append on {SHEET}: ClientConnectorError: "
        f"cannot connect to 127.0.0.1:{port}: [Errno 111] Connection refused"
    )
    assert outcome.code == "SHEETS_CONNECTION"


async def test_a_token_endpoint_connection_error_names_the_host_and_port(
    make_handler: HandlerFactory, google: FakeGoogle
) -> None:
    """A token endpoint on a closed port: RetryLater naming where it tried to connect."""
    refresh, _, _ = google.add_user()
    port = free_port()
    handler = await make_handler(token_url=f"http://127.0.0.1:{port}/token")
    outcome = await Runner(handler).run(job(refresh, "stale", now_ms() - HOUR_MS))
    assert isinstance(outcome, RetryLater)
    assert outcome.reason == (
        "OAuth token endpoint: ClientConnectorError: "
        f"cannot connect to 127.0.0.1:{port}: [Errno 111] Connection refused"
    )
    assert outcome.code == "OAUTH_UNAVAILABLE"


# --- rate limits -------------------------------------------------------------------


async def test_per_user_rate_limit_holds_the_configured_rate(
    google: FakeGoogle, make_handler: HandlerFactory
) -> None:
    """At 600 a minute per user, 25 concurrent calls come 10 at once, then one per 0.1 s."""
    refresh, access, expiry = google.add_user()
    handler = await make_handler(batch_window_ms=0, requests_per_minute_per_user=600)
    batch = [job(refresh, access, expiry, range_=f"Sheet1!A{i}") for i in range(25)]
    started = time.monotonic()
    await Runner(handler, concurrency=25).run_all(batch)
    times = sorted(call.at - started for call in google.calls)
    assert len(times) == 25
    for index, at in enumerate(times[10:], start=10):
        assert at >= (index - 9) / 10 - 0.005
    assert times[-1] < 5


async def test_process_rate_limit_applies_across_users(
    google: FakeGoogle, make_handler: HandlerFactory
) -> None:
    """The per-process bucket limits calls of different users together."""
    users = [google.add_user() for _ in range(15)]
    handler = await make_handler(batch_window_ms=0, requests_per_minute=600)
    started = time.monotonic()
    await Runner(handler, concurrency=15).run_all([job(*user) for user in users])
    assert time.monotonic() - started >= 0.45  # 10 at once, then 5 more at 10/s


async def test_waiting_for_a_rate_limit_does_not_hold_the_slot(
    google: FakeGoogle, make_handler: HandlerFactory
) -> None:
    """A job waiting for its user's bucket lets another user's job use the only slot."""
    slow_user = google.add_user()
    other_user = google.add_user()
    handler = await make_handler(batch_window_ms=0, requests_per_minute_per_user=30)
    runner = Runner(handler, concurrency=1)
    await runner.run(job(*slow_user))
    waiting = asyncio.ensure_future(runner.run(job(*slow_user)))  # next token in 2 s
    await asyncio.sleep(0.05)
    started = time.monotonic()
    assert await runner.run(job(*other_user)) is None
    assert time.monotonic() - started < 0.5
    assert not waiting.done()
    waiting.cancel()


# --- the handler itself ---------------------------------------------------------------


def test_packaged_discovery_has_only_the_methods_used() -> None:
    """The shipped document holds values.append and values.batchUpdate, rooted as configured."""
    document = load_discovery("http://127.0.0.1:1/")
    methods = document["resources"]["spreadsheets"]["resources"]["values"]["methods"]
    assert sorted(methods) == ["append", "batchUpdate"]
    assert document["rootUrl"] == "http://127.0.0.1:1/"


async def test_start_makes_no_request(google: FakeGoogle, make_handler: HandlerFactory) -> None:
    """Starting the handler fetches no discovery document and no token."""
    await make_handler()
    assert (google.calls, google.grants) == ([], [])


async def test_prefetch_leaves_room_for_full_batches(make_handler: HandlerFactory) -> None:
    """prefetch covers a full batch, with a ceiling."""
    handler = await make_handler(batch_max_rows=500)
    assert (handler.prefetch(2), handler.prefetch(800)) == (500, 1000)


async def test_breaker_key_names_the_spreadsheet(make_handler: HandlerFactory) -> None:
    """The breaker key is sheets:<spreadsheetId>."""
    handler = await make_handler()
    assert handler.breaker_key(job("r", spreadsheet_id="abc-1")) == "sheets:abc-1"


async def test_reconfigure_changes_the_batching_window(
    google: FakeGoogle, make_handler: HandlerFactory
) -> None:
    """After a reload with batch_window_ms=0, jobs are no longer merged."""
    refresh, access, expiry = google.add_user()
    handler = await make_handler(batch_window_ms=100)
    section = google.sheets_config(
        batch_window_ms=0, requests_per_minute_per_user=60_000, requests_per_minute=60_000
    )
    handler.reconfigure(msgspec.convert(section, SheetsWorkerConfig))
    await Runner(handler).run_all([job(refresh, access, expiry) for _ in range(3)])
    assert len(google.calls) == 3


# --- the batcher on its own ---------------------------------------------------------


class BlockingFlush:
    """A flush function that records batches and holds each until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()

    async def __call__(self, _key: str, items: list[int]) -> list[BaseException | None]:
        self.batches.append(items)
        await self.release.wait()
        return [None] * len(items)


async def test_a_batch_waiting_for_its_turn_keeps_taking_items() -> None:
    """While the key's previous call runs, the next batch collects every newcomer."""
    flush = BlockingFlush()
    batcher: Batcher[str, int] = Batcher(flush, window_s=0.01, max_rows=100, max_bytes=10**6)
    tasks = [asyncio.ensure_future(batcher.submit("k", 1, rows=1, size=1))]
    await asyncio.sleep(0.05)  # batch [1] is being sent
    tasks.append(asyncio.ensure_future(batcher.submit("k", 2, rows=1, size=1)))
    await asyncio.sleep(0.05)  # the window of batch [2] is over; it waits for its turn
    tasks.append(asyncio.ensure_future(batcher.submit("k", 3, rows=1, size=1)))
    await asyncio.sleep(0.01)
    flush.release.set()
    await asyncio.gather(*tasks)
    assert flush.batches == [[1], [2, 3]]
    await batcher.aclose()


async def test_closing_the_batcher_fails_unsent_items_as_retryable() -> None:
    """aclose() cancels a flush in progress and its items get RetryLater."""
    flush = BlockingFlush()
    batcher: Batcher[str, int] = Batcher(flush, window_s=0, max_rows=100, max_bytes=10**6)
    task = asyncio.ensure_future(batcher.submit("k", 1, rows=1, size=1))
    await asyncio.sleep(0.01)
    await batcher.aclose()
    with pytest.raises(RetryLater):
        await task
