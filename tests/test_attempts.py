"""Tests of formcraftd.attempts: the job log line, direct or through logging, and event times."""

from __future__ import annotations

import datetime as dt
import io
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest

from formcraftd import attempts, jobs, logs
from formcraftd.attempts import Attempt, Outcome, delivery_event, log_attempt
from formcraftd.config import LoggingConfig
from formcraftd.errors import BreakerOpen, PermanentFailure, RetryLater
from formcraftd.events import now as events_now
from formcraftd.jobs import Delivered, JobContext
from tests.support import webhook_job

TS = re.compile(r'^\{"ts":"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z",')
EVENT_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}\+00:00$")


def make_attempt(
    outcome: Outcome = "success",
    failure: Exception | None = None,
    *,
    job_id: str = "0123456789abcdef0123456789abcdef",
    form_id: str = "form-1",
    submission_id: str = "sub-1",
    valid: bool = True,
    queue: str = "webhook_tasks",
    duration: float = 0.0123,
) -> Attempt:
    """One attempt of a webhook job (or of an invalid body when not `valid`)."""
    job = (
        jobs.decode(
            webhook_job("https://example.com/hook", form_id=form_id, submission_id=submission_id)
        )
        if valid
        else None
    )
    delivered = Delivered(200, "ok") if outcome == "success" else None
    ctx = JobContext(job_id=job_id, attempt=2, queue=queue)
    return Attempt("webhook", queue, ctx, job, outcome, failure, delivered, duration)


ATTEMPTS: dict[str, Attempt] = {
    "success": make_attempt(),
    "retry": make_attempt(
        "retry", RetryLater("HTTP 503 from https://example.com", status=503), duration=2.5
    ),
    "delayed": make_attempt("delayed", BreakerOpen("https://example.com", 12.5)),
    "dead letter": make_attempt(
        "dead_letter", PermanentFailure("HTTP_STATUS", "HTTP 410 from example.com", status=410)
    ),
    "invalid body": make_attempt(
        "dead_letter",
        PermanentFailure("VALIDATION_ERROR", "body is not JSON: line 1 column 2"),
        valid=False,
    ),
    "secret in the reason": make_attempt(
        "dead_letter",
        PermanentFailure(
            "HTTP_STATUS",
            "401: sent Authorization: Bearer ya29.secret-token and refresh_token=1//0gSecret",
            status=401,
        ),
    ),
    "reason over lines, quoted, not ASCII": make_attempt(
        "retry", RetryLater('first line\r\n  "second" \\ back\tslash \u00e9\u2713 ' + "x" * 600)
    ),
    "secret-like ids": make_attempt(
        job_id='msg "1" token=abc',
        form_id="pa\u017f\u017fword=hunter2",  # IGNORECASE finds "password" in it
        submission_id="https://user:pw@host/",
        queue="token_tasks",
    ),
    # Only a field outside the message looks like a secret.
    "secret in the form id": make_attempt(form_id="refresh_token=1//0gFormSecret"),
    "secret in the submission id": make_attempt(submission_id="amqp://u:subsecret@h/"),
    "secret in the queue name": make_attempt(queue="client_secret=queuesecret"),
    "no duration": make_attempt(duration=0.0),
}


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """The JSON log stream; the logging setup is undone after the test."""
    buffer = io.StringIO()
    logs.configure(LoggingConfig(), stream=buffer)
    try:
        yield buffer
    finally:
        logs.reset()


def quiet_root(monkeypatch: pytest.MonkeyPatch) -> list[logging.Handler]:
    """The root logger's handlers, none for now, as in the daemon; more may be added.

    pytest's log capture puts its handlers on the root logger as each test
    starts, and a Sentry started by an earlier test replaces Logger.callHandlers
    for the rest of the process: both are set aside until the test ends. Called
    in the test itself, after pytest has added its handlers.
    """
    handlers: list[logging.Handler] = []
    monkeypatch.setattr(logging.root, "handlers", handlers)
    assert logs._STOCK_CALL_HANDLERS is not None
    monkeypatch.setattr(logging.Logger, "callHandlers", logs._STOCK_CALL_HANDLERS)
    return handlers


