"""Log lines on stdout: one JSON object per line, or a console line.

:func:`configure` installs one handler on the ``formcraftd`` logger (and on the
few library loggers whose warnings matter) and is safe to call again on every
reload: the handler is replaced, never duplicated. Structured fields travel in
``extra``: either ``extra={"fields": {...}}`` or an allowlisted key directly,
e.g. ``log.info("delivered %s", job_id, extra={"queue": q, "job_id": job_id})``.

:func:`redact` masks obvious secrets in free text; the formatters apply it to
every message, exception and string field as a last line of defence — call
sites must still never log a secret on purpose.

Lines below WARNING are buffered while an event loop runs: written within
``_FLUSH_DELAY_S`` or once ``_BUFFER_CHARS`` are waiting, whichever comes first;
a WARNING or worse is written at once, after what waits before it. Without a
running loop every line is written at once. :func:`flush` writes the buffer out
now (the daemon calls it as it stops; interpreter exit does too, through
logging's own shutdown hook), and so do :func:`configure` and :func:`reset`.

:func:`write_direct` writes a JSON line without the logging machinery (no
LogRecord, no formatter) when only the handler :func:`configure` installed
would see the record: the per-job line is on the hot path.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import re
import sys
import threading
import time
from collections.abc import Iterable, Mapping
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
# How long a line below WARNING may wait in the buffer, and how much may wait.
_FLUSH_DELAY_S: Final = 0.05
_BUFFER_CHARS: Final = 64 * 1024

# Loggers whose level configure() set on behalf of DEBUG=workers:<kind>, so that
# the next configure() can put them back to NOTSET (inherit).
_debug_loggers: set[str] = set()
_sentry_dsn = ""
_sentry_missing_warned = False
# The handler configure() installed (None before, and after reset()).
_handler: _StdoutHandler | None = None

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
# The same words, matched case-sensitively against lower-cased text. For ASCII
# text this finds exactly what _MAYBE_SECRET finds (the further case matches of
# IGNORECASE, such as U+017F long s for "s" or U+212A Kelvin sign for "k", are
# not ASCII), and several times faster: a case-insensitive alternation defeats
# the regex engine's first-character scan.
_MAYBE_SECRET_LOWER = re.compile(_MAYBE_SECRET.pattern)


# What every key of _SECRET_PAIR contains, lower-cased (a superset of its keys).
_PAIR_WORDS_LOWER = re.compile(r"passw|secret|token|api[_-]?key|authorization")


def _maybe_secret(text: str) -> bool:
    """Whether `text` contains one of the words every secret pattern needs."""
    if text.isascii():
        return _MAYBE_SECRET_LOWER.search(text.lower()) is not None
    return _MAYBE_SECRET.search(text) is not None


def redact(text: str) -> str:
    """`text` with URL passwords, ``whsec_`` keys, bearer tokens and secret pairs masked.

    Each pattern runs only when its own words are in `text`: a substitution that
    cannot match changes nothing, and _SECRET_PAIR is slow to find nothing
    (``[\\w-]*`` tries every start in a run of word characters, such as a job
    id), while most redacted text, a failure that names a URL, needs only
    _URL_PASSWORD. What one substitution writes in (``***``, ``:***@``, a kept
    scheme) brings no word of a later pattern that was not there before, so the
    words are looked for once, in the text as given.
    """
    if not text.isascii():  # the case-insensitive patterns' further matches: run them all
        if _MAYBE_SECRET.search(text) is None:
            return text
        text = _URL_PASSWORD.sub(r"\g<head>:***@", text)
        text = _WHSEC.sub("whsec_***", text)
        text = _AUTH_SCHEME.sub(r"\g<scheme> ***", text)
        return _SECRET_PAIR.sub(_mask_value, text)
    lower = text.lower()
    if _MAYBE_SECRET_LOWER.search(lower) is None:
        return text
    if "://" in lower:
        text = _URL_PASSWORD.sub(r"\g<head>:***@", text)
    if "whsec_" in text:
        text = _WHSEC.sub("whsec_***", text)
    if "bearer" in lower or "basic" in lower:
        text = _AUTH_SCHEME.sub(r"\g<scheme> ***", text)
    if _PAIR_WORDS_LOWER.search(lower) is not None:
        text = _SECRET_PAIR.sub(_mask_value, text)
    return text


# --- timestamps -------------------------------------------------------------------

# ".000" to ".999": the millisecond part of a timestamp, without formatting it each time.
_MILLIS: Final = tuple(f".{n:03d}" for n in range(1000))
# The last second formatted and its text, as one tuple so that threads never
# read the text of one second paired with another.
_last_second: tuple[int, str] = (-1, "")


def utc_timestamp(second: int, millis: int, zone: str = "Z") -> str:
    """RFC 3339 in UTC with milliseconds, e.g. ``2024-05-01T12:00:00.123Z``.

    `second` counts from the epoch and `millis` (0-999) is added to it; `zone`
    is written as is at the end ("Z", or "+00:00" as ``datetime.isoformat``
    writes it). The date and time of day are formatted once per second.
    """
    global _last_second  # noqa: PLW0603 - a one-entry cache shared by every caller
    cached, text = _last_second
    if cached != second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _last_second = (second, text)
    return text + _MILLIS[millis] + zone


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
        return utc_timestamp(int(record.created), int(record.msecs))


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
    """A buffering stream handler that, given no stream, writes to the *current* sys.stdout.

    Following sys.stdout (rather than keeping the object seen at configure time)
    keeps logging working when a test runner or a reload swaps the stream.

    A line below WARNING waits while an event loop runs in this thread: one
    timer on that loop writes the buffer out within ``_FLUSH_DELAY_S``, unless
    ``_BUFFER_CHARS`` pile up first. A WARNING or worse is written at once, after
    the lines before it. Without a running loop there is nothing to run a timer,
    so every line is written at once. Write errors go to :meth:`handleError`, as
    in any handler, and never reach the caller.
    """

    def __init__(self, stream: TextIO | None) -> None:
        super().__init__(stream if stream is not None else sys.stdout)
        self.name = _HANDLER_NAME
        self._follow_stdout = stream is None
        # The lock Handler.handle() holds around emit(); write_line() takes it too, so
        # lines from both share one buffer safely across threads.
        assert self.lock is not None, "Handler.__init__ creates it"
        self._lock: threading.RLock = self.lock
        self._lines: list[str] = []  # formatted lines, without terminators
        self._chars = 0
        self._timer_loop: asyncio.AbstractEventLoop | None = None  # where a flush is due

    def emit(self, record: logging.LogRecord) -> None:
        """Format `record` and buffer or write it (the caller holds the lock)."""
        try:
            text = self.format(record)
        except RecursionError:  # as StreamHandler.emit: never swallowed
            raise
        except Exception:
            self.handleError(record)
            return
        self._add(text, record.levelno)

    def write_line(self, text: str, levelno: int) -> None:
        """Buffer or write one formatted line of level `levelno`, as emit() would."""
        with self._lock:
            self._add(text, levelno)

    def flush(self) -> None:
        """Write out the buffered lines now."""
        with self._lock:
            self._write_out()

    def _add(self, text: str, levelno: int) -> None:
        if self._follow_stdout and self.stream is not sys.stdout:
            self._write_out()  # lines logged before the swap belong to the old stream
            self.stream = sys.stdout
        self._lines.append(text)
        self._chars += len(text)
        if levelno >= logging.WARNING or self._chars >= _BUFFER_CHARS:
            self._write_out()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop in this thread to write the buffer out later
            self._write_out()
            return
        # One timer per buffer, on the loop of the thread that logs: a timer left on
        # a loop that has stopped since must not hold the lines of another one.
        if self._timer_loop is not loop:
            self._timer_loop = loop
            loop.call_later(_FLUSH_DELAY_S, self._flush_due, loop)

    def _flush_due(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            if self._timer_loop is loop:
                self._timer_loop = None
            self._write_out()

    def _write_out(self) -> None:
        """Write and flush the buffered lines, or report the failure (lock held)."""
        lines = self._lines
        if not lines:
            return
        self._lines = []
        self._chars = 0
        try:
            self.stream.write(self.terminator.join(lines) + self.terminator)
            self.stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(
                logging.makeLogRecord(
                    {"name": ROOT_LOGGER, "msg": "%d log lines lost", "args": (len(lines),)}
                )
            )


def _install(logger: logging.Logger, handler: logging.Handler | None) -> None:
    for old in [h for h in logger.handlers if h.name == _HANDLER_NAME]:
        old.flush()  # its buffered lines come before anything the new handler writes
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
    reload, replaces the handler (once the lines it buffered are written out) and
    the levels; it never adds a second handler.
    """
    global _debug_loggers, _handler  # noqa: PLW0603 - the loggers are process-global too
    handler = _StdoutHandler(stream)
    handler.setFormatter(JsonFormatter() if config.format == "json" else ConsoleFormatter())
    everything = "*" in config.debug_workers

    root = logging.getLogger(ROOT_LOGGER)
    _install(root, handler)
    _handler = handler
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
    """Write out and remove the handler :func:`configure` installed, undo its levels (for tests)."""
    global _debug_loggers, _handler, _sentry_missing_warned  # noqa: PLW0603 - process-global, as loggers are
    root = logging.getLogger(ROOT_LOGGER)
    _install(root, None)
    _handler = None
    root.setLevel(logging.NOTSET)
    for name in _debug_loggers:
        logging.getLogger(name).setLevel(logging.NOTSET)
    _debug_loggers = set()
    _sentry_missing_warned = False
    for name in _LIBRARY_DEBUG_LEVELS:
        _install(logging.getLogger(name), None)
        logging.getLogger(name).setLevel(logging.NOTSET)


