"""`formcraftd suppression list|add|remove`: the suppression list from the command line."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson

from formcraftd.core.config import Config
from formcraftd.workers.email.suppression import (
    KINDS,
    SuppressionError,
    SuppressionStore,
    normalize_address,
)

__all__ = ["add_cli", "run_cli"]


# --- `formcraftd suppression list|add|remove` ------------------------------------------


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register `suppression list|add|remove` on the command line's subparsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "suppression", help="list, add or remove addresses that get no email"
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=None,
        help="config file (default: $FORMCRAFTD_CONFIG, else ./config.toml)",
    )
    actions = parser.add_subparsers(dest="suppression_action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="print the suppressed addresses")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.add_argument(
        "--reason", choices=KINDS, default=None, help="only the addresses suppressed for this"
    )
    add = actions.add_parser("add", help="suppress an address")
    add.add_argument("address", metavar="ADDRESS")
    add.add_argument("--reason", default="added by an operator", help="why (kept with it)")
    remove = actions.add_parser("remove", help="let an address get email again")
    remove.add_argument("address", metavar="ADDRESS")
    for action in (listing, add, remove):  # `--config` after the action works too
        action.add_argument(
            "--config", metavar="PATH", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
    return parser


def run_cli(args: argparse.Namespace, config: Config) -> int:
    """Run one `suppression` action; 0 when done, 1 for bad input or an unusable list."""
    try:
        store = SuppressionStore.in_dir(config.workers.email.state_dir)
    except SuppressionError as exc:
        return _fail(str(exc))
    try:
        return _run_action(args, store)
    except ValueError as exc:
        return _fail(str(exc))
    except SuppressionError as exc:
        return _fail(str(exc))
    finally:
        store.close()


def _run_action(args: argparse.Namespace, store: SuppressionStore) -> int:
    action = args.suppression_action
    if action == "list":
        listed = 0
        for entry in store.entries(args.reason):
            listed += 1
            if args.json:
                line = orjson.dumps(entry).decode()
            else:
                status = "" if entry.status is None else str(entry.status)
                fields = (entry.address, entry.added_at, status, entry.source, entry.reason)
                extra = (entry.kind, entry.job_id or "", entry.expires_at or "")
                line = "\t".join(fields + extra)
            sys.stdout.write(line + "\n")
        if not listed:  # on stderr: stdout stays one address per line, for scripts
            print(f"no suppressed addresses in {store.path}", file=sys.stderr)
        return 0
    if action == "add":
        added = store.add(args.address, reason=args.reason, status=None, source="cli")
        print(f"{normalize_address(args.address)} {'added' if added else 'was already suppressed'}")
        return 0
    if store.remove(args.address):
        print(f"{normalize_address(args.address)} removed")
        return 0
    return _fail(f"{normalize_address(args.address)} is not on the suppression list")


def _fail(message: str) -> int:
    print(f"formcraftd: {message}", file=sys.stderr)
    return 1
