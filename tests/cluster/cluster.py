"""A throwaway three-node RabbitMQ cluster on this machine, for the cluster tests.

Each node (`fcc1@localhost`, `fcc2@localhost`, `fcc3@localhost`) is its own
`rabbitmq-server` with its own AMQP port (5701-5703 by default), distribution
port (25701-25703), data, log, pid, config and plugins files, all in one
temporary folder. Only epmd and the Erlang cookie of the `rabbitmq` user are
shared with any other node on the machine; every listener is on 127.0.0.1.
Every `rabbitmqctl` call names its node with `-n`, so nothing here ever talks
to the machine's own broker.

No node outlives the test run: :meth:`RabbitCluster.teardown` runs from the
caller's `finally`, again at interpreter exit, and a watchdog process (in its
own session, so a Ctrl-C does not take it down first) stops the nodes and
removes the folder when the test process dies without tearing down, or when
the cluster has lived longer than `max_lifetime_s`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RABBITMQ_USER = "rabbitmq"
NODE_NAMES = ("fcc1", "fcc2", "fcc3")

# Runs in its own session; argv: the cluster folder, the lifetime bound in seconds.
# A "done" line on stdin means the test tore the cluster down itself.
_WATCHDOG = r"""
import os, pathlib, select, shutil, signal, sys, time

base = pathlib.Path(sys.argv[1])
deadline = time.monotonic() + float(sys.argv[2])
while (remaining := deadline - time.monotonic()) > 0:
    ready, _, _ = select.select([sys.stdin], [], [], min(remaining, 5.0))
    if ready:
        line = sys.stdin.readline()
        if line.strip() == "done":
            sys.exit(0)
        if not line:
            break  # the test process is gone

def ours(pid, pid_file):
    try:
        environ = pathlib.Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"RABBITMQ_PID_FILE={pid_file}".encode() in environ

pids = []
for pid_file in base.glob("*/node.pid"):
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        continue
    if ours(pid, pid_file):
        pids.append((pid, pid_file))
        os.kill(pid, signal.SIGTERM)
end = time.monotonic() + 20
while pids and time.monotonic() < end:
    pids = [(pid, f) for pid, f in pids if ours(pid, f)]
    time.sleep(0.2)
for pid, pid_file in pids:
    if ours(pid, pid_file):
        os.kill(pid, signal.SIGKILL)
time.sleep(1)
shutil.rmtree(base, ignore_errors=True)
"""


class ClusterError(RuntimeError):
    """The cluster could not be started or a `rabbitmqctl` command failed."""


@dataclass(frozen=True, slots=True)
class Node:
    """One node of the cluster."""

    short_name: str
    amqp_port: int
    dist_port: int
    folder: Path

    @property
    def name(self) -> str:
        return f"{self.short_name}@localhost"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    @property
    def pid_file(self) -> Path:
        return self.folder / "node.pid"


def unavailable_reason() -> str | None:
    """Why this machine cannot run the cluster (None when it can)."""
    for tool in ("rabbitmq-server", "rabbitmqctl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    try:
        pwd.getpwnam(RABBITMQ_USER)
    except KeyError:
        return f"there is no {RABBITMQ_USER!r} user"
    if os.geteuid() != 0 and pwd.getpwuid(os.geteuid()).pw_name != RABBITMQ_USER:
        return f"rabbitmq-server runs only as root or as {RABBITMQ_USER!r}"
    return None


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        # Like the listeners themselves: connections in TIME-WAIT do not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _process_of(node: Node) -> int | None:
    """The pid of `node`'s Erlang VM, when it is alive and really is that node."""
    try:
        pid = int(node.pid_file.read_text().strip())
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if f"RABBITMQ_PID_FILE={node.pid_file}".encode() in environ else None