@pytest.fixture
def logging_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """The calls log_attempt makes to the logging module (none on the direct path)."""
    calls: list[tuple[Any, ...]] = []
    original = attempts.log.log

    def spy(level: int, msg: str, *args: object, **kwargs: Any) -> None:
        calls.append((level, msg, args))
        original(level, msg, *args, **kwargs)

    monkeypatch.setattr(attempts.log, "log", spy)
    return calls


def new_output(stream: io.StringIO, write: Callable[[], None]) -> str:
    """What `write` adds to `stream`, with the buffer written out."""
    before = len(stream.getvalue())
    write()
    logs.flush()
    return stream.getvalue()[before:]


def without_ts(line: str) -> str:
    """`line` with the value of its first key, ts, taken out."""
    assert TS.match(line), line
    return TS.sub("{", line)


# --- the direct path writes what logging would ----------------------------------------


@pytest.mark.parametrize("attempt", ATTEMPTS.values(), ids=ATTEMPTS.keys())
def test_direct_line_is_the_logging_line(
    stream: io.StringIO,
    logging_calls: list[tuple[Any, ...]],
    monkeypatch: pytest.MonkeyPatch,
    attempt: Attempt,
) -> None:
    """Byte for byte, but for the instant in ts, the direct line is what logging writes."""
    root_handlers = quiet_root(monkeypatch)
    direct = new_output(stream, lambda: log_attempt(attempt))
    assert logging_calls == []  # the line was written directly
    root_handlers.append(logging.NullHandler())  # someone else listens: through logging
    through_logging = new_output(stream, lambda: log_attempt(attempt))
    assert len(logging_calls) == 1
    assert direct.count("\n") == 1
    assert without_ts(direct) == without_ts(through_logging)


def test_direct_line_masks_a_secret_in_the_reason(
    stream: io.StringIO,
    logging_calls: list[tuple[Any, ...]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bearer token and a refresh token in a failure reason are masked on the direct path."""
    quiet_root(monkeypatch)
    output = new_output(stream, lambda: log_attempt(ATTEMPTS["secret in the reason"]))
    assert logging_calls == []
    assert "ya29.secret-token" not in output
    assert "1//0gSecret" not in output
    line = orjson.loads(output)
    assert line["msg"] == (
        "job 0123456789abcdef0123456789abcdef dead_letter: "
        "401: sent Authorization: Bearer *** and refresh_token=***"
    )
    assert (line["level"], line["error_code"], line["status"]) == ("warning", "HTTP_STATUS", 401)


def test_direct_line_masks_secrets_in_ids(
    stream: io.StringIO,
    logging_calls: list[tuple[Any, ...]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ids come from the job message: a secret in one is masked, on the direct path too."""
    quiet_root(monkeypatch)
    output = new_output(stream, lambda: log_attempt(ATTEMPTS["secret-like ids"]))
    assert logging_calls == []
    line = orjson.loads(output)
    assert (line["job_id"], line["form_id"]) == ('msg "1" token=abc', "pa\u017f\u017fword=***")
    assert line["submission_id"] == "https://user:***@host/"
    assert "hunter2" not in output


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("secret in the form id", "1//0gFormSecret"),
        ("secret in the submission id", "subsecret"),
        ("secret in the queue name", "queuesecret"),
    ],
)
def test_direct_line_masks_a_secret_outside_the_message(
    stream: io.StringIO,
    logging_calls: list[tuple[Any, ...]],
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    secret: str,
) -> None:
    """A secret only in a field, not in the message, is masked on the direct path too."""
    quiet_root(monkeypatch)
    output = new_output(stream, lambda: log_attempt(ATTEMPTS[name]))
    assert logging_calls == []
    assert secret not in output
    assert "***" in output


def add_root_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logging.root, "handlers", [logging.NullHandler()])


