"""`formcraftd dlq list|replay|purge QUEUE`: the dead-letter queue tools."""

from __future__ import annotations

import argparse
import asyncio
import difflib
import sys
from typing import TYPE_CHECKING

import aiormq
import orjson

from formcraftd.cli.common import EXIT_OK, EXIT_USAGE, fail, load_config, quiet_connection_logs
from formcraftd.core import config
from formcraftd.core.errors import FormcraftError

if TYPE_CHECKING:
    from formcraftd.amqp.dead_letters import ReplayFilter


def cmd_dlq(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    queues = {cfg.worker(kind).queue for kind in config.WORKER_KINDS}
    if args.queue not in queues:
        from formcraftd.amqp.topology import main_queue_hint

        hint = main_queue_hint(args.queue, sorted(queues)) or f" ({', '.join(sorted(queues))})"
        return fail(f"{args.queue} is not a configured queue{hint}")
    if args.limit is not None and args.limit < 1:
        return fail("--limit must be at least 1", EXIT_USAGE)
    try:
        only = _replay_filter(args)
    except ValueError as exc:
        return fail(str(exc), EXIT_USAGE)
    if (only or args.dry_run) and args.action != "replay":
        return fail(
            "--since, --until, --error-code, --host, --form-id and --dry-run go with dlq replay",
            EXIT_USAGE,
        )
    if args.action == "purge" and not args.yes:
        if not sys.stdin.isatty():
            return fail(
                f"dlq purge deletes every dead letter of {args.queue}: "
                "add --yes to confirm (stdin is not a terminal to ask on)",
                EXIT_USAGE,
            )
        if not _confirmed_purge(args.queue):
            return fail("nothing purged")
    quiet_connection_logs()
    result = asyncio.run(
        _dlq(cfg, args.action, args.queue, args.limit, only=only, dry_run=args.dry_run)
    )
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    return EXIT_OK


def _confirmed_purge(queue: str) -> bool:
    """Ask on the terminal; the queue's name or y confirms, anything else declines."""
    from formcraftd.amqp.topology import dead_letter_queue_name

    sys.stderr.write(
        f"Delete every dead letter of {queue} ({dead_letter_queue_name(queue)})? "
        f"Type {queue} or y to confirm: "
    )
    sys.stderr.flush()
    answer = sys.stdin.readline().strip()
    return answer in (queue, "y", "yes")


def _replay_filter(args: argparse.Namespace) -> ReplayFilter:
    """The replay filters of the command line; ValueError names a bad one."""
    from formcraftd.amqp.dead_letters import ReplayFilter, parse_when
    from formcraftd.core.errors import ERROR_CODES

    if args.error_code is not None and args.error_code not in ERROR_CODES:
        near = difflib.get_close_matches(args.error_code.upper(), ERROR_CODES, n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise ValueError(f"--error-code: {args.error_code!r} is no error code{hint}")
    return ReplayFilter(
        since=parse_when(args.since) if args.since else None,
        until=parse_when(args.until) if args.until else None,
        error_code=args.error_code,
        host=args.host,
        form_id=args.form_id,
    )


async def _dlq(
    cfg: config.Config,
    action: str,
    queue: str,
    limit: int | None,
    *,
    only: ReplayFilter | None = None,
    dry_run: bool = False,
) -> object:
    from formcraftd.amqp import dead_letters
    from formcraftd.amqp.connection import Broker
    from formcraftd.amqp.topology import dead_letter_queue_name

    broker = Broker(cfg.broker)
    await broker.connect()
    try:
        channel = await broker.connection.channel(publisher_confirms=True, on_return_raises=True)
        if action == "list":
            return await dead_letters.peek(channel, queue, limit or 10)
        if action == "replay":
            result = await dead_letters.replay(channel, queue, limit, only=only, dry_run=dry_run)
            return result.as_json(queue)
        return {"queue": queue, "purged": await dead_letters.purge(channel, queue)}
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise FormcraftError(
            f"{dead_letter_queue_name(queue)} does not exist (has the daemon run yet?)"
        ) from None
    finally:
        await broker.aclose()
