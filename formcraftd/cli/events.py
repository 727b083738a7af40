"""`formcraftd events tail`: print delivery events as they arrive."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

import aio_pika
import aiormq
import msgspec

from formcraftd.cli.common import EXIT_OK, load_config, quiet_connection_logs
from formcraftd.core import config
from formcraftd.core.errors import FormcraftError
from formcraftd.core.events import BATCH_HEADER


def cmd_events(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    quiet_connection_logs()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_tail_events(cfg, args.filter, args.count))
    return EXIT_OK


async def _tail_events(cfg: config.Config, pattern: str, count: int | None) -> None:
    """Print events as they arrive, from a temporary exclusive queue bound to the exchange.

    With `[events] enabled = false` the exchange is only looked up, not
    declared: when it exists (another daemon publishes to it) the tail goes on
    with a note on stderr; when it does not, nothing ever will, and it says so.
    """
    from formcraftd.amqp.connection import Broker

    broker = Broker(cfg.broker)
    await broker.connect()
    try:
        channel = await broker.connection.channel()
        name = cfg.events.exchange
        if cfg.events.enabled:
            exchange = await channel.declare_exchange(
                name, aio_pika.ExchangeType.TOPIC, durable=True
            )
        else:
            exchange = await _existing_events_exchange(channel, cfg)
            print(
                f"# delivery events are off in {cfg.source or 'the config'} ([events] enabled ="
                f" false); tailing {name} anyway: it exists, another daemon may publish to it",
                file=sys.stderr,
            )
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, routing_key=pattern)
        print(f"# tailing {name} ({pattern}); Ctrl-C to stop", file=sys.stderr)
        seen = 0
        async with queue.iterator() as messages:
            async for message in messages:
                await message.ack()
                lines = _event_lines(message)
                if count is not None:
                    lines = lines[: count - seen]
                sys.stdout.write("".join(line.decode("utf-8", "replace") + "\n" for line in lines))
                sys.stdout.flush()
                seen += len(lines)
                if count is not None and seen >= count:
                    break
    finally:
        await broker.aclose()


def _event_lines(message: aio_pika.abc.AbstractIncomingMessage) -> list[bytes]:
    """The events of one message, a JSON object each: the elements of an array body
    (`events_per_message` above 1, with its header), else the body itself."""
    if BATCH_HEADER in (message.headers or {}):
        with contextlib.suppress(msgspec.DecodeError):
            return [bytes(event) for event in _raw_array.decode(message.body)]
    return [message.body]


_raw_array = msgspec.json.Decoder(list[msgspec.Raw])


async def _existing_events_exchange(
    channel: aio_pika.abc.AbstractChannel, cfg: config.Config
) -> aio_pika.abc.AbstractExchange:
    """The events exchange if it exists; FormcraftError (events are off) if not."""
    try:
        return await channel.get_exchange(cfg.events.exchange, ensure=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise FormcraftError(
            f"delivery events are off ([events] enabled = false in {cfg.source or 'the config'})"
            f" and no daemon has declared {cfg.events.exchange}: set enabled = true under"
            " [events] and restart the daemon to publish them"
        ) from None
