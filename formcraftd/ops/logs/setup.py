"""Installing the log handler and levels, again on every reload.

:func:`configure` puts one :class:`StdoutHandler` on the ``formcraftd`` logger
and on the library loggers whose warnings matter (so theirs are JSON lines on
stdout too), replacing the one a previous call installed, never adding a second.
Handlers an operator added stay as they are.
"""

from __future__ import annotations

import logging
import logging.config
import re
from collections.abc import Iterable
from typing import Final, TextIO

from formcraftd.core.config import WORKER_KINDS, LoggingConfig, logging_dict_config
from formcraftd.core.errors import ConfigError
from formcraftd.core.text import one_line
from formcraftd.ops import tracking
from formcraftd.ops.logs.formatters import ConsoleFormatter, JsonFormatter
from formcraftd.ops.logs.handler import StdoutHandler

ROOT_LOGGER: Final = "formcraftd"

# Library loggers that get our handler too. Under DEBUG=workers:* they go to the
# level on the right; aio-pika and aiormq stop at INFO because their DEBUG lines
# dump whole AMQP frames and messages, job bodies (webhook secrets, refresh
# tokens) and headers included, printed across lines no redaction can follow.
_LIBRARY_DEBUG_LEVELS: Final = {
    "aio_pika": logging.INFO,
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
_HANDLER_NAME: Final = "formcraftd.stdout"

# Loggers whose level configure() set on behalf of DEBUG=workers:<kind>, so that
# the next configure() can put them back to NOTSET (inherit).
_debug_loggers: set[str] = set()


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
    """Install (or re-install) the log handler and apply `config`'s levels.

    `stream` defaults to the process's current stdout. Calling this again, e.g.
    after a reload, replaces the handler (once the lines it buffered are written
    out) and the levels.
    """
    global _debug_loggers  # noqa: PLW0603 - the loggers are process-global too
    handler = StdoutHandler(stream)
    handler.set_name(_HANDLER_NAME)
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
        tracking.start(config.sentry_dsn)
    _warn_unknown_debug_workers(config.debug_workers)


def _warn_unknown_debug_workers(kinds: Iterable[str]) -> None:
    """One warning line per name in DEBUG=workers:<name> that is no worker (a typo)."""
    valid = ", ".join(f"workers:{kind}" for kind in (*WORKER_KINDS, "*"))
    for kind in kinds:
        if kind != "*" and kind not in WORKER_KINDS:
            logging.getLogger(ROOT_LOGGER).warning(
                "DEBUG: unknown name workers:%s turns nothing on; valid: %s", kind[:100], valid
            )


def apply_config_file(path: str) -> None:
    """Add the handlers of a `logging.config_file` (dictConfig) beside formcraftd's own.

    Applied once at start, before :func:`configure`: existing loggers stay
    enabled, and handlers it puts on the root logger get every formcraftd
    record (they propagate). Give them :class:`RedactingFilter`.
    """
    document = dict(logging_dict_config(path))
    document["disable_existing_loggers"] = False
    try:
        logging.config.dictConfig(document)
    except (ValueError, TypeError, AttributeError, ImportError) as exc:
        raise ConfigError(f"key logging.config_file: {path}: {one_line(exc)}") from None


def reset() -> None:
    """Write out and remove the handler :func:`configure` installed, undo its levels (tests)."""
    global _debug_loggers  # noqa: PLW0603 - process-global, as loggers are
    root = logging.getLogger(ROOT_LOGGER)
    _install(root, None)
    root.setLevel(logging.NOTSET)
    for name in _debug_loggers:
        logging.getLogger(name).setLevel(logging.NOTSET)
    _debug_loggers = set()
    tracking.forget_missing_warning()
    for name in _LIBRARY_DEBUG_LEVELS:
        _install(logging.getLogger(name), None)
        logging.getLogger(name).setLevel(logging.NOTSET)


def flush() -> None:
    """Write out the lines waiting in the handler's buffer (the daemon calls this as it stops)."""
    for handler in logging.getLogger(ROOT_LOGGER).handlers:
        if handler.get_name() == _HANDLER_NAME:
            handler.flush()


def _install(logger: logging.Logger, handler: logging.Handler | None) -> None:
    for old in [h for h in logger.handlers if h.get_name() == _HANDLER_NAME]:
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
