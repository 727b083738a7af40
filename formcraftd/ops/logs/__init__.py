"""Log lines on stdout: one JSON object per line (or a console line), every secret redacted.

Everything goes through the standard :mod:`logging` machinery: :func:`configure`
installs one :class:`StdoutHandler` with a :class:`JsonFormatter` (or
:class:`ConsoleFormatter`) on the ``formcraftd`` logger and on the library
loggers whose warnings matter, and sets the levels. An operator may add handlers
of their own with standard logging configuration (``logging.config_file``, a
``logging.config.dictConfig`` document, see :func:`apply_config_file`) and give
them :class:`RedactingFilter`. Structured fields travel in ``extra``: an
allowlisted key directly (``extra={"queue": q, "job_id": job_id}``) or
``extra={"fields": {...}}``.
"""

from formcraftd.ops.logs.formatters import (
    FIELDS,
    ConsoleFormatter,
    JsonFormatter,
    RedactingFilter,
    record_fields,
)
from formcraftd.ops.logs.handler import StdoutHandler
from formcraftd.ops.logs.setup import ROOT_LOGGER, apply_config_file, configure, flush, reset

__all__ = [
    "FIELDS",
    "ROOT_LOGGER",
    "ConsoleFormatter",
    "JsonFormatter",
    "RedactingFilter",
    "StdoutHandler",
    "apply_config_file",
    "configure",
    "flush",
    "record_fields",
    "reset",
]
