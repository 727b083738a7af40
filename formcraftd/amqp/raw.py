"""A minimal AMQP 0-9-1 connection that takes messages without decoding their properties.

RabbitMQ accepts and stores a message whose content header an AMQP client
cannot decode: a short string that is not UTF-8 (a `message_id`, a
`content_type`, a header name), a timestamp past year 9999. aiormq decodes
every content header it receives; such a header makes it close the whole
connection, and the message goes back to the head of its queue, to do the
same on every reconnection. This connection speaks just enough of the
protocol (pamqp's documented frame API for the method frames) to take such a
message off its queue by delivery tag: `Basic.Get`, the body as raw bytes, the
properties when they decode and the reason when they do not, then `Basic.Ack`
or `Basic.Nack`. It is opened only for that, and closed right after.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import pamqp.frame
from pamqp import commands, constants
from pamqp.body import ContentBody
from pamqp.exceptions import UnmarshalingException
from pamqp.header import ContentHeader, ProtocolHeader

from formcraftd import __version__
from formcraftd.core.errors import BrokerError
from formcraftd.core.text import one_line

__all__ = ["RawConnection", "RawMessage"]

CHANNEL = 1
_FRAME_HEADER = struct.Struct(">BHI")  # type, channel, payload size
_CONTENT_HEADER = struct.Struct(">HHQ")  # class id, weight, body size
_GET_OK = struct.Struct(">HHQ")  # class id, method id, delivery tag (the start of GetOk)


@dataclass(frozen=True, slots=True)
class RawMessage:
    """A message taken with `Basic.Get`, its body as sent."""

    delivery_tag: int
    body: bytes
    properties: commands.Basic.Properties | None  # None: the content header did not decode
    undecodable: str  # why the header (or the GetOk frame) did not decode; "" when it did


class RawConnection:
    """One connection, one channel: `get`, `ack`, `nack_all`, `write` (tests), `close`.

    `send`, `read` and `expect` are the frame level, for the confirming publisher
    (:mod:`formcraftd.amqp.confirms`) built on the same connection.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.frame_max = constants.FRAME_MAX_SIZE

    @classmethod
    async def open(cls, url: str, *, within_s: float = 10.0) -> RawConnection:
        """Connect, log in (PLAIN) and open channel 1; BrokerError if that fails."""
        parts = urlsplit(url)
        secure = parts.scheme == "amqps"
        host = parts.hostname or "localhost"
        port = parts.port or (5671 if secure else 5672)
        context = ssl.create_default_context() if secure else None
        try:
            async with asyncio.timeout(within_s):
                reader, writer = await asyncio.open_connection(host, port, ssl=context)
                connection = cls(reader, writer)
                await connection._handshake(
                    unquote(parts.username or "guest"),
                    unquote(parts.password or "guest"),
                    unquote(parts.path[1:]) if len(parts.path) > 1 else "/",
                )
        except (OSError, TimeoutError, UnmarshalingException) as exc:
            raise BrokerError(f"raw AMQP connection failed: {one_line(exc)}") from None
        return connection

    async def get(self, queue: str) -> RawMessage | None:
        """The next message of `queue`, unacked (None when it is empty)."""
        self.send(commands.Basic.Get(queue=queue, no_ack=False))
        kind, payload = await self.read()
        if kind != constants.FRAME_METHOD:
            raise BrokerError("raw AMQP: expected a method frame after Basic.Get")
        undecodable = ""
        try:
            method = unmarshal(kind, payload)
        except UnmarshalingException as exc:  # e.g. a routing key that is not UTF-8
            class_id, method_id, delivery_tag = _GET_OK.unpack_from(payload)
            if (class_id, method_id) != (60, 71):
                raise
            undecodable = one_line(exc)
        else:
            if isinstance(method, commands.Basic.GetEmpty):
                return None
            self.check(method)
            if not isinstance(method, commands.Basic.GetOk):
                raise BrokerError(f"raw AMQP: unexpected {method.name} after Basic.Get")
            delivery_tag = method.delivery_tag
        kind, payload = await self.read()
        if kind != constants.FRAME_HEADER:
            raise BrokerError("raw AMQP: expected a content header")
        properties: commands.Basic.Properties | None = None
        try:
            header = unmarshal(kind, payload)
            assert isinstance(header, ContentHeader)
            size, properties = header.body_size, header.properties
        except UnmarshalingException as exc:
            _class, _weight, size = _CONTENT_HEADER.unpack_from(payload)
            undecodable = undecodable or one_line(exc)
        body = bytearray()
        while len(body) < size:
            kind, payload = await self.read()
            if kind != constants.FRAME_BODY:
                raise BrokerError("raw AMQP: expected a body frame")
            body += payload
        return RawMessage(delivery_tag, bytes(body), properties, undecodable)

    def ack(self, delivery_tag: int) -> None:
        self.send(commands.Basic.Ack(delivery_tag=delivery_tag))

    def nack_all(self) -> None:
        """Return every message taken and not acked to its queue."""
        self.send(commands.Basic.Nack(delivery_tag=0, multiple=True, requeue=True))

    def write(self, frames: bytes) -> None:
        """Write frames marshalled by the caller (a test publishing what a client cannot)."""
        self._writer.write(frames)

    async def drain(self) -> None:
        await self._writer.drain()

    async def close(self) -> None:
        """Close the connection politely, then the socket, whatever happens."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                self.send(commands.Connection.Close(reply_code=200, reply_text="done"), 0)
                await self._writer.drain()
                while True:
                    kind, payload = await self.read()
                    if kind == constants.FRAME_METHOD and isinstance(
                        unmarshal(kind, payload), commands.Connection.CloseOk
                    ):
                        break
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    # --- frames -------------------------------------------------------------------------

    async def _handshake(self, user: str, password: str, vhost: str) -> None:
        self._writer.write(ProtocolHeader().marshal())
        await self.expect(commands.Connection.Start)
        self.send(
            commands.Connection.StartOk(
                client_properties={"connection_name": f"formcraftd/{__version__} raw"},
                mechanism="PLAIN",
                response=f"\0{user}\0{password}",
                locale="en_US",
            ),
            0,
        )
        tune = await self.expect(commands.Connection.Tune)
        self.frame_max = tune.frame_max or constants.FRAME_MAX_SIZE
        self.send(
            commands.Connection.TuneOk(
                channel_max=tune.channel_max, frame_max=self.frame_max, heartbeat=0
            ),
            0,
        )
        self.send(commands.Connection.Open(virtual_host=vhost), 0)
        await self.expect(commands.Connection.OpenOk)
        self.send(commands.Channel.Open())
        await self.expect(commands.Channel.OpenOk)

    async def expect(self, wanted: type[Any]) -> Any:
        """Read the next frame, which must be a `wanted`; BrokerError on a Close."""
        kind, payload = await self.read()
        frame = unmarshal(kind, payload)
        self.check(frame)
        if not isinstance(frame, wanted):
            raise BrokerError(f"raw AMQP: expected {wanted.__name__}, got {frame!r}")
        return frame

    @staticmethod
    def check(frame: object) -> None:
        """Raise BrokerError if `frame` is the broker closing the channel or connection."""
        if isinstance(frame, commands.Connection.Close | commands.Channel.Close):
            raise BrokerError(f"the broker closed the raw connection: {frame.reply_text}")

    def send(self, frame: Any, channel: int = CHANNEL) -> None:
        """Write one pamqp frame (channel 1 unless told)."""
        self._writer.write(pamqp.frame.marshal(frame, channel))

    async def read(self) -> tuple[int, bytes]:
        """The next frame but heartbeats: its type and payload."""
        while True:
            kind, _channel, size = _FRAME_HEADER.unpack(await self._reader.readexactly(7))
            payload = await self._reader.readexactly(size + 1)
            if payload[-1] != constants.FRAME_END:
                raise BrokerError("raw AMQP: a frame without its end marker")
            if kind != constants.FRAME_HEARTBEAT:
                return kind, payload[:-1]


def unmarshal(kind: int, payload: bytes) -> Any:
    """pamqp's view of one frame, from its type and payload."""
    frame = _FRAME_HEADER.pack(kind, CHANNEL, len(payload)) + payload + bytes([constants.FRAME_END])
    return pamqp.frame.unmarshal(frame)[2]


def marshal_message(exchange: str, routing_key: str, header_payload: bytes, body: bytes) -> bytes:
    """The frames of one publish with a content header given as raw bytes (for tests)."""
    publish = pamqp.frame.marshal(
        commands.Basic.Publish(exchange=exchange, routing_key=routing_key), CHANNEL
    )
    header = _FRAME_HEADER.pack(constants.FRAME_HEADER, CHANNEL, len(header_payload))
    header += header_payload + bytes([constants.FRAME_END])
    return publish + header + pamqp.frame.marshal(ContentBody(body), CHANNEL)