def add_own_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attempts.log, "handlers", [logging.NullHandler()])


def add_logger_filter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attempts.log, "filters", [logging.Filter()])


def stop_propagating(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attempts.log, "propagate", False)


def add_package_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    package = logging.getLogger("formcraftd")
    monkeypatch.setattr(package, "handlers", [*package.handlers, logging.NullHandler()])


def add_handler_filter(monkeypatch: pytest.MonkeyPatch) -> None:
    [handler] = logging.getLogger("formcraftd").handlers
    monkeypatch.setattr(handler, "filters", [logging.Filter()])


def raise_handler_level(monkeypatch: pytest.MonkeyPatch) -> None:
    [handler] = logging.getLogger("formcraftd").handlers
    monkeypatch.setattr(handler, "level", logging.ERROR)


def use_console_format(monkeypatch: pytest.MonkeyPatch) -> None:
    logs.configure(LoggingConfig(format="console"), stream=io.StringIO())


@pytest.mark.parametrize(
    "disturb",
    [
        add_root_handler,
        add_own_handler,
        add_logger_filter,
        stop_propagating,
        add_package_handler,
        add_handler_filter,
        raise_handler_level,
        use_console_format,
    ],
)
def test_anything_else_in_the_way_takes_the_logging_path(
    stream: io.StringIO,
    logging_calls: list[tuple[Any, ...]],
    monkeypatch: pytest.MonkeyPatch,
    disturb: Callable[[pytest.MonkeyPatch], None],
) -> None:
    """With another handler, a filter, a level, no propagation or console format: logging."""
    quiet_root(monkeypatch)
    disturb(monkeypatch)
    log_attempt(ATTEMPTS["success"])
    assert len(logging_calls) == 1


