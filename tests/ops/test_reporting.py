"""The attempt reporter: the job log line, through standard logging, and the delivery event."""

from __future__ import annotations

import datetime as dt
import io
import logging
import re
from collections.abc import Callable, Iterator

import msgspec
import orjson
import pytest

from formcraftd.core import jobs
from formcraftd.core.attempts import Attempt, JobOutcome, delivery_event
from formcraftd.core.config import LoggingConfig
from formcraftd.core.errors import BreakerOpen, PermanentFailure, RetryLater
from formcraftd.core.events import Event
from formcraftd.core.events import now as events_now
from formcraftd.core.handler import Delivered, JobContext
from formcraftd.core.text import utc_timestamp
from formcraftd.ops import logs
from formcraftd.ops.reporting import AttemptLog, log_attempt
from tests.support import webhook_job

TS = re.compile(r'^\{"ts":"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z",')
EVENT_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}\+00:00$")


def make_attempt(
    outcome: JobOutcome = "success",
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
        "retry",
        RetryLater("HTTP_STATUS", "HTTP 503 from https://example.com", status=503),
        duration=2.5,
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
        "retry",
        RetryLater(
            "CONNECTION_ERROR", 'first line\r\n  "second" \\ back\tslash \u00e9\u2713 ' + "x" * 600
        ),
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


def new_output(stream: io.StringIO, write: Callable[[], None]) -> str:
    """What `write` adds to `stream`, with the buffer written out."""
    before = len(stream.getvalue())
    write()
    logs.flush()
    return stream.getvalue()[before:]


# --- the job line -----------------------------------------------------------------------


@pytest.mark.parametrize("attempt", ATTEMPTS.values(), ids=ATTEMPTS.keys())
def test_each_attempt_is_one_json_line_with_its_fields(
    stream: io.StringIO, attempt: Attempt
) -> None:
    """One line per attempt: the standard keys, the job's ids, outcome and duration."""
    output = new_output(stream, lambda: log_attempt(attempt))
    assert output.count("\n") == 1 and TS.match(output), output
    line = orjson.loads(output)
    assert line["logger"] == "formcraftd.consumer"
    assert line["level"] == ("warning" if attempt.outcome == "dead_letter" else "info")
    assert line["outcome"] == attempt.outcome
    assert line["attempt"] == 2
    assert line["duration_ms"] == round(attempt.duration * 1000, 1)
    assert line["msg"].startswith("job ")
    assert ("form_id" in line) == (attempt.job is not None)
    assert line.get("error_code") == getattr(attempt.failure, "code", None)


def test_a_secret_in_the_reason_is_masked(stream: io.StringIO) -> None:
    """A bearer token and a refresh token in a failure reason are masked."""
    output = new_output(stream, lambda: log_attempt(ATTEMPTS["secret in the reason"]))
    assert "ya29.secret-token" not in output
    assert "1//0gSecret" not in output
    line = orjson.loads(output)
    assert line["msg"] == (
        "job 0123456789abcdef0123456789abcdef dead_letter: "
        "401: sent Authorization: Bearer *** and refresh_token=***"
    )
    assert (line["level"], line["error_code"], line["status"]) == ("warning", "HTTP_STATUS", 401)


def test_secrets_in_ids_are_masked(stream: io.StringIO) -> None:
    """Ids come from the job message: a secret in one is masked."""
    output = new_output(stream, lambda: log_attempt(ATTEMPTS["secret-like ids"]))
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
def test_a_secret_outside_the_message_is_masked(
    stream: io.StringIO, name: str, secret: str
) -> None:
    """A secret only in a field, not in the message, is masked too."""
    output = new_output(stream, lambda: log_attempt(ATTEMPTS[name]))
    assert secret not in output
    assert "***" in output


def test_a_long_reason_over_lines_stays_one_line(stream: io.StringIO) -> None:
    """Line breaks in a reason become spaces and the reason is cut."""
    output = new_output(
        stream, lambda: log_attempt(ATTEMPTS["reason over lines, quoted, not ASCII"])
    )
    line = orjson.loads(output)
    assert "\n" not in line["msg"] and len(line["msg"]) < 600
    assert line["msg"].startswith('job 0123456789abcdef0123456789abcdef retry: first line "second"')


def test_a_handler_an_operator_adds_sees_every_job_line(stream: io.StringIO) -> None:
    """No bypass of logging: a handler added to the package logger gets the job records."""
    seen: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    handler = Collect()
    handler.addFilter(logs.RedactingFilter())
    package = logging.getLogger("formcraftd")
    package.addHandler(handler)
    try:
        log_attempt(ATTEMPTS["success"])
        log_attempt(ATTEMPTS["secret in the reason"])
    finally:
        package.removeHandler(handler)
    assert [record.__dict__["outcome"] for record in seen] == ["success", "dead_letter"]
    assert "ya29.secret-token" not in seen[1].getMessage()
    assert seen[1].getMessage().endswith("Bearer *** and refresh_token=***")


def test_a_filter_on_the_job_logger_applies_and_the_record_names_its_source(
    stream: io.StringIO,
) -> None:
    """The job line goes through Logger.handle: the logger's own filters decide, and the
    record says where it comes from (the reporter), as one made by Logger.log would."""
    seen: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    def successes_only(record: logging.LogRecord) -> bool:
        return record.__dict__.get("outcome") == "success"

    handler = Collect()
    consumer = logging.getLogger("formcraftd.consumer")
    consumer.addHandler(handler)
    consumer.addFilter(successes_only)
    try:
        log_attempt(ATTEMPTS["retry"])
        log_attempt(ATTEMPTS["success"])
    finally:
        consumer.removeFilter(successes_only)
        consumer.removeHandler(handler)
    [record] = seen
    assert record.funcName == "log_attempt"
    assert record.filename == "reporting.py" and record.module == "reporting"
    assert record.lineno > 0 and record.levelname == "INFO"


def test_pytest_log_capture_sees_the_job_line(
    stream: io.StringIO, caplog: pytest.LogCaptureFixture
) -> None:
    """Handlers on the root logger (here pytest's) get the record, as any other."""
    with caplog.at_level(logging.INFO, logger="formcraftd.consumer"):
        log_attempt(ATTEMPTS["retry"])
    [record] = caplog.records
    assert record.getMessage().startswith("job 0123456789abcdef0123456789abcdef retry: HTTP 503")
    assert record.__dict__["status"] == 503


def test_a_level_filtered_out_writes_nothing() -> None:
    """At level warning a success line is not written."""
    buffer = io.StringIO()
    logs.configure(LoggingConfig(level="warning"), stream=buffer)
    try:
        log_attempt(ATTEMPTS["success"])
        log_attempt(ATTEMPTS["dead letter"])
        logs.flush()
    finally:
        logs.reset()
    [line] = buffer.getvalue().splitlines()
    assert orjson.loads(line)["outcome"] == "dead_letter"


async def test_info_lines_wait_and_a_dead_letter_does_not(stream: io.StringIO) -> None:
    """In a running loop success lines wait; a dead letter is written at once, after them."""
    log_attempt(ATTEMPTS["success"])
    log_attempt(ATTEMPTS["retry"])
    assert stream.getvalue() == ""
    log_attempt(ATTEMPTS["dead letter"])
    outcomes = [orjson.loads(line)["outcome"] for line in stream.getvalue().splitlines()]
    assert outcomes == ["success", "retry", "dead_letter"]


class BrokenStream(io.StringIO):
    """A stream whose writes fail, like stdout on a closed pipe."""

    def write(self, text: str) -> int:
        raise BrokenPipeError("stdout is gone")


def test_a_failing_write_does_not_fail_the_job(capsys: pytest.CaptureFixture[str]) -> None:
    """A write error is reported on stderr, as logging does, and never raised."""
    logs.configure(LoggingConfig(), stream=BrokenStream())
    try:
        log_attempt(ATTEMPTS["success"])
        log_attempt(ATTEMPTS["dead letter"])
    finally:
        logs.reset()
    assert capsys.readouterr().err.count("BrokenPipeError: stdout is gone") == 2


# --- delivery events ------------------------------------------------------------------


def test_the_reporter_emits_one_event_per_attempt(stream: io.StringIO) -> None:
    """With events on, each reported attempt is one log line and one delivery event."""
    emitted: list[Event] = []
    reporter = AttemptLog(emitted.append)
    output = new_output(stream, lambda: reporter.attempt(ATTEMPTS["retry"]))
    assert output.count("\n") == 1
    [event] = emitted
    expected = delivery_event(ATTEMPTS["retry"])
    assert msgspec.structs.replace(event, at=expected.at) == expected


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
    assert utc_timestamp(instant.timestamp(), "+00:00") == expected
    assert utc_timestamp(instant.timestamp() + 1, "+00:00") != expected  # the cache moves on
    assert utc_timestamp(instant.timestamp(), "+00:00") == expected


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