# --- the direct path -----------------------------------------------------------------

_PACKAGE_LOGGER: Final = logging.getLogger(ROOT_LOGGER)
# Logger.callHandlers as the logging module defines it. Sentry's logging
# integration replaces it (without functools.wraps) to see every record; while
# it is replaced, records must go through it.
_STOCK_CALL_HANDLERS: Final = (
    logging.Logger.callHandlers
    if logging.Logger.callHandlers.__module__ == logging.__name__
    else None
)


# Field values that take few distinct values (queue names come from the
# configuration, outcomes and error codes are fixed sets), each mapped to what
# redact() makes of it: looked up instead of searched, line after line. Emptied
# when it grows past _CONSTANTS_MAX, so an unexpected caller cannot grow it.
_CONSTANT_FIELDS: Final = frozenset({"queue", "outcome", "error_code"})
_CONSTANTS_MAX: Final = 256
_redacted_constants: dict[str, str] = {}


def _redacted_constant(value: str) -> str:
    """``redact(value)``, remembered for a value of one of :data:`_CONSTANT_FIELDS`."""
    redacted = _redacted_constants.get(value)
    if redacted is None:
        redacted = redact(value)
        if len(_redacted_constants) >= _CONSTANTS_MAX:
            _redacted_constants.clear()
        _redacted_constants[value] = redacted
    return redacted


