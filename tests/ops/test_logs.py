"""The logs: JSON lines, redaction on output, idempotent configure, debug switches, buffer."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from formcraftd.core import config
from formcraftd.core.config import LoggingConfig
from formcraftd.core.errors import ConfigError
from formcraftd.ops import logs
from formcraftd.ops.logs.handler import BUFFER_CHARS, FLUSH_DELAY_S

TS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """A stream to log into; the logging setup is undone after the test."""
    buffer = io.StringIO()
    try:
        yield buffer
    finally:
        logs.reset()


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    """Every line written to `stream`, each parsed as one JSON object."""
    parsed: list[dict[str, Any]] = []
    for line in stream.getvalue().splitlines():
        value = orjson.loads(line)
        assert isinstance(value, dict)
        parsed.append(value)
    return parsed


def raise_and_log(logger: logging.Logger, message: str, error: Exception) -> None:
    """Raise `error` and log it with its traceback through `logger.exception`."""
    try:
        raise error
    except Exception:
        logger.exception(message)


# --- JSON lines ----------------------------------------------------------------------


def test_json_line_has_the_standard_keys(stream: io.StringIO) -> None:
    """A JSON line carries ts (RFC 3339 UTC, ms), level, logger and the %-formatted msg."""
    logs.configure(LoggingConfig(), stream=stream)
    logging.getLogger("formcraftd.consumer").info("consumed %d jobs from %s", 3, "webhook_tasks")
    [line] = lines(stream)
    assert TS.match(line["ts"])
    assert line["level"] == "info"
    assert line["logger"] == "formcraftd.consumer"
    assert line["msg"] == "consumed 3 jobs from webhook_tasks"


def test_job_fields_are_top_level_keys(stream: io.StringIO) -> None:
    """Allowlisted extras and `extra={"fields": ...}` become keys of the JSON object."""
    logs.configure(LoggingConfig(), stream=stream)
    job = {
        "queue": "webhook_tasks",
        "job_id": "msg-1",
        "form_id": "form_1",
        "submission_id": "sub_1",
        "attempt": 2,
        "outcome": "retry",
        "duration_ms": 12.5,
        "error_code": "HTTP_STATUS",
        "status": 503,
    }
    log = logging.getLogger("formcraftd.consumer")
    log.info("job done", extra={**job, "unlisted": "dropped", "fields": {"breaker": "closed"}})
    [line] = lines(stream)
    assert {key: line[key] for key in job} == job
    assert line["breaker"] == "closed"
    assert "unlisted" not in line


def test_fields_cannot_overwrite_the_standard_keys(stream: io.StringIO) -> None:
    """A structured field named like a standard key is kept under another name."""
    logs.configure(LoggingConfig(), stream=stream)
    logging.getLogger("formcraftd").info("real", extra={"fields": {"msg": "fake", "level": "x"}})
    [line] = lines(stream)
    assert (line["msg"], line["level"]) == ("real", "info")
    assert (line["field_msg"], line["field_level"]) == ("fake", "x")


def test_multiline_message_stays_one_line(stream: io.StringIO) -> None:
    """A message with newlines is still exactly one line of output."""
    logs.configure(LoggingConfig(), stream=stream)
    logging.getLogger("formcraftd").warning("first\nsecond\r\nthird")
    assert stream.getvalue().count("\n") == 1
    assert lines(stream)[0]["msg"] == "first\nsecond\r\nthird"


def test_exception_is_summarised_on_one_line(stream: io.StringIO) -> None:
    """At info level an exception is exc_type plus a one-line exc, without a traceback."""
    logs.configure(LoggingConfig(), stream=stream)
    raise_and_log(logging.getLogger("formcraftd.broker"), "publish failed", OSError("a\nb"))
    [line] = lines(stream)
    assert line["exc_type"] == "OSError"
    assert line["exc"] == "a b"
    assert "traceback" not in line


def test_exception_has_a_traceback_at_debug_level(stream: io.StringIO) -> None:
    """At debug level the JSON line also carries the traceback."""
    logs.configure(LoggingConfig(level="debug"), stream=stream)
    raise_and_log(logging.getLogger("formcraftd.broker"), "publish failed", ValueError("bad"))
    [line] = lines(stream)
    assert line["exc_type"] == "ValueError"
    assert "Traceback (most recent call last)" in line["traceback"]
    assert "raise_and_log" in line["traceback"]


def test_non_json_values_are_rendered_as_text(stream: io.StringIO) -> None:
    """A field value that JSON cannot hold is logged as its str(), not dropped."""
    logs.configure(LoggingConfig(), stream=stream)
    logging.getLogger("formcraftd").info("x", extra={"fields": {"when": object}})
    assert lines(stream)[0]["when"] == str(object)


def test_console_format_is_one_readable_line(stream: io.StringIO) -> None:
    """The console format is `HH:MM:SS LEVEL logger: msg key=value ...`."""
    logs.configure(LoggingConfig(format="console"), stream=stream)
    extra = {"queue": "email_tasks", "attempt": 1, "job_id": "a b"}
    logging.getLogger("formcraftd.email").info("sent to %d", 2, extra=extra)
    output = stream.getvalue()
    assert re.fullmatch(
        r"\d{2}:\d{2}:\d{2} INFO  formcraftd\.email: sent to 2 "
        r'queue=email_tasks job_id="a b" attempt=1\n',
        output,
    ), output


# --- redaction -------------------------------------------------------------------------

SECRET_MESSAGES = [
    ("connecting to amqp://app:%s@rabbit:5672/", "s3cretPass"),
    ("signing with %s", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
    ("sent Authorization: Bearer %s", "ya29.a0AfB_token"),
    ("token response refresh_token=%s&expires_in=3599", "1//0gRefreshToken"),
    ('payload {"refresh_token": "%s"}', "1//0gOtherRefresh"),
    ("auth {'client_secret': '%s'}", "GOCSPX-clientsecret"),
    ("smtp login password=%s", "hunter2hunter2"),
]


@pytest.mark.parametrize(("template", "secret"), SECRET_MESSAGES)
def test_secrets_in_the_message_are_redacted(
    stream: io.StringIO, template: str, secret: str
) -> None:
    """URL passwords, whsec_ keys, bearer tokens and secret pairs never reach the output."""
    logs.configure(LoggingConfig(), stream=stream)
    logging.getLogger("formcraftd").error(template, secret)
    assert secret not in stream.getvalue()
    assert "***" in lines(stream)[0]["msg"]


@pytest.mark.parametrize(("template", "secret"), SECRET_MESSAGES)
def test_secrets_in_exceptions_and_tracebacks_are_redacted(
    stream: io.StringIO, template: str, secret: str
) -> None:
    """An exception message with a secret is masked in exc and in the debug traceback."""
    logs.configure(LoggingConfig(level="debug"), stream=stream)
    raise_and_log(logging.getLogger("formcraftd"), "failed", RuntimeError(template % secret))
    assert secret not in stream.getvalue()
    assert "***" in lines(stream)[0]["exc"]


def test_secrets_in_string_fields_are_redacted(stream: io.StringIO) -> None:
    """A string field value is masked too, e.g. a URL with a password."""
    logs.configure(LoggingConfig(format="console"), stream=stream)
    logging.getLogger("formcraftd").info("x", extra={"fields": {"url": "amqp://u:pw123@h/"}})
    assert "pw123" not in stream.getvalue()


# --- configure ------------------------------------------------------------------------------


def test_configure_twice_does_not_duplicate_output(stream: io.StringIO) -> None:
    """Calling configure() again (a reload) keeps exactly one handler and one line per record."""
    logs.configure(LoggingConfig(), stream=stream)
    logs.configure(LoggingConfig(), stream=stream)
    logs.configure(LoggingConfig(level="warning"), stream=stream)
    logging.getLogger("formcraftd.daemon").warning("reloaded")
    assert len(lines(stream)) == 1
    assert len(logging.getLogger("formcraftd").handlers) == 1


def test_reconfigure_switches_format_and_level(stream: io.StringIO) -> None:
    """A later configure() replaces the format and the level of the earlier one."""
    logs.configure(LoggingConfig(format="console"), stream=stream)
    logs.configure(LoggingConfig(level="warning"), stream=stream)
    log = logging.getLogger("formcraftd.daemon")
    log.info("hidden")
    log.warning("shown")
    assert [line["msg"] for line in lines(stream)] == ["shown"]


def test_default_stream_is_the_current_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a stream the lines go to sys.stdout as it is when the record is written."""
    try:
        logs.configure(LoggingConfig())
        logging.getLogger("formcraftd").info("to stdout")
    finally:
        logs.reset()
    out = capsys.readouterr().out
    assert orjson.loads(out)["msg"] == "to stdout"


