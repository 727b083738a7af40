"""What every command shares: exit codes, the one-line failure, loading the config."""

from __future__ import annotations

import logging
import sys

from formcraftd.core import config
from formcraftd.ops import logs

EXIT_OK, EXIT_INPUT, EXIT_USAGE, EXIT_BROKER = 0, 1, 2, 3


def fail(message: str, code: int = EXIT_INPUT) -> int:
    """Print `message` as one line on stderr; return the exit code."""
    print(f"formcraftd: {message}", file=sys.stderr)
    return code


def load_config(path: str | None) -> config.Config:
    """The config at `path`, else at $FORMCRAFTD_CONFIG, else ./config.toml."""
    return config.load(path or config.default_path())


def quiet_connection_logs() -> None:
    """Keep a short command's stderr to its one line: no per-attempt broker warnings.

    Without a handler, Python prints every WARNING of the connection loop on stderr.
    """
    for name in (logs.ROOT_LOGGER, "aio_pika", "aiormq"):
        logging.getLogger(name).addHandler(logging.NullHandler())