class RabbitCluster:
    """Start, inspect, disturb and tear down a local RabbitMQ cluster."""

    def __init__(
        self,
        *,
        first_amqp_port: int = 5701,
        first_dist_port: int = 25701,
        startup_timeout_s: float = 90.0,
        max_lifetime_s: float = 1800.0,
    ) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="formcraftd-cluster-"))
        self.nodes = tuple(
            Node(name, first_amqp_port + i, first_dist_port + i, self.base / name)
            for i, name in enumerate(NODE_NAMES)
        )
        self.startup_timeout_s = startup_timeout_s
        self.max_lifetime_s = max_lifetime_s
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._torn_down = False
        atexit.register(self.teardown)

    # --- addresses ----------------------------------------------------------------

    def node(self, short_name: str) -> Node:
        return next(node for node in self.nodes if node.short_name == short_name)

    def urls(self, *order: str) -> str:
        """`broker.url` listing the nodes in `order` (short names), comma-separated."""
        return ",".join(self.node(name).url for name in order)

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> RabbitCluster:
        """Start the three nodes and join fcc2 and fcc3 to fcc1; tear down on failure."""
        try:
            self._check_ports()
            self._prepare_folders()
            self._start_watchdog()
            starts = [self._start_node(node) for node in self.nodes]
            for node, process in zip(self.nodes, starts, strict=True):
                if process.wait(timeout=60) != 0:
                    raise ClusterError(f"rabbitmq-server -detached failed for {node.name}")
            for node in self.nodes:
                self.await_startup(node.short_name)
            first = self.nodes[0].name
            for node in self.nodes[1:]:
                self.ctl(node.short_name, "stop_app")
                self.ctl(node.short_name, "join_cluster", first)
                self.ctl(node.short_name, "start_app")
                self.await_startup(node.short_name)
            running = self.running_nodes("fcc1")
            if sorted(running) != sorted(node.name for node in self.nodes):
                raise ClusterError(f"cluster_status shows {running} running")
        except BaseException:
            self.teardown()
            raise
        return self

    def teardown(self) -> None:
        """Shut every node down (killing what does not stop) and remove the folder."""
        if self._torn_down:
            return
        self._torn_down = True
        try:
            shutdowns = [
                (node, self._popen_ctl(node.short_name, "shutdown", "--timeout", "60"))
                for node in self.nodes
                if _process_of(node) is not None
            ]
            for node, process in shutdowns:
                try:
                    process.wait(timeout=90)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
                self._kill(node)
        finally:
            if self._watchdog is not None and self._watchdog.poll() is None:
                assert self._watchdog.stdin is not None
                with contextlib.suppress(OSError):
                    self._watchdog.stdin.write(b"done\n")
                    self._watchdog.stdin.close()
                try:
                    self._watchdog.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._watchdog.kill()
                    self._watchdog.wait()
            shutil.rmtree(self.base, ignore_errors=True)
            atexit.unregister(self.teardown)

    def __enter__(self) -> RabbitCluster:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.teardown()

    def alive(self) -> list[str]:
        """Names of the nodes whose Erlang VM is running."""
        return [node.name for node in self.nodes if _process_of(node) is not None]

    # --- rabbitmqctl ------------------------------------------------------------------

    def ctl(self, short_name: str, *args: str, timeout: float = 90.0) -> str:
        """Run `rabbitmqctl -n <node> ARGS`; its stdout, or :class:`ClusterError`."""
        command = ["rabbitmqctl", "-n", self.node(short_name).name, *args]
        try:
            result = subprocess.run(
                command, capture_output=True, timeout=timeout, check=False, env=_ctl_env()
            )
        except subprocess.TimeoutExpired:
            raise ClusterError(f"{' '.join(command)}: no answer in {timeout:g} s") from None
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).decode(errors="replace").strip()
            raise ClusterError(f"{' '.join(command)} exited {result.returncode}: {detail[:800]}")
        return result.stdout.decode(errors="replace")

    def await_startup(self, short_name: str) -> None:
        """Wait (bounded by `startup_timeout_s`) until the node's RabbitMQ app runs."""
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            try:
                self.ctl(short_name, "await_startup", "--timeout", "10", timeout=30)
                return
            except ClusterError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(1)

    def stop_app(self, short_name: str) -> None:
        """Stop RabbitMQ on one node (the Erlang VM stays up); its clients are cut off."""
        self.ctl(short_name, "stop_app")

    def start_app(self, short_name: str) -> None:
        """Start RabbitMQ again on a node stopped with :meth:`stop_app`."""
        self.ctl(short_name, "start_app")
        self.await_startup(short_name)

    def running_nodes(self, via: str) -> list[str]:
        """The `running_nodes` of `cluster_status`, as `via` sees them."""
        status = json.loads(self.ctl(via, "cluster_status", "--formatter", "json"))
        return [str(name) for name in status.get("running_nodes", [])]

    def list_queues(self, via: str, *columns: str) -> list[dict[str, Any]]:
        return self._list(via, "list_queues", columns)

    def list_consumers(self, via: str, *columns: str) -> list[dict[str, Any]]:
        return self._list(via, "list_consumers", columns)

    def list_connections(self, via: str, *columns: str) -> list[dict[str, Any]]:
        return self._list(via, "list_connections", columns)

    def _list(self, via: str, command: str, columns: tuple[str, ...]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = json.loads(
            self.ctl(via, "--quiet", command, *columns, "--formatter", "json")
        )
        return rows

    # --- internals --------------------------------------------------------------------

    def _check_ports(self) -> None:
        for node in self.nodes:
            for port in (node.amqp_port, node.dist_port):
                if not _port_free(port):
                    raise ClusterError(
                        f"port {port} on 127.0.0.1 is in use (a node left over from an "
                        f"earlier run? `rabbitmqctl -n {node.name} shutdown`)"
                    )

    def _prepare_folders(self) -> None:
        self.base.chmod(0o755)
        for node in self.nodes:
            node.folder.mkdir()
            (node.folder / "rabbitmq.conf").write_text(
                "\n".join(
                    [
                        f"listeners.tcp.local = 127.0.0.1:{node.amqp_port}",
                        "log.console = false",
                        "log.file.level = info",
                        "",
                    ]
                )
            )
            (node.folder / "advanced.config").write_text("[].\n")
            (node.folder / "enabled_plugins").write_text("[].\n")
            (node.folder / "rabbitmq-env.conf").write_text("ERL_EPMD_ADDRESS=127.0.0.1\n")
        if os.geteuid() == 0:
            user = pwd.getpwnam(RABBITMQ_USER)
            for path in [self.base, *self.base.rglob("*")]:
                os.chown(path, user.pw_uid, user.pw_gid)

    def _start_watchdog(self) -> None:
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(self.base), str(self.max_lifetime_s)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _start_node(self, node: Node) -> subprocess.Popen[bytes]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("RABBITMQ_", "ERL_"))
        }
        env.update(
            RABBITMQ_NODENAME=node.name,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(node.amqp_port),
            RABBITMQ_DIST_PORT=str(node.dist_port),
            RABBITMQ_MNESIA_BASE=str(node.folder / "mnesia"),
            RABBITMQ_LOG_BASE=str(node.folder / "log"),
            RABBITMQ_PID_FILE=str(node.pid_file),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(node.folder / "enabled_plugins"),
            RABBITMQ_CONFIG_FILE=str(node.folder / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(node.folder / "advanced.config"),
            RABBITMQ_CONF_ENV_FILE=str(node.folder / "rabbitmq-env.conf"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            ERL_EPMD_ADDRESS="127.0.0.1",
        )
        return subprocess.Popen(
            ["rabbitmq-server", "-detached"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.base,
        )

    def _popen_ctl(self, short_name: str, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            ["rabbitmqctl", "-n", self.node(short_name).name, *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=_ctl_env(),
        )

    @staticmethod
    def _kill(node: Node) -> None:
        """SIGTERM, then SIGKILL, the node's VM if it is still alive (bounded)."""
        for sig, wait_s in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
            pid = _process_of(node)
            if pid is None:
                return
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + wait_s
            while _process_of(node) is not None and time.monotonic() < deadline:
                time.sleep(0.2)


def _ctl_env() -> dict[str, str]:
    """The environment for `rabbitmqctl`: nothing that could point it at another node."""
    return {key: value for key, value in os.environ.items() if not key.startswith("RABBITMQ_")}