def test_debug_for_one_worker_only(stream: io.StringIO) -> None:
    """DEBUG=workers:webhook turns on debug for formcraftd.webhook and nothing else."""
    logging_config = config.parse("", environ={"DEBUG": "workers:webhook"}).logging
    logs.configure(logging_config, stream=stream)
    logging.getLogger("formcraftd.webhook").debug("webhook detail")
    logging.getLogger("formcraftd.workers.webhook").debug("module detail")
    logging.getLogger("formcraftd.email").debug("email detail")
    logging.getLogger("formcraftd.consumer").debug("consumer detail")
    logging.getLogger("formcraftd.email").info("email info")
    assert [line["msg"] for line in lines(stream)] == [
        "webhook detail",
        "module detail",
        "email info",
    ]


def test_debug_for_every_worker(stream: io.StringIO) -> None:
    """DEBUG=workers:* turns on debug for everything under formcraftd."""
    logs.configure(config.parse("", environ={"DEBUG": "workers:*"}).logging, stream=stream)
    for name in ("formcraftd", "formcraftd.sheets", "formcraftd.broker"):
        logging.getLogger(name).debug("detail from %s", name)
    assert len(lines(stream)) == 3
    # aio-pika's and aiormq's debug lines dump AMQP frames and messages, job bodies and
    # headers included, across lines: never below INFO.
    assert not logging.getLogger("aio_pika").isEnabledFor(logging.DEBUG)
    assert not logging.getLogger("aiormq").isEnabledFor(logging.DEBUG)


