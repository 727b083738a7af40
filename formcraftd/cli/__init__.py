"""The `formcraftd` command line: the parser, the commands that run the daemon or
read the config, and the dispatch to the broker tools (enqueue, dlq, events).

Exit codes: 0 ok, 1 bad config or input (one line on stderr), 2 usage error
(including `dlq purge` without `--yes` and no terminal to ask on), 3 broker
unreachable at start (or within `enqueue --timeout`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import orjson

from formcraftd import __version__
from formcraftd.cli.common import EXIT_BROKER, EXIT_OK, fail, load_config
from formcraftd.cli.dlq import cmd_dlq
from formcraftd.cli.enqueue import ENQUEUE_TIMEOUT_S, cmd_enqueue
from formcraftd.cli.events import cmd_events
from formcraftd.core import config, jobs
from formcraftd.core.errors import BrokerUnreachable, ConfigError, FormcraftError, TopologyError
from formcraftd.ops import logs
from formcraftd.workers.email import suppression_cli

__all__ = ["main"]


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
        return fail(str(exc), EXIT_BROKER)
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    from formcraftd.daemon import check_config

    cfg = load_config(args.config)
    check_config(cfg)
    sys.stdout.write(orjson.dumps(cfg.masked(), option=orjson.OPT_INDENT_2).decode() + "\n")
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    from formcraftd.core import events

    document = events.schema() if args.kind == "events" else jobs.schema(args.kind)
    sys.stdout.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")
    return EXIT_OK


def cmd_suppression(args: argparse.Namespace) -> int:
    return suppression_cli.run_cli(args, load_config(args.config))


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
        return fail(str(exc), EXIT_BROKER)
    except (ConfigError, TopologyError) as exc:
        return fail(str(exc))
    except FormcraftError as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        return 130
