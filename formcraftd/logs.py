"""Log lines on stdout: one JSON object per line, or a console line.

:func:`configure` installs one handler on the ``formcraftd`` logger (and on the
few library loggers whose warnings matter) and is safe to call again on every
reload: the handler is replaced, never duplicated. Structured fields travel in
``extra``: either ``extra={"fields": {...}}`` or an allowlisted key directly,
e.g. ``log.info("delivered %s", job_id, extra={"queue": q, "job_id": job_id})``.

:func:`redact` masks obvious secrets in free text; the formatters apply it to
every message, exception and string field as a last line of defence — call
sites must still never log a secret on purpose.
"""

from __future__ import annotations

import importlib
import logging
import re
import sys
import time
from collections.abc import Iterable
from typing import Any, Final, TextIO

import orjson

from formcraftd import __version__
from formcraftd.config import LoggingConfig

ROOT_LOGGER: Final = "formcraftd"

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

# Library loggers that get our handler too, so their warnings are JSON lines on
# stdout instead of plain text on stderr. Under DEBUG=workers:* they go to the
# level on the right; aiormq stops at INFO because its DEBUG lines dump whole
# AMQP frames, job bodies (webhook secrets, refresh tokens) included.
_LIBRARY_DEBUG_LEVELS: Final = {
    "aio_pika": logging.DEBUG,
    "aiormq": logging.INFO,
    "aiohttp": logging.INFO,
    "aiosmtplib": logging.INFO,
    "aiogoogle": logging.INFO,
    "asyncio": logging.INFO,
}
_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
_RESERVED: Final = frozenset({"ts", "level", "logger", "msg", "exc_type", "exc", "traceback"})
_HANDLER_NAME: Final = "formcraftd.stdout"

# Loggers whose level configure() set on behalf of DEBUG=workers:<kind>, so that
# the next configure() can put them back to NOTSET (inherit).
_debug_loggers: set[str] = set()
_sentry_dsn = ""
_sentry_missing_warned = False

log = logging.getLogger(__name__)


# --- redaction -----------------------------------------------------------------

_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*):[^@\s/]+@")
_WHSEC = re.compile(r"whsec_[A-Za-z0-9+/=_-]+")
_AUTH_SCHEME = re.compile(r"\b(?P<scheme>Bearer|Basic)\s+[A-Za-z0-9._~+/=-]+", re.IGNORECASE)
_SECRET_PAIR = re.compile(
    r"""(?P<key>(?:[\w-]*(?:password|passwd|secret)|access_token|refresh_token|id_token
              |admin_token|[\w-]*api[_-]?key|authorization)
         \\?["']?\s*[:=]\s*)
        (?!\\?["']?(?:Bearer|Basic)\s)  # the scheme stays readable; _AUTH_SCHEME masks the rest
        (?P<value>\\?"(?:[^"\\]|\\.)*?\\?"|'[^']*'|[^\s,&;}\]"'\\]+)""",
    re.IGNORECASE | re.VERBOSE,
)


def _mask_value(match: re.Match[str]) -> str:
    value = match.group("value")
    for quote in ('\\"', '"', "'"):
        if value.startswith(quote):
            return f"{match.group('key')}{quote}***{quote}"
    return f"{match.group('key')}***"


# Every pattern above needs one of these; most log text has none, and one
# search is far cheaper than four substitutions (job lines are on the hot path).
_MAYBE_SECRET = re.compile(
    r"://|whsec_|bearer|basic|passw|secret|token|api[_-]?key|authorization", re.IGNORECASE
)


def redact(text: str) -> str:
    """`text` with URL passwords, ``whsec_`` keys, bearer tokens and secret pairs masked."""
    if not _MAYBE_SECRET.search(text):
        return text
    text = _URL_PASSWORD.sub(r"\g<head>:***@", text)
    text = _WHSEC.sub("whsec_***", text)
    text = _AUTH_SCHEME.sub(r"\g<scheme> ***", text)
    return _SECRET_PAIR.sub(_mask_value, text)