def test_a_typo_in_debug_is_a_warning_naming_it_and_the_valid_names(
    stream: io.StringIO,
) -> None:
    """DEBUG=workers:webhok logs one warning naming the unknown name and the valid ones."""
    logging_config = config.parse("", environ={"DEBUG": "workers:webhok,workers:email"}).logging
    logs.configure(logging_config, stream=stream)
    [line] = lines(stream)
    assert line["level"] == "warning"
    assert line["msg"] == (
        "DEBUG: unknown name workers:webhok turns nothing on; valid: "
        "workers:webhook, workers:email, workers:sheets, workers:*"
    )


def test_reconfigure_turns_worker_debug_off_again(stream: io.StringIO) -> None:
    """A reload without DEBUG puts formcraftd.webhook back to the configured level."""
    logs.configure(LoggingConfig(debug_workers=("webhook",)), stream=stream)
    logs.configure(LoggingConfig(), stream=stream)
    logging.getLogger("formcraftd.webhook").debug("hidden")
    assert stream.getvalue() == ""
    assert logging.getLogger("formcraftd.webhook").level == logging.NOTSET


@pytest.mark.parametrize("name", ["aio_pika", "aiormq"])
def test_library_loggers_stay_at_warning(stream: io.StringIO, name: str) -> None:
    """aio-pika and aiormq log warnings (as JSON lines) but not info, even at debug level."""
    logs.configure(LoggingConfig(level="debug"), stream=stream)
    logging.getLogger(name).info("chatter")
    logging.getLogger(f"{name}.connection").warning("connection lost")
    [line] = lines(stream)
    assert (line["logger"], line["msg"]) == (f"{name}.connection", "connection lost")


