"""`rabbitmqctl` for the tests: this run's virtual host, and closing its connections only.

Nothing here acts on the whole broker. The tests that do (they stop RabbitMQ or set
off its memory alarm) are marked `whole_broker` and run only when
FORMCRAFTD_WHOLE_BROKER_TESTS=1 (`.ci/run` sets it).
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time

from tests.support import BROKER_URL, RUN_ID, VHOST

# The vhost FORMCRAFTD_TEST_AMQP_URL named: leftovers of this run are looked for there too.
DEFAULT_VHOST = BROKER_URL.path[1:] or "/"


class RabbitmqctlError(Exception):
    """A `rabbitmqctl` command failed; the message carries what it printed."""


def run(*args: str, timeout: float = 60) -> str:
    """Run `rabbitmqctl -q ARGS` and return what it printed."""
    try:
        done = subprocess.run(
            ["rabbitmqctl", "-q", *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except FileNotFoundError as exc:
        raise RabbitmqctlError(
            "rabbitmqctl is not installed: the tests need it to manage their own virtual host"
        ) from exc
    if done.returncode != 0:
        output = (done.stderr or done.stdout).strip()
        raise RabbitmqctlError(f"rabbitmqctl {' '.join(args)}: exit {done.returncode}: {output}")
    return done.stdout


async def run_async(*args: str, timeout: float = 60) -> str:
    """:func:`run` in a thread, for the tests' event loop."""
    return await asyncio.to_thread(run, *args, timeout=timeout)


async def close_connections(reason: str) -> None:
    """Have RabbitMQ close every connection to this run's virtual host, and no other."""
    await run_async("close_all_connections", "-p", VHOST, reason)


def broker_answers() -> bool:
    """Whether something accepts TCP connections where the tests' broker should be."""
    try:
        with socket.create_connection((BROKER_URL.host or "127.0.0.1", BROKER_URL.port or 5672), 1):
            return True
    except OSError:
        return False


def create_vhost() -> None:
    """Make this run's virtual host, open to the tests' user."""
    run("add_vhost", VHOST)
    run("set_permissions", "-p", VHOST, BROKER_URL.user or "guest", ".*", ".*", ".*")


def delete_vhost() -> None:
    """Delete this run's virtual host with everything still in it."""
    run("delete_vhost", VHOST)


def leftovers(settle_s: float = 5.0) -> list[str]:
    """The queues and exchanges this run left: any in its vhost besides the broker's own,
    and those named with the run's prefix in the default vhost.

    Waits up to `settle_s` for the list to empty: the broker removes the exclusive
    queues of a closed connection a moment after the close.
    """
    deadline = time.monotonic() + settle_s
    while True:
        found = _leftovers()
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def _leftovers() -> list[str]:
    prefix = f"fctest.{RUN_ID}."
    found = []
    for kind in ("queue", "exchange"):
        found += [
            f"{kind} {name!r} in vhost {VHOST}"
            for name in _names(kind, VHOST)
            if name and not name.startswith("amq.")  # the default exchanges
        ]
        found += [
            f"{kind} {name!r} in vhost {DEFAULT_VHOST}"
            for name in _names(kind, DEFAULT_VHOST)
            if prefix in name
        ]
    return found


def _names(kind: str, vhost: str) -> list[str]:
    listing = run(f"list_{kind}s", "-p", vhost, "name", "--formatter", "json")
    return [row["name"] for row in json.loads(listing or "[]")]
