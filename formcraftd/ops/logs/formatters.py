"""The log formatters (JSON lines, console lines) and the redacting filter.

Both formatters run :func:`~formcraftd.core.redaction.redact` over the message,
every string field, the exception summary and the traceback: a last line of
defence, since call sites must never log a secret on purpose.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any, Final

import orjson

from formcraftd.core.redaction import might_contain_secret, redact
from formcraftd.core.text import one_line, utc_timestamp

#: Attributes a call site may set directly in ``extra=`` to have them logged.
FIELDS: Final = (
    "queue",
    "job_id",
    "form_id",
    "submission_id",
    "attempt",
    "outcome",
    "duration_ms",
    "error_code",
    "status",
    "key",
    "alert",
)
_RESERVED: Final = frozenset({"ts", "level", "logger", "msg", "exc_type", "exc", "traceback"})
_EXCEPTION_CHARS: Final = 1000


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of `record`, redacted: allowlisted extras, then ``extra["fields"]``."""
    return _redacted(record.getMessage(), _fields(record))[1]


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    attributes = record.__dict__
    for name in FIELDS:
        value = attributes.get(name)
        if value is not None:
            fields[name] = value
    extra = attributes.get("fields")
    if isinstance(extra, dict):
        for name, value in extra.items():
            fields[f"field_{name}" if name in _RESERVED else str(name)] = value
    return fields


def _redacted(message: str, fields: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """`message` and the string `fields` redacted; one search when there is nothing to mask."""
    strings = [value for value in fields.values() if isinstance(value, str)]
    if not might_contain_secret("\n".join([message, *strings]) if strings else message):
        return message, fields
    return redact(message), {
        name: redact(value) if isinstance(value, str) else value for name, value in fields.items()
    }


def _wants_traceback(record: logging.LogRecord) -> bool:
    return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def _exception_summary(record: logging.LogRecord) -> tuple[str, str] | None:
    if not record.exc_info or record.exc_info[0] is None:
        return None
    exc_type, exc_value = record.exc_info[0], record.exc_info[1]
    text = "" if exc_value is None else redact(str(exc_value))
    return exc_type.__name__, one_line(text, _EXCEPTION_CHARS)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, fields, exception summary."""

    def format(self, record: logging.LogRecord) -> str:
        """Render `record` as one line of JSON (newlines in values are escaped)."""
        message, fields = _redacted(record.getMessage(), _fields(record))
        line: dict[str, Any] = {
            "ts": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": message,
        }
        line.update(fields)
        summary = _exception_summary(record)
        if summary is not None:
            line["exc_type"], line["exc"] = summary
            if _wants_traceback(record) and record.exc_info:
                line["traceback"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(line, default=str).decode()

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """RFC 3339 in UTC with milliseconds, e.g. ``2024-05-01T12:00:00.123Z``."""
        return utc_timestamp(record.created)


class ConsoleFormatter(logging.Formatter):
    """A line for humans: ``HH:MM:SS LEVEL logger: msg key=value ...``."""

    def format(self, record: logging.LogRecord) -> str:
        """Render `record` as one readable line (a traceback follows at debug level)."""
        clock = time.strftime("%H:%M:%S", time.localtime(record.created))
        message, fields = _redacted(record.getMessage(), _fields(record))
        parts = [f"{clock} {record.levelname:<5} {record.name}: {message}"]
        parts.extend(f"{name}={_console_value(value)}" for name, value in fields.items())
        summary = _exception_summary(record)
        if summary is not None:
            parts.append(f"exc={summary[0]}: {summary[1]}")
        line = " ".join(parts)
        if summary is not None and _wants_traceback(record) and record.exc_info:
            line += "\n" + redact(self.formatException(record.exc_info))
        return line


_PLAIN: Final = re.compile(r"[\w.:/@+-]+")


def _console_value(value: Any) -> str:
    """`value` as shown after ``key=``: bare when unambiguous, else as JSON."""
    if isinstance(value, str) and _PLAIN.fullmatch(value):
        return value
    return orjson.dumps(value, default=str).decode()


class RedactingFilter(logging.Filter):
    """Redacts a record's message and string fields in place, for handlers of one's own.

    formcraftd's own formatters redact already; give this filter to any other
    handler (e.g. in a ``logging.config.dictConfig``) so that it never sees a
    secret either.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        attributes = record.__dict__
        for name in FIELDS:
            value = attributes.get(name)
            if isinstance(value, str):
                attributes[name] = redact(value)
        return True
