"""A publisher connection that writes a batch of messages at once and counts the confirms.

The delivery-events publisher sends one small message per job attempt. Through
an AMQP client library each message is a publish call with its own frames,
confirmation future and socket write, which at a few thousand jobs a second
cost the events as much CPU as the jobs themselves (BENCHMARKS.md). Events
need less: one exchange, fire-and-count. So they go out on a connection of
their own (:class:`~formcraftd.amqp.raw.RawConnection`, pamqp's frame API) in
confirm mode: a batch is marshalled into one write, its messages take the
next delivery tags, and a reader counts the broker's `Basic.Ack` / `Basic.Nack`
per batch (a `multiple` confirm covers every earlier tag). A nack, a channel or
connection closed by the broker, or a batch not confirmed in time counts as
not published; the caller drops and counts those events. A message may carry
several events (`[events] events_per_message`): the caller says how many each
one counts for, so that a lost message counts all of its events.
"""

from __future__ import annotations

import asyncio
import contextlib

import pamqp.frame
from pamqp import commands, constants
from pamqp.body import ContentBody
from pamqp.common import FieldTable
from pamqp.header import ContentHeader

from formcraftd.amqp.raw import CHANNEL, RawConnection, unmarshal
from formcraftd.core.errors import BrokerError

__all__ = ["ConfirmingPublisher", "Outgoing"]

Outgoing = tuple[str, bytes, str] | tuple[str, bytes, str, FieldTable]
"""One message: routing key, JSON body, message id and, optionally, its headers."""


class _Batch:
    """The confirms of one batch: delivery tags `first` up to `first + count - 1`.

    `acked` adds up the acked messages, each counting for its entry of `weights`
    (1 each without them).
    """

    __slots__ = ("acked", "count", "done", "first", "pending", "weights")

    def __init__(
        self, first: int, count: int, weights: list[int] | None, done: asyncio.Future[None]
    ) -> None:
        self.first = first
        self.count = count
        self.weights = weights
        self.pending = count
        self.acked = 0
        self.done = done

    def confirm(self, tag: int, acked: bool) -> None:
        self.pending -= 1
        if acked:
            self.acked += 1 if self.weights is None else self.weights[tag - self.first]
        if not self.pending and not self.done.done():
            self.done.set_result(None)


class ConfirmingPublisher:
    """Publishes batches to one exchange over a raw connection in confirm mode."""

    def __init__(self, connection: RawConnection, exchange: str) -> None:
        self._connection = connection
        self._exchange = exchange
        self._next_tag = 1
        self._unconfirmed: dict[int, _Batch] = {}  # tag -> its batch, oldest first
        self._publish_frames: dict[str, bytes] = {}  # per routing key, marshalled once
        self._reader: asyncio.Task[None] | None = None
        self.closed: BaseException | None = None  # why the connection is gone

    @classmethod
    async def open(cls, url: str, exchange: str) -> ConfirmingPublisher:
        """Connect, declare `exchange` (durable topic) and turn confirms on."""
        connection = await RawConnection.open(url)
        try:
            connection.send(
                commands.Exchange.Declare(exchange=exchange, exchange_type="topic", durable=True)
            )
            await connection.expect(commands.Exchange.DeclareOk)
            connection.send(commands.Confirm.Select())
            await connection.expect(commands.Confirm.SelectOk)
        except BaseException:
            await connection.close()
            raise
        publisher = cls(connection, exchange)
        publisher._reader = asyncio.get_running_loop().create_task(
            publisher._read(), name="events: confirms"
        )
        return publisher

    async def publish(
        self, messages: list[Outgoing], within_s: float, weights: list[int] | None = None
    ) -> int:
        """Publish `messages` in one write and wait for their confirms; how many were acked.

        With `weights`, message n counts for `weights[n]` (the events it carries).
        What is not acked within `within_s` (or when the connection goes, see
        `closed`) does not count: the caller drops those messages.
        """
        if self.closed is not None:
            raise BrokerError(f"the events connection is closed: {self.closed}")
        if not messages:
            return 0
        frames = b"".join(self._frames(*message) for message in messages)
        loop = asyncio.get_running_loop()
        batch = _Batch(self._next_tag, len(messages), weights, loop.create_future())
        tags = range(batch.first, batch.first + batch.count)
        self._unconfirmed.update(dict.fromkeys(tags, batch))
        self._next_tag += batch.count
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within_s):
                    self._connection.write(frames)
                    await self._connection.drain()
                    await batch.done
        finally:
            if not batch.done.done():  # timed out or cancelled: later confirms do not count
                for tag in tags:
                    self._unconfirmed.pop(tag, None)
                batch.done.cancel()
        return batch.acked

    async def close(self) -> None:
        """Stop reading confirms and close the connection."""
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._fail_all(BrokerError("closed"))
        await self._connection.close()

    # --- internals ------------------------------------------------------------------------

    def _frames(
        self, key: str, body: bytes, message_id: str, headers: FieldTable | None = None
    ) -> bytes:
        publish = self._publish_frames.get(key)
        if publish is None:
            publish = self._publish_frames[key] = pamqp.frame.marshal(
                commands.Basic.Publish(exchange=self._exchange, routing_key=key), CHANNEL
            )
        properties = commands.Basic.Properties(
            content_type="application/json",
            delivery_mode=2,
            message_id=message_id,
            message_type=key,
            headers=headers,
        )
        parts = [publish, pamqp.frame.marshal(ContentHeader(0, len(body), properties), CHANNEL)]
        step = self._connection.frame_max - 8  # a body frame's header and end take 8 bytes
        parts += (
            pamqp.frame.marshal(ContentBody(body[start : start + step]), CHANNEL)
            for start in range(0, len(body), step)
        )
        return b"".join(parts)

    async def _read(self) -> None:
        """Count confirms until the connection ends; then fail whatever is unconfirmed."""
        try:
            while True:
                kind, payload = await self._connection.read()
                if kind != constants.FRAME_METHOD:
                    continue
                frame = unmarshal(kind, payload)
                if isinstance(frame, commands.Basic.Ack | commands.Basic.Nack):
                    self._confirm(
                        frame.delivery_tag, frame.multiple, isinstance(frame, commands.Basic.Ack)
                    )
                else:
                    RawConnection.check(frame)  # Close: the connection or channel is gone
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a read error, the end of the stream, the broker closing
            self.closed = exc
            self._fail_all(exc)

    def _confirm(self, tag: int, multiple: bool, acked: bool) -> None:
        unconfirmed = self._unconfirmed
        if not multiple:
            batch = unconfirmed.pop(tag, None)
            if batch is not None:
                batch.confirm(tag, acked)
            return
        while unconfirmed:
            oldest = next(iter(unconfirmed))
            if oldest > tag:
                break
            unconfirmed.pop(oldest).confirm(oldest, acked)

    def _fail_all(self, error: BaseException) -> None:
        """End every unconfirmed batch: what was acked counts, the rest does not."""
        batches = {id(batch): batch for batch in self._unconfirmed.values()}
        self._unconfirmed.clear()
        for batch in batches.values():
            if not batch.done.done():
                batch.done.set_result(None)
