"""The AMQP connection: the first node that answers, and after a loss the next one.

:class:`Broker` owns one plain aio-pika connection (``aio_pika.connect``) and its
reconnect loop. At start it tries the nodes of `broker.url` (comma-separated)
in order until one answers or `connect_timeout_s` has passed. When the
connection is lost it goes round the list, starting with the node after the
one it lost, once a second, until a node answers; then it calls every
listener with the new connection, so each consumer opens its channel again,
declares its queue and consumes. Channels and consumers are restored by their
owners, not by the library, so a cluster node that is gone for good costs one
round of the list, not a reconnect loop aimed at it forever.

Topology is declared on a throwaway channel so a clash with an existing
entity becomes a clear :class:`TopologyError` instead of a closed channel deep
inside a consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection

from formcraftd import __version__
from formcraftd.amqp.topology import WorkerTopology, declare_topology, describe_amqp_error
from formcraftd.core.config import BrokerConfig
from formcraftd.core.errors import BrokerError, BrokerUnreachable
from formcraftd.core.redaction import mask_url

log = logging.getLogger("formcraftd.broker")

RECONNECT_INTERVAL_S = 1.0  # between two reconnection attempts
_OPEN_TIMEOUT_S = 10.0  # the most one attempt may take
_CONNECT_ERRORS = (TimeoutError, OSError, aiormq.exceptions.AMQPError)

Listener = Callable[[AbstractConnection], Awaitable[None]]
"""Called with the new connection after a reconnection."""


class Broker:
    """Owns the connection to RabbitMQ and keeps it up, round the node list."""

    def __init__(
        self,
        config: BrokerConfig,
        *,
        name: str = f"formcraftd/{__version__}",
        on_state: Callable[[bool], None] | None = None,
    ) -> None:
        self._config = config
        self._name = name
        self._on_state = on_state
        self._nodes = [url.strip() for url in config.url.split(",") if url.strip()]
        self._next_node = 0  # index (modulo the list) of the node to try next
        self._connection: AbstractConnection | None = None
        self._listeners: list[Listener] = []
        self._reconnecting: asyncio.Task[None] | None = None
        self._up = asyncio.Event()
        self._closing = False
        self.connected = False
        self.reconnects = 0
        self.node_url = ""  # the URL of the node connected to (or last connected to)
        self.last_loss: BaseException | None = None  # why the last connection went

    @property
    def connection(self) -> AbstractConnection:
        """The current connection; BrokerError while there is none."""
        if self._connection is None or self._connection.is_closed:
            raise BrokerError("not connected to the broker")
        return self._connection

    def add_listener(self, listener: Listener) -> None:
        """Call `listener` with the new connection after every reconnection."""
        self._listeners.append(listener)

    def lost_to_an_undecodable_frame(self) -> bool:
        """Whether the last connection went because a frame could not be decoded.

        RabbitMQ accepts messages whose content header no AMQP client can decode;
        aiormq closes the connection when one arrives (see :mod:`formcraftd.amqp.raw`).
        """
        return isinstance(self.last_loss, aiormq.exceptions.InvalidFrameError)

    def remove_listener(self, listener: Listener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    async def connect(self) -> None:
        """Connect to the first node that answers, retrying until `connect_timeout_s`."""
        deadline = time.monotonic() + self._config.connect_timeout_s
        delay = 0.25
        while True:
            for _ in self._nodes:
                if await self._try_next_node(deadline):
                    return
            if time.monotonic() + delay > deadline:
                raise BrokerUnreachable(
                    f"broker not reachable after {self._config.connect_timeout_s:g} s: "
                    + ", ".join(mask_url(url) for url in self._nodes)
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def start(self) -> None:
        """Connect in the background, retrying for as long as it takes (see :meth:`ready`)."""
        if self._connection is None and self._reconnecting is None and not self._closing:
            self._reconnecting = asyncio.get_running_loop().create_task(
                self._reconnect(), name=f"{self._name}: connect"
            )

    async def ready(self) -> AbstractConnection:
        """The connection, once there is one (wait under a timeout of your own)."""
        while True:
            await self._up.wait()
            if self._connection is not None and not self._connection.is_closed:
                return self._connection
            await asyncio.sleep(0)  # lost meanwhile: the flag is about to be cleared

    async def channel(self, *, prefetch: int | None = None) -> AbstractChannel:
        """A channel with publisher confirms whose unroutable publishes raise."""
        channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        if prefetch is not None:
            await channel.set_qos(prefetch_count=prefetch)
        return channel

    async def declare(self, topology: WorkerTopology) -> None:
        """Declare `topology` idempotently; a clash raises :class:`TopologyError`."""
        channel = await self.connection.channel(publisher_confirms=False)
        try:
            await declare_topology(channel, topology)
        finally:
            if not channel.is_closed:
                await channel.close()

    async def aclose(self) -> None:
        """Stop reconnecting and close the connection."""
        self._closing = True
        task, self._reconnecting = self._reconnecting, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        connection, self._connection = self._connection, None
        self.connected = False
        self._up.clear()
        if connection is not None and not connection.is_closed:
            await connection.close()

    # --- one attempt --------------------------------------------------------------------

    async def _try_next_node(self, deadline: float | None) -> bool:
        """Try the next node of the list once; True when connected to it."""
        url = self._nodes[self._next_node % len(self._nodes)]
        self._next_node += 1
        timeout = _OPEN_TIMEOUT_S
        if deadline is not None:
            timeout = max(1.0, min(_OPEN_TIMEOUT_S, deadline - time.monotonic()))
        try:
            connection = await aio_pika.connect(
                url,
                timeout=timeout,
                client_properties={"connection_name": self._name},
                heartbeat=self._config.heartbeat_s,
            )
        except _CONNECT_ERRORS as exc:
            log.warning("broker %s not reachable: %s", mask_url(url), describe_amqp_error(exc))
            return False
        if self._closing:
            await connection.close()
            return False
        connection.close_callbacks.add(self._on_close)
        self._connection, self.node_url = connection, url
        log.info("connected to broker %s", mask_url(url))
        self._set_connected(True)
        return True

    # --- after a loss ---------------------------------------------------------------------

    def _on_close(self, connection: object, exc: BaseException | None = None) -> None:
        if self._closing or connection is not self._connection:
            return
        self.last_loss = exc
        if self.connected:
            reason = describe_amqp_error(exc) if exc else "closed"
            log.warning("broker connection lost: %s", reason)
        self._set_connected(False)
        if self._reconnecting is None:
            self._reconnecting = asyncio.get_running_loop().create_task(
                self._reconnect(), name=f"{self._name}: reconnect"
            )

    async def _reconnect(self) -> None:
        """Round the node list, once a second, until a node answers; then tell the listeners."""
        first = self._connection is None
        try:
            for attempt in itertools.count():
                if attempt:
                    await asyncio.sleep(RECONNECT_INTERVAL_S)
                if len(self._nodes) > 1:
                    node = self._nodes[self._next_node % len(self._nodes)]
                    log.info("trying broker node %s", mask_url(node))
                if await self._try_next_node(None):
                    break
        finally:
            self._reconnecting = None
        if first:
            return
        self.reconnects += 1
        log.info("reconnected to broker")
        connection = self._connection
        assert connection is not None
        for listener in list(self._listeners):
            try:
                await listener(connection)
            except Exception:
                log.exception("restoring a channel after reconnecting failed")

    def _set_connected(self, connected: bool) -> None:
        self.connected = connected
        if connected:
            self._up.set()
        else:
            self._up.clear()
        if self._on_state is not None:
            self._on_state(connected)