def test_a_hooked_call_handlers_takes_the_logging_path(
    stream: io.StringIO,
    logging_calls: list[tuple[Any, ...]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A replaced Logger.callHandlers (Sentry's logging integration) still sees every job line."""
    quiet_root(monkeypatch)
    seen: list[logging.LogRecord] = []
    stock = logs._STOCK_CALL_HANDLERS
    assert stock is not None

    def hooked(self: logging.Logger, record: logging.LogRecord) -> None:
        seen.append(record)
        stock(self, record)

    monkeypatch.setattr(logging.Logger, "callHandlers", hooked)
    output = new_output(stream, lambda: log_attempt(ATTEMPTS["success"]))
    assert len(logging_calls) == 1
    assert [record.getMessage() for record in seen] == [
        "job 0123456789abcdef0123456789abcdef success"
    ]
    assert orjson.loads(output)["outcome"] == "success"


def test_pytest_log_capture_sees_the_job_line(
    stream: io.StringIO, caplog: pytest.LogCaptureFixture
) -> None:
    """Handlers on the root logger (here pytest's) get the record, as before."""
    with caplog.at_level(logging.INFO, logger="formcraftd.consumer"):
        log_attempt(ATTEMPTS["retry"])
    [record] = caplog.records
    assert record.getMessage().startswith("job 0123456789abcdef0123456789abcdef retry: HTTP 503")
    assert record.__dict__["status"] == 503


def test_a_level_filtered_out_writes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """At level warning a success line is not written, directly or otherwise."""
    quiet_root(monkeypatch)
    buffer = io.StringIO()
    logs.configure(LoggingConfig(level="warning"), stream=buffer)
    try:
        log_attempt(ATTEMPTS["success"])
        assert logs.write_direct(attempts.log, logging.INFO, "x", {}) is True
        log_attempt(ATTEMPTS["dead letter"])
        logs.flush()
    finally:
        logs.reset()
    [line] = buffer.getvalue().splitlines()
    assert orjson.loads(line)["outcome"] == "dead_letter"


# --- the direct path is buffered like any other line ----------------------------------


async def test_direct_info_lines_wait_and_a_dead_letter_does_not(
    stream: io.StringIO,
    logging_calls: list[tuple[Any, ...]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In a running loop success lines wait; a dead letter is written at once, after them."""
    quiet_root(monkeypatch)
    log_attempt(ATTEMPTS["success"])
    log_attempt(ATTEMPTS["retry"])
    assert stream.getvalue() == ""
    log_attempt(ATTEMPTS["dead letter"])
    outcomes = [orjson.loads(line)["outcome"] for line in stream.getvalue().splitlines()]
    assert outcomes == ["success", "retry", "dead_letter"]
    assert logging_calls == []


async def test_direct_lines_are_not_lost_at_reset(
    stream: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    """reset() writes out the lines still waiting."""
    quiet_root(monkeypatch)
    log_attempt(ATTEMPTS["success"])
    assert stream.getvalue() == ""
    logs.reset()
    assert orjson.loads(stream.getvalue())["outcome"] == "success"


class BrokenStream(io.StringIO):
    """A stream whose writes fail, like stdout on a closed pipe."""

    def write(self, text: str) -> int:
        raise BrokenPipeError("stdout is gone")


def test_a_failing_write_does_not_fail_the_job(
    monkeypatch: pytest.MonkeyPatch,
    logging_calls: list[tuple[Any, ...]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """On the direct path too, a write error is reported on stderr and never raised."""
    logs.configure(LoggingConfig(), stream=BrokenStream())
    quiet_root(monkeypatch)
    try:
        log_attempt(ATTEMPTS["success"])
        log_attempt(ATTEMPTS["dead letter"])
    finally:
        logs.reset()
    assert logging_calls == []
    assert capsys.readouterr().err.count("BrokenPipeError: stdout is gone") == 2


# --- delivery events ------------------------------------------------------------------


def test_delivery_event_time_is_now_as_events_writes_it() -> None:
    """The event's `at` has events.now()'s format and lies between two calls of it."""
    before = events_now()
    at = delivery_event(ATTEMPTS["success"]).at
    after = events_now()
    assert EVENT_TIME.match(at), at
    assert before <= at <= after


@pytest.mark.parametrize("second", [0, 59, 86_399, 951_782_400, 1_700_000_000, 4_102_444_799])
@pytest.mark.parametrize("millis", [0, 7, 999])
def test_event_time_format_is_isoformat(second: int, millis: int) -> None:
    """utc_timestamp(..., "+00:00") is datetime.isoformat(timespec="milliseconds") exactly."""
    instant = dt.datetime.fromtimestamp(second, dt.UTC).replace(microsecond=millis * 1000 + 999)
    expected = instant.isoformat(timespec="milliseconds")
    assert logs.utc_timestamp(second, millis, "+00:00") == expected
    assert logs.utc_timestamp(second + 1, millis, "+00:00") != expected  # the cache moves on
    assert logs.utc_timestamp(second, millis, "+00:00") == expected


def test_delivery_event_fields() -> None:
    """The event describes the attempt: ids, outcome, status, error code and reason."""
    event = delivery_event(ATTEMPTS["dead letter"])
    assert (event.outcome, event.job_id, event.form_id, event.submission_id) == (
        "dead_lettered",
        "0123456789abcdef0123456789abcdef",
        "form-1",
        "sub-1",
    )
    assert (event.status_code, event.error_code, event.error) == (
        410,
        "HTTP_STATUS",
        "HTTP 410 from example.com",
    )


def test_remembered_constants_stay_few(
    stream: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Queue names are redacted once and remembered, but never more than a bounded number."""
    quiet_root(monkeypatch)
    for n in range(logs._CONSTANTS_MAX + 10):
        assert logs.write_direct(attempts.log, logging.INFO, "x", {"queue": f"q{n}"})
    assert 0 < len(logs._redacted_constants) <= logs._CONSTANTS_MAX
    output = new_output(stream, lambda: log_attempt(ATTEMPTS["secret in the queue name"]))
    assert "queuesecret" not in output
    assert logs._redacted_constants["client_secret=queuesecret"] == "client_secret=***"
