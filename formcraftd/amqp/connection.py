"""The AMQP side: one robust connection, the queue topology, confirmed publishing.

The connection is an aio-pika robust connection: it reconnects by itself and
restores channels, queues and consumers. Topology is declared on a throwaway
channel first so a clash with an existing entity becomes a clear
:class:`TopologyError` instead of a closed channel deep inside a consumer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aio_pika.connection import make_url
from aio_pika.robust_connection import RobustConnection
from yarl import URL

from formcraftd import __version__
from formcraftd.amqp.topology import WorkerTopology, declare_topology, describe_amqp_error
from formcraftd.core.config import BrokerConfig
from formcraftd.core.errors import BrokerError, BrokerUnreachable
from formcraftd.core.redaction import mask_url

log = logging.getLogger("formcraftd.broker")


class FailoverConnection(RobustConnection):
    """A robust connection to a cluster: every reconnection attempt tries the next node.

    aio-pika reconnects to the URL it started with; when that node is gone
    for good, the daemon must move on. Each attempt begins by clearing
    `transport`, which is where the next node's URL is chosen.
    """

    def __init__(self, url: URL, *, nodes: list[URL], **kwargs: Any) -> None:
        self._nodes = nodes or [url]
        self._next_node = next(
            (
                i + 1
                for i, node in enumerate(self._nodes)
                if node.host == url.host and node.port == url.port
            ),
            1,
        )
        self._failover = False  # only after the first connection succeeded
        self._transport: Any = None
        super().__init__(url, **kwargs)

    @property
    def transport(self) -> Any:
        return self._transport

    @transport.setter
    def transport(self, value: Any) -> None:
        closing = getattr(self, "_close_in_progress", False) or getattr(
            self, "_close_called", False
        )
        if value is None and self._failover and len(self._nodes) > 1 and not closing:
            self.url = self._nodes[self._next_node % len(self._nodes)]
            self._next_node += 1
            log.info("trying broker node %s", mask_url(str(self.url)))
        self._transport = value

    async def _on_connected(self) -> None:
        await super()._on_connected()
        self._failover = True


class Broker:
    """Owns the robust connection and reports its state through callbacks."""

    def __init__(
        self,
        config: BrokerConfig,
        *,
        on_state: Callable[[bool], None] | None = None,
    ) -> None:
        self._config = config
        self._on_state = on_state
        self._connection: AbstractRobustConnection | None = None
        self.connected = False
        self.reconnects = 0
        self._closing = False

    @property
    def connection(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise BrokerError("not connected")
        return self._connection

    async def connect(self) -> None:
        """Connect to the first URL that answers, retrying until `connect_timeout_s`."""
        urls = [u.strip() for u in self._config.url.split(",") if u.strip()]
        deadline = time.monotonic() + self._config.connect_timeout_s
        delay = 0.25
        while True:
            for url in urls:
                try:
                    self._connection = await self._open(url, deadline)
                except (TimeoutError, OSError, aiormq.exceptions.AMQPError) as exc:
                    log.warning(
                        "broker %s not reachable: %s", mask_url(url), describe_amqp_error(exc)
                    )
                    continue
                self._connection.close_callbacks.add(self._on_close)
                self._connection.reconnect_callbacks.add(self._on_reconnect)
                self._set_connected(True)
                log.info("connected to broker %s", mask_url(url))
                return
            if time.monotonic() + delay > deadline:
                raise BrokerUnreachable(
                    f"broker not reachable after {self._config.connect_timeout_s:g} s: "
                    + ", ".join(mask_url(u) for u in urls)
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _open(self, url: str, deadline: float) -> AbstractRobustConnection:
        timeout = max(1.0, min(10.0, deadline - time.monotonic()))
        options: dict[str, Any] = {
            "heartbeat": self._config.heartbeat_s,
            "reconnect_interval": 1,
        }
        nodes = [make_url(u.strip(), **options) for u in self._config.url.split(",") if u.strip()]

        def factory(first: URL, **kwargs: Any) -> FailoverConnection:
            return FailoverConnection(first, nodes=nodes, **kwargs)

        connection = await aio_pika.connect_robust(
            url,
            timeout=timeout,
            client_properties={"connection_name": f"formcraftd/{__version__}"},
            connection_class=factory,
            **options,
        )
        assert isinstance(connection, AbstractRobustConnection)
        return connection

    def _set_connected(self, connected: bool) -> None:
        self.connected = connected
        if self._on_state is not None:
            self._on_state(connected)

    def _on_close(self, _connection: object, exc: BaseException | None = None) -> None:
        if self._closing:
            return
        if self.connected:
            log.warning("broker connection lost: %s", describe_amqp_error(exc) if exc else "closed")
        self._set_connected(False)

    def _on_reconnect(self, _connection: object) -> None:
        self.reconnects += 1
        log.info("reconnected to broker")
        self._set_connected(True)

    async def channel(self, *, prefetch: int) -> AbstractRobustChannel:
        """A robust channel with publisher confirms and unroutable publishes raising."""
        channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.set_qos(prefetch_count=prefetch)
        assert isinstance(channel, AbstractRobustChannel)
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
        self._closing = True
        if self._connection is not None and not self._connection.is_closed:
            self.connected = False
            await self._connection.close()