def test_missing_sentry_extra_is_one_warning(
    stream: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sentry_dsn without sentry-sdk installed logs one warning naming the extra, once."""
    monkeypatch.setitem(sys.modules, "sentry_sdk", None)  # as if the extra were not installed
    dsn = "https://key@o1.ingest.sentry.io/2"
    logs.configure(LoggingConfig(sentry_dsn=dsn), stream=stream)
    logs.configure(LoggingConfig(sentry_dsn=dsn), stream=stream)
    [line] = lines(stream)
    assert line["level"] == "warning"
    assert "formcraftd[sentry]" in line["msg"]


def test_expected_broker_connection_noise_is_a_warning(stream: io.StringIO) -> None:
    """aiormq's ERROR line for a connection the broker closed is logged as a WARNING."""
    logs.configure(LoggingConfig(), stream=stream)
    logging.getLogger("aiormq.connection").error(
        "Unexpected connection close from remote %s", "amqp://guest:******@127.0.0.1:5672/"
    )
    [line] = lines(stream)
    assert line["level"] == "warning"


# --- the buffer -----------------------------------------------------------------------------


def messages(stream: io.StringIO) -> list[str]:
    return [line["msg"] for line in lines(stream)]


async def test_info_lines_wait_in_a_running_loop_until_flush(stream: io.StringIO) -> None:
    """In a running event loop INFO lines are buffered; flush() writes them out, in order."""
    logs.configure(LoggingConfig(), stream=stream)
    log = logging.getLogger("formcraftd.consumer")
    log.info("one")
    log.debug("hidden")
    log.info("two")
    assert stream.getvalue() == ""
    logs.flush()
    assert messages(stream) == ["one", "two"]


async def test_a_warning_is_written_at_once_after_the_waiting_lines(stream: io.StringIO) -> None:
    """A WARNING is not delayed, and the INFO lines logged before it come first."""
    logs.configure(LoggingConfig(), stream=stream)
    log = logging.getLogger("formcraftd.consumer")
    log.info("before")
    log.warning("warned")
    assert messages(stream) == ["before", "warned"]
    log.info("after")
    log.error("failed")
    assert messages(stream) == ["before", "warned", "after", "failed"]


async def test_waiting_lines_are_written_within_the_delay(stream: io.StringIO) -> None:
    """Without a flush, the event loop writes buffered lines out after a few milliseconds."""
    logs.configure(LoggingConfig(), stream=stream)
    logging.getLogger("formcraftd").info("soon")
    assert stream.getvalue() == ""
    await asyncio.sleep(FLUSH_DELAY_S * 4)
    assert messages(stream) == ["soon"]


async def test_a_full_buffer_is_written_without_waiting(stream: io.StringIO) -> None:
    """Once the buffer holds enough, it is written out at once."""
    logs.configure(LoggingConfig(), stream=stream)
    log = logging.getLogger("formcraftd")
    message = "x" * 1000
    for _ in range(BUFFER_CHARS // 1000 + 1):
        log.info(message)
    assert len(stream.getvalue()) > BUFFER_CHARS


async def test_reset_and_reconfigure_write_out_waiting_lines(stream: io.StringIO) -> None:
    """Replacing the handler (a reload) or removing it (reset) loses no buffered line."""
    logs.configure(LoggingConfig(), stream=stream)
    logging.getLogger("formcraftd").info("before the reload")
    logs.configure(LoggingConfig(), stream=stream)
    assert messages(stream) == ["before the reload"]
    logging.getLogger("formcraftd").info("before the reset")
    logs.reset()
    assert messages(stream) == ["before the reload", "before the reset"]


def test_lines_are_written_at_once_without_a_running_loop(stream: io.StringIO) -> None:
    """Outside an event loop (CLI commands) nothing would write the buffer out later."""
    logs.configure(LoggingConfig(), stream=stream)
    logging.getLogger("formcraftd").info("now")
    assert messages(stream) == ["now"]


def test_a_loop_that_stops_leaves_no_line_behind(stream: io.StringIO) -> None:
    """A line buffered in a loop that ended is written out with the next loop's lines."""
    logs.configure(LoggingConfig(), stream=stream)
    log = logging.getLogger("formcraftd")

    async def log_and_wait(message: str, wait: float) -> None:
        log.info(message)
        await asyncio.sleep(wait)

    asyncio.run(log_and_wait("first loop", 0))
    assert stream.getvalue() == ""
    asyncio.run(log_and_wait("second loop", FLUSH_DELAY_S * 4))
    assert messages(stream) == ["first loop", "second loop"]


async def test_lines_before_a_stdout_swap_go_to_the_old_stdout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Following sys.stdout, a buffered line goes where sys.stdout was when it was logged."""
    old, new = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", old)
    try:
        logs.configure(LoggingConfig())
        logging.getLogger("formcraftd").info("to the old stdout")
        monkeypatch.setattr(sys, "stdout", new)
        logging.getLogger("formcraftd").info("to the new stdout")
    finally:
        logs.reset()
    assert (messages(old), messages(new)) == (["to the old stdout"], ["to the new stdout"])


class BrokenStream(io.StringIO):
    """A stream whose writes fail, like stdout on a closed pipe."""

    def write(self, text: str) -> int:
        raise BrokenPipeError("stdout is gone")


@pytest.mark.parametrize("in_loop", [False, True])
def test_write_errors_are_reported_not_raised(
    capsys: pytest.CaptureFixture[str], in_loop: bool
) -> None:
    """A failing write goes to logging's error report on stderr; the caller carries on."""
    logs.configure(LoggingConfig(), stream=BrokenStream())
    log = logging.getLogger("formcraftd")

    async def log_some() -> None:
        log.info("lost")
        log.warning("lost too")

    try:
        if in_loop:
            asyncio.run(log_some())
        else:
            log.info("lost")
        logs.flush()
    finally:
        logs.reset()
    assert "BrokenPipeError: stdout is gone" in capsys.readouterr().err


def test_waiting_lines_are_written_at_exit() -> None:
    """A line still buffered when the interpreter exits is written out."""
    program = textwrap.dedent(
        """
        import asyncio, logging
        from formcraftd.ops import logs
        from formcraftd.core.config import LoggingConfig

        async def main():
            logs.configure(LoggingConfig())
            logging.getLogger("formcraftd").info("last words")
            asyncio.get_running_loop().stop()  # no chance for the timer

        loop = asyncio.new_event_loop()
        loop.create_task(main())
        loop.run_forever()
        [handler] = logging.getLogger("formcraftd").handlers
        assert handler._lines, "not buffered"
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True
    )
    assert orjson.loads(result.stdout)["msg"] == "last words"


# --- handlers of one's own --------------------------------------------------------------


def test_a_logging_config_file_adds_a_redacting_handler(
    tmp_path: Path, stream: io.StringIO
) -> None:
    """A dictConfig file's root handler gets formcraftd's records, secrets masked."""
    out = tmp_path / "extra.log"
    config_file = tmp_path / "logging.toml"
    config_file.write_text(
        textwrap.dedent(
            f"""
            version = 1
            [filters.redact]
            "()" = "formcraftd.ops.logs.RedactingFilter"
            [handlers.file]
            class = "logging.FileHandler"
            filename = "{out}"
            filters = ["redact"]
            [root]
            handlers = ["file"]
            """
        )
    )
    root_handlers = list(logging.root.handlers)
    try:
        logs.apply_config_file(str(config_file))
        logs.configure(LoggingConfig(), stream=stream)
        logging.getLogger("formcraftd.consumer").warning("password=hunter2 sent")
        logs.flush()
    finally:
        for handler in logging.root.handlers[:]:
            if handler not in root_handlers:
                logging.root.removeHandler(handler)
                handler.close()
    assert out.read_text().strip() == "password=*** sent"
    [line] = lines(stream)
    assert line["msg"] == "password=*** sent"


def test_a_broken_logging_config_file_is_a_config_error(tmp_path: Path) -> None:
    """A handler class that does not exist is one ConfigError naming the key."""
    config_file = tmp_path / "logging.json"
    config_file.write_text('{"version": 1, "handlers": {"x": {"class": "no.such.Handler"}}}')
    with pytest.raises(ConfigError, match=r"logging\.config_file"):
        logs.apply_config_file(str(config_file))
