"""The `formcraftd` command line.

Exit codes: 0 ok, 1 bad config or input (one line on stderr), 2 usage error
(including `dlq purge` without `--yes` and no terminal to ask on), 3 broker
unreachable at start (or within `enqueue --timeout`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import logging
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import aio_pika
import aiormq
import msgspec
import orjson

from formcraftd import __version__
from formcraftd.core import config, jobs
from formcraftd.core.errors import BrokerUnreachable, ConfigError, FormcraftError, TopologyError
from formcraftd.core.redaction import mask_url
from formcraftd.ops import logs
from formcraftd.workers.email import suppression_cli

if TYPE_CHECKING:
    from formcraftd.amqp.connection import Broker
    from formcraftd.amqp.dead_letters import ReplayFilter

EXIT_OK, EXIT_INPUT, EXIT_USAGE, EXIT_BROKER = 0, 1, 2, 3
ENQUEUE_TIMEOUT_S = 10.0


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {raw!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def _priority(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {raw!r}") from None
    if not 0 <= value <= 255:
        raise argparse.ArgumentTypeError("must be from 0 to 255")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="formcraftd", description="FormCraft's background-job daemon."
    )
    parser.add_argument("--version", action="version", version=f"formcraftd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument(
            "--config",
            metavar="PATH",
            default=None,
            help="config file (default: $FORMCRAFTD_CONFIG, else ./config.toml)",
        )
        return sub

    with_config(commands.add_parser("run", help="run the daemon"))
    with_config(commands.add_parser("check-config", help="validate and print the effective config"))
    schema = commands.add_parser("schema", help="print the JSON Schema of the job messages")
    schema.add_argument(
        "kind",
        nargs="?",
        choices=[*sorted(jobs.JOB_TYPES), "events"],
        help="one job type, or the delivery events (default: every job type)",
    )
    enqueue = with_config(commands.add_parser("enqueue", help="publish a job from a JSON file"))
    enqueue.add_argument("file", metavar="FILE.json", help="the job ('-' reads stdin)")
    enqueue.add_argument(
        "--timeout",
        type=_seconds,
        default=ENQUEUE_TIMEOUT_S,
        metavar="SECONDS",
        help="give up (exit 3) when connecting, publishing and the broker's confirm "
        f"take longer (default: {ENQUEUE_TIMEOUT_S:g})",
    )
    enqueue.add_argument(
        "--priority",
        type=_priority,
        default=None,
        metavar="N",
        help="the job's AMQP priority, 0-255: it overtakes lower ones waiting in a queue "
        "with workers.<kind>.max_priority (a priority above it counts as that maximum)",
    )
    dlq_cmd = with_config(commands.add_parser("dlq", help="dead-letter queue tools"))
    dlq_cmd.add_argument("action", choices=["list", "replay", "purge"])
    dlq_cmd.add_argument("queue", help="the main queue, e.g. webhook_tasks")
    dlq_cmd.add_argument(
        "--limit", type=int, default=None, metavar="N", help="at most N messages (list: default 10)"
    )
    dlq_cmd.add_argument(
        "--yes",
        action="store_true",
        help="purge without asking (needed for purge when stdin is not a terminal)",
    )
    replay_only = dlq_cmd.add_argument_group(
        "replay filters", "replay only the dead letters that match every filter given"
    )
    replay_only.add_argument(
        "--since", metavar="TIME", help="failed at or after TIME (RFC 3339, or an age: 30m, 2h, 7d)"
    )
    replay_only.add_argument("--until", metavar="TIME", help="failed before TIME")
    replay_only.add_argument("--error-code", metavar="CODE", help="e.g. HTTP_STATUS, TIMEOUT")
    replay_only.add_argument("--host", metavar="HOST", help="the webhook URL's host")
    replay_only.add_argument("--form-id", metavar="ID", help="the job's metadata.formId")
    replay_only.add_argument(
        "--dry-run", action="store_true", help="list what would be replayed; move nothing"
    )
    events_cmd = with_config(commands.add_parser("events", help="delivery events"))
    events_cmd.add_argument("action", choices=["tail"])
    events_cmd.add_argument(
        "--filter",
        default="#",
        metavar="PATTERN",
        help="routing-key pattern, e.g. 'webhook.*' or '*.dead_lettered'",
    )
    events_cmd.add_argument(
        "--count", type=int, default=None, metavar="N", help="stop after N events"
    )
    suppression_cli.add_cli(commands)
    return parser


def _fail(message: str, code: int = EXIT_INPUT) -> int:
    print(f"formcraftd: {message}", file=sys.stderr)
    return code


def _load(path: str | None) -> config.Config:
    return config.load(path or config.default_path())


def cmd_run(args: argparse.Namespace) -> int:
    import uvloop

    from formcraftd.daemon import check_config, run_daemon

    path = args.config or config.default_path()
    cfg = config.load(path)
    check_config(cfg)
    if cfg.logging.config_file:
        logs.apply_config_file(cfg.logging.config_file)
    logs.configure(cfg.logging)
    try:
        uvloop.run(run_daemon(cfg, config_path=path))
    except BrokerUnreachable as exc:
        return _fail(str(exc), EXIT_BROKER)
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    from formcraftd.daemon import check_config

    cfg = _load(args.config)
    check_config(cfg)
    sys.stdout.write(orjson.dumps(cfg.masked(), option=orjson.OPT_INDENT_2).decode() + "\n")
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    from formcraftd.core import events

    document = events.schema() if args.kind == "events" else jobs.schema(args.kind)
    sys.stdout.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")
    return EXIT_OK


def cmd_enqueue(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    try:
        body = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    except OSError as exc:
        return _fail(f"{args.file}: {exc.strerror or exc}")
    try:
        job = jobs.decode(body)
    except jobs.JobInvalid as exc:
        return _fail(f"{args.file}: invalid job: {exc}")
    kind = jobs.kind_of(job)
    worker = cfg.worker(kind)
    if args.priority and not worker.max_priority and cfg.broker.queue_type == "classic":
        print(
            f"formcraftd: warning: workers.{kind}.max_priority is 0, so {worker.queue} "
            f"takes no priorities: --priority {args.priority} changes nothing there",
            file=sys.stderr,
        )
    job_id = uuid.uuid4().hex
    _quiet_connection_logs()
    asyncio.run(
        _publish(cfg, worker.queue, body, job_id, timeout_s=args.timeout, priority=args.priority)
    )
    print(f"{job_id} -> {worker.queue}")
    return EXIT_OK


def _quiet_connection_logs() -> None:
    """Keep a short command's stderr to its one line: no per-attempt broker warnings.

    Without a handler, Python prints every WARNING of the connection loop on stderr.
    """
    for name in (logs.ROOT_LOGGER, "aio_pika", "aiormq"):
        logging.getLogger(name).addHandler(logging.NullHandler())


async def _publish(
    cfg: config.Config,
    queue: str,
    body: bytes,
    job_id: str,
    *,
    timeout_s: float,
    priority: int | None = None,
) -> None:
    """Connect, declare, publish and wait for the confirm, all within `timeout_s`."""
    from formcraftd.amqp.connection import Broker

    broker_config = msgspec.structs.replace(
        cfg.broker, connect_timeout_s=min(cfg.broker.connect_timeout_s, timeout_s)
    )
    broker = Broker(broker_config)
    connected = False
    try:
        async with asyncio.timeout(timeout_s):
            await broker.connect()
            connected = True
            await _declare_and_publish(cfg, broker, queue, body, job_id, priority=priority)
    except TimeoutError:
        if not connected:
            nodes = ", ".join(mask_url(u.strip()) for u in cfg.broker.url.split(",") if u.strip())
            raise BrokerUnreachable(
                f"broker not reachable within {timeout_s:g} s: {nodes}"
            ) from None
        raise BrokerUnreachable(
            f"the broker did not confirm the job within {timeout_s:g} s; "
            "it may or may not have been queued"
        ) from None
    finally:
        await broker.aclose()


async def _declare_and_publish(
    cfg: config.Config,
    broker: Broker,
    queue: str,
    body: bytes,
    job_id: str,
    *,
    priority: int | None,
) -> None:
    from formcraftd.amqp.topology import WorkerTopology

    kind = next(k for k in config.WORKER_KINDS if cfg.worker(k).queue == queue)
    await broker.declare(WorkerTopology.build(cfg.worker(kind), cfg.broker))
    channel = await broker.connection.channel(publisher_confirms=True, on_return_raises=True)
    message = aio_pika.Message(
        body,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=job_id,
        priority=priority,
    )
    await channel.default_exchange.publish(message, routing_key=queue, mandatory=True)


def cmd_dlq(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    queues = {cfg.worker(kind).queue for kind in config.WORKER_KINDS}
    if args.queue not in queues:
        from formcraftd.amqp.topology import main_queue_hint

        hint = main_queue_hint(args.queue, sorted(queues)) or f" ({', '.join(sorted(queues))})"
        return _fail(f"{args.queue} is not a configured queue{hint}")
    if args.limit is not None and args.limit < 1:
        return _fail("--limit must be at least 1", EXIT_USAGE)
    try:
        only = _replay_filter(args)
    except ValueError as exc:
        return _fail(str(exc), EXIT_USAGE)
    if (only or args.dry_run) and args.action != "replay":
        return _fail(
            "--since, --until, --error-code, --host, --form-id and --dry-run go with dlq replay",
            EXIT_USAGE,
        )
    if args.action == "purge" and not args.yes:
        if not sys.stdin.isatty():
            return _fail(
                f"dlq purge deletes every dead letter of {args.queue}: "
                "add --yes to confirm (stdin is not a terminal to ask on)",
                EXIT_USAGE,
            )
        if not _confirmed_purge(args.queue):
            return _fail("nothing purged")
    _quiet_connection_logs()
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


def cmd_events(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    _quiet_connection_logs()
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
    from formcraftd.core.events import BATCH_HEADER

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


def cmd_suppression(args: argparse.Namespace) -> int:
    return suppression_cli.run_cli(args, _load(args.config))


COMMANDS = {
    "run": cmd_run,
    "check-config": cmd_check_config,
    "schema": cmd_schema,
    "enqueue": cmd_enqueue,
    "dlq": cmd_dlq,
    "events": cmd_events,
    "suppression": cmd_suppression,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except BrokerUnreachable as exc:
        return _fail(str(exc), EXIT_BROKER)
    except (ConfigError, TopologyError) as exc:
        return _fail(str(exc))
    except FormcraftError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130