def _only_json_handler(logger: logging.Logger, level: int) -> _StdoutHandler | None:
    """The JSON handler when it is all that would see `logger`'s records at `level`.

    That is: `logger` is a plain logger right under ``formcraftd``, without
    handlers or filters of its own, propagating; ``formcraftd`` has only our
    handler, which takes `level` unfiltered and formats JSON; the root logger
    has no handlers; records are built by the stock LogRecord and handed out by
    the stock Logger.callHandlers. Checked on every call: every one of these can
    change at any time without formcraftd hearing of it (pytest's log capture
    adds handlers to the root logger as each test starts; a library may add a
    filter or call setLevel), so no stamp set by configure() could stand in
    for them. The checks are attribute reads, the cheapest first.
    """
    handler = _handler
    if (
        handler is None
        or logging.root.handlers
        or logger.handlers
        or logger.filters
        or not logger.propagate
        or logger.parent is not _PACKAGE_LOGGER
        or type(logger) is not logging.Logger
        or _PACKAGE_LOGGER.handlers != [handler]
        or handler.filters
        or level < handler.level
        or type(handler.formatter) is not JsonFormatter
        or logging.Logger.callHandlers is not _STOCK_CALL_HANDLERS
        or logging.getLogRecordFactory() is not logging.LogRecord
    ):
        return None
    return handler