# --- formatters ------------------------------------------------------------------


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of `record`: allowlisted extras, then ``extra["fields"]``."""
    fields: dict[str, Any] = {}
    for name in FIELDS:
        value = record.__dict__.get(name)
        if value is not None:
            fields[name] = value
    extra = record.__dict__.get("fields")
    if isinstance(extra, dict):
        for name, value in extra.items():
            fields[f"field_{name}" if name in _RESERVED else str(name)] = value
    return {name: redact(v) if isinstance(v, str) else v for name, v in fields.items()}


def _wants_traceback(record: logging.LogRecord) -> bool:
    return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def _exception_summary(record: logging.LogRecord) -> tuple[str, str] | None:
    if not record.exc_info or record.exc_info[0] is None:
        return None
    exc_type, exc_value = record.exc_info[0], record.exc_info[1]
    text = " ".join(str(exc_value).split()) if exc_value is not None else ""
    return exc_type.__name__, redact(text)[:1000]


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, fields, exception summary."""

    def format(self, record: logging.LogRecord) -> str:
        """Render `record` as one line of JSON (newlines in values are escaped)."""
        line: dict[str, Any] = {
            "ts": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        line.update(record_fields(record))
        summary = _exception_summary(record)
        if summary is not None:
            line["exc_type"], line["exc"] = summary
            if _wants_traceback(record) and record.exc_info:
                line["traceback"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(line, default=str).decode()

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """RFC 3339 in UTC with milliseconds, e.g. ``2024-05-01T12:00:00.123Z``."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"


class ConsoleFormatter(logging.Formatter):
    """A line for humans: ``HH:MM:SS LEVEL logger: msg key=value ...``."""

    def format(self, record: logging.LogRecord) -> str:
        """Render `record` as one readable line (a traceback follows at debug level)."""
        clock = time.strftime("%H:%M:%S", time.localtime(record.created))
        parts = [f"{clock} {record.levelname:<5} {record.name}: {redact(record.getMessage())}"]
        parts.extend(
            f"{name}={_console_value(value)}" for name, value in record_fields(record).items()
        )
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
    if isinstance(value, bool | int | float) or value is None:
        return orjson.dumps(value).decode()
    return orjson.dumps(value, default=str).decode()


# --- configure ---------------------------------------------------------------------


class _StdoutHandler(logging.StreamHandler[TextIO]):
    """A stream handler that, when given no stream, writes to the *current* sys.stdout.

    Following sys.stdout (rather than keeping the object seen at configure time)
    keeps logging working when a test runner or a reload swaps the stream.
    """

    def __init__(self, stream: TextIO | None) -> None:
        super().__init__(stream if stream is not None else sys.stdout)
        self.name = _HANDLER_NAME
        self._follow_stdout = stream is None

    def emit(self, record: logging.LogRecord) -> None:
        """Write `record`, to sys.stdout as it is now when following it."""
        if self._follow_stdout and self.stream is not sys.stdout:
            self.stream = sys.stdout
        super().emit(record)


def _install(logger: logging.Logger, handler: logging.Handler | None) -> None:
    for old in [h for h in logger.handlers if h.name == _HANDLER_NAME]:
        logger.removeHandler(old)
    if handler is not None:
        logger.addHandler(handler)


def _debug_logger_names(kinds: Iterable[str]) -> set[str]:
    # A worker module may log as formcraftd.<kind> or, by __name__, as
    # formcraftd.workers.<kind>; both are switched on.
    names: set[str] = set()
    for kind in kinds:
        if re.fullmatch(r"[A-Za-z0-9_]+", kind):
            names.update((f"{ROOT_LOGGER}.{kind}", f"{ROOT_LOGGER}.workers.{kind}"))
    return names


class _ExpectedBrokerNoise(logging.Filter):
    """Lower to WARNING the ERROR lines aio-pika/aiormq write for a lost connection.

    A broker restart or a node failover is expected and already reported by
    formcraftd's own WARNING ("broker connection lost") and the alert; at ERROR
    these lines would also become error-tracking events.
    """

    _PREFIXES = ("Unexpected connection close", "Callback <OneShotCallback")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and str(record.msg).startswith(self._PREFIXES):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_BROKER_NOISE = _ExpectedBrokerNoise()


def configure(config: LoggingConfig, *, stream: TextIO | None = None) -> None:
    """Install (or re-install) the one log handler and apply `config`'s levels.

    `stream` defaults to the process's stdout. Calling this again, e.g. after a
    reload, replaces the handler and the levels; it never adds a second handler.
    """
    global _debug_loggers  # noqa: PLW0603 - the loggers are process-global too
    handler = _StdoutHandler(stream)
    handler.setFormatter(JsonFormatter() if config.format == "json" else ConsoleFormatter())
    everything = "*" in config.debug_workers

    root = logging.getLogger(ROOT_LOGGER)
    _install(root, handler)
    root.setLevel(logging.DEBUG if everything else _LEVELS[config.level])

    wanted = set() if everything else _debug_logger_names(config.debug_workers)
    for name in _debug_loggers - wanted:
        logging.getLogger(name).setLevel(logging.NOTSET)
    for name in wanted:
        logging.getLogger(name).setLevel(logging.DEBUG)
    _debug_loggers = wanted

    for name, debug_level in _LIBRARY_DEBUG_LEVELS.items():
        library = logging.getLogger(name)
        _install(library, handler)
        library.setLevel(debug_level if everything else logging.WARNING)

    for name in ("aiormq.connection", "aio_pika.tools"):
        noisy = logging.getLogger(name)
        if _BROKER_NOISE not in noisy.filters:
            noisy.addFilter(_BROKER_NOISE)

    if config.sentry_dsn:
        _init_sentry(config.sentry_dsn)


def reset() -> None:
    """Remove the handler :func:`configure` installed and the levels it set (for tests)."""
    global _debug_loggers, _sentry_missing_warned  # noqa: PLW0603 - process-global, as loggers are
    root = logging.getLogger(ROOT_LOGGER)
    _install(root, None)
    root.setLevel(logging.NOTSET)
    for name in _debug_loggers:
        logging.getLogger(name).setLevel(logging.NOTSET)
    _debug_loggers = set()
    _sentry_missing_warned = False
    for name in _LIBRARY_DEBUG_LEVELS:
        _install(logging.getLogger(name), None)
        logging.getLogger(name).setLevel(logging.NOTSET)


# --- Sentry (optional extra) --------------------------------------------------------
#
# Started by configure() when `logging.sentry_dsn` is set; formcraftd.tracking
# reports dead letters and unexpected handler errors through it. Every event
# passes _before_send, which runs redact() over each string in it (message,
# exception values, tags, extras, breadcrumbs, contexts), after the SDK has
# serialised it and after its own key-based scrubber.


def _scrub(value: Any) -> Any:
    """`value` (a Sentry event, nested) with :func:`redact` applied to every string."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: _scrub(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(item) for item in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    # The SDK serialises events before before_send; anything else is shown as text.
    return redact(repr(value))


def _before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
    scrubbed: dict[str, Any] = _scrub(event)
    return scrubbed


def _sentry_options(dsn: str) -> dict[str, Any]:
    return {
        "dsn": dsn,
        "release": f"formcraftd@{__version__}",
        # send_default_pii stays unset (off): newer SDKs warn when it is passed at all.
        # Handler frames hold job bodies: webhook secrets, refresh tokens, addresses.
        "include_local_variables": False,
        "max_request_body_size": "never",
        # No auto-patched libraries (aiohttp's client would add sentry-trace and
        # baggage headers to customers' webhooks), and no trace headers anywhere.
        "auto_enabling_integrations": False,
        "trace_propagation_targets": [],
        "before_send": _before_send,
    }


def _init_sentry(dsn: str) -> None:
    """Start Sentry once per DSN; without the extra installed, warn once and go on."""
    global _sentry_dsn, _sentry_missing_warned  # noqa: PLW0603 - one SDK per process
    try:
        sentry_sdk = importlib.import_module("sentry_sdk")
    except ImportError:
        if not _sentry_missing_warned:
            _sentry_missing_warned = True
            log.warning(
                "logging.sentry_dsn is set but sentry-sdk is not installed; "
                "install the formcraftd[sentry] extra to report errors"
            )
        return
    # A reload with the same DSN keeps the running client, unless it was closed.
    if dsn == _sentry_dsn and sentry_sdk.get_client().is_active():
        return
    sentry_sdk.init(**_sentry_options(dsn))
    _sentry_dsn = dsn


__all__ = [
    "FIELDS",
    "ConsoleFormatter",
    "JsonFormatter",
    "configure",
    "record_fields",
    "redact",
    "reset",
]