def write_direct(
    logger: logging.Logger, level: int, message: str, fields: Mapping[str, Any]
) -> bool:
    """Write the line ``logger.log(level, message, extra=fields)`` would, if cheaper.

    The line is built here, byte for byte as :class:`JsonFormatter` builds it
    (only the instant in ``ts`` differs), when nothing but the JSON handler
    :func:`configure` installed would see the record. Returns False, having
    written nothing, when that is not so (console format, other handlers, a
    logger with filters, Sentry's hook, a `fields` key the formatter treats
    specially); the caller then makes that logging call. `message` is final:
    what ``LogRecord.getMessage()`` would return. Only the allowlisted
    :data:`FIELDS` of `fields` are written, as with ``extra=``.

    Redaction is the formatter's, with less searching: a string of
    :data:`_CONSTANT_FIELDS` is redacted once and remembered; any other string
    field that is part of `message` (the job id, in the job line) has a secret
    word only if `message` has one; the rest and `message` are searched at once.
    """
    if not logger.isEnabledFor(level):
        return True  # the logging call would write nothing either
    handler = _only_json_handler(logger, level)
    if handler is None or "fields" in fields:
        return False
    now = time.time()
    second = int(now)
    line: dict[str, Any] = {
        "ts": utc_timestamp(second, int((now - second) * 1000)),
        "level": logging.getLevelName(level).lower(),
        "logger": logger.name,
        "msg": message,
    }
    texts: list[str] | None = None  # strings to search besides `message`
    redact_all = False  # whether a string field was not looked up among the constants
    for name in FIELDS:
        value = fields.get(name)
        if value is None:
            continue
        if isinstance(value, str):
            if name in _CONSTANT_FIELDS:
                value = _redacted_constant(value)
            else:
                redact_all = True
                # A secret word inside `value` lies inside `message` too.
                if value not in message:
                    if texts is None:
                        texts = [message, value]
                    else:
                        texts.append(value)
        line[name] = value
    # One search over every text instead of one per text: no word _maybe_secret
    # looks for spans a newline, so the joined text has one exactly when one of
    # the texts has; then each is redacted as the formatter would (the constants
    # already are, and redacting twice may differ from redacting once).
    if _maybe_secret(message if texts is None else "\n".join(texts)):
        line["msg"] = redact(message)
        if redact_all:
            for name in FIELDS:
                value = line.get(name)
                if isinstance(value, str) and name not in _CONSTANT_FIELDS:
                    line[name] = redact(value)
    try:
        text = orjson.dumps(line, default=str).decode()
    except Exception:  # e.g. an int beyond 64 bits: the logging call reports it as usual
        return False
    # The handler's lock, as Handler.handle() takes it: without it a line added
    # while another thread writes the buffer out could be appended to the list
    # being written and then dropped with it.
    with handler._lock:
        handler._add(text, level)
    return True


def flush() -> None:
    """Write out the log lines waiting in the buffer (the daemon calls this as it stops)."""
    handler = _handler
    if handler is not None:
        handler.flush()


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
    "flush",
    "record_fields",
    "redact",
    "reset",
    "utc_timestamp",
    "write_direct",
]
