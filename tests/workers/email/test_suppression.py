"""The suppression list as the email handler uses it, and its command line."""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from formcraftd.workers.email import suppression, suppression_cli
from formcraftd.workers.email.suppression import SuppressionStore
from tests.support import Names, make_config
from tests.support.smtp import HandlerFactory, SmtpServer, email_job, fails_with, job_context

pytestmark = [pytest.mark.email]


# --- suppression ----------------------------------------------------------------------------------


async def test_suppressed_recipients_are_skipped(
    smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """A suppressed address gets no RCPT; the others still get the mail."""
    handler = await make_handler(smtp_server)
    await handler.suppression.add("muted@example.com", reason="test", status=None, source="cli")
    await handler.handle(email_job("MUTED@example.com", "ok@example.com"), job_context())
    assert smtp_server.rcpt_commands == ["ok@example.com"]


async def test_a_job_with_only_suppressed_recipients_is_suppressed_without_smtp(
    smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """Nobody left to send to: SUPPRESSED, and the SMTP server is never contacted."""
    handler = await make_handler(smtp_server)
    await handler.suppression.add("muted@example.com", reason="test", status=None, source="cli")
    failure = await fails_with(handler, email_job("muted@example.com"), "SUPPRESSED")
    assert not failure.reached_service
    assert smtp_server.connections == 0


async def test_an_address_added_from_outside_is_honoured_within_the_refresh_interval(
    tmp_path: Path, smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """`suppression add` while the daemon runs: its next job to that address is skipped."""
    handler = await make_handler(smtp_server)
    outside = SuppressionStore.in_dir(tmp_path / "var")
    outside.add("late@example.com", reason="operator", source="cli")
    outside.close()
    deadline = time.monotonic() + 3
    while not handler.suppression.suppressed(["late@example.com"]):
        assert time.monotonic() < deadline, "the change was never picked up"
        await asyncio.sleep(0.05)
    await fails_with(handler, email_job("late@example.com"), "SUPPRESSED")


def test_the_suppression_store_survives_reopening(tmp_path: Path) -> None:
    """Entries are on disk: a new store on the same folder still has them."""
    store = SuppressionStore.in_dir(tmp_path)
    assert store.add("Ada@Example.com", reason="550 gone", status=550, source="smtp")
    store.close()
    again = SuppressionStore.in_dir(tmp_path)
    [entry] = again.entries()
    assert (entry.address, entry.status, entry.source) == ("ada@example.com", 550, "smtp")
    assert again.remove("ada@example.com")
    assert not again.remove("ada@example.com")
    again.close()


# --- the suppression command line ---------------------------------------------------------------


def run_suppression_cli(tmp_path: Path, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="formcraftd")
    suppression_cli.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["suppression", *argv])
    cfg = make_config(Names(), email={"state_dir": str(tmp_path)})
    return suppression_cli.run_cli(args, cfg)


def test_the_command_line_adds_lists_and_removes_addresses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`suppression add`, `list` and `remove` work on the list in state_dir, exit 0."""
    assert run_suppression_cli(tmp_path, "add", "Ada@Example.com", "--reason", "asked") == 0
    assert run_suppression_cli(tmp_path, "list") == 0
    listed = capsys.readouterr().out.splitlines()[-1].split("\t")
    assert (listed[0], listed[3], listed[4]) == ("ada@example.com", "cli", "asked")
    assert run_suppression_cli(tmp_path, "remove", "ada@example.com") == 0
    assert run_suppression_cli(tmp_path, "list", "--json") == 0
    assert capsys.readouterr().out.strip().endswith("removed")


@pytest.mark.parametrize("argv", [("list",), ("list", "--json")])
def test_listing_an_empty_list_says_so_on_stderr(
    argv: tuple[str, ...], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty list prints `no suppressed addresses in <file>` on stderr; stdout stays empty."""
    assert run_suppression_cli(tmp_path, *argv) == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"no suppressed addresses in {tmp_path / suppression.DB_NAME}\n"


@pytest.mark.parametrize(
    "argv", [("add", "not-an-address"), ("remove", "nobody@example.com"), ("add", "a@b\nc")]
)
def test_the_command_line_refuses_bad_input_with_exit_1(
    argv: tuple[str, ...], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An invalid address, or removing one that is not listed: one line on stderr, exit 1."""
    assert run_suppression_cli(tmp_path, *argv) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("formcraftd: ")


@pytest.mark.parametrize(
    "argv", [("list", "--reason", "complaint"), ("list", "--json", "--reason", "complaint")]
)
def test_the_command_line_lists_only_the_reason_asked_for(
    argv: tuple[str, ...], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`suppression list --reason complaint` shows complaints, not hard bounces."""
    store = SuppressionStore.in_dir(tmp_path)
    store.add("hard@example.com", reason="550", source="imap", kind="hard_bounce", job_id="j1")
    store.add("angry@example.com", reason="abuse", source="mailgun", kind="complaint", job_id="j2")
    store.close()
    assert run_suppression_cli(tmp_path, *argv) == 0
    out = capsys.readouterr().out
    assert "angry@example.com" in out
    assert "hard@example.com" not in out
    assert "j2" in out


# --- kinds, expiry, the file of an older release --------------------------------------------------


def test_a_soft_suppression_ends_at_its_expiry(tmp_path: Path) -> None:
    """An entry with an expiry suppresses until then, and no longer."""
    store = SuppressionStore.in_dir(tmp_path)
    store.add(
        "soft@example.com",
        reason="452",
        source="imap",
        kind="soft_bounce",
        expires_at=time.time() + 60,
    )
    store.add(
        "gone@example.com",
        reason="452",
        source="imap",
        kind="soft_bounce",
        expires_at=time.time() - 1,
    )
    assert store.suppressed(["soft@example.com", "gone@example.com"]) == {"soft@example.com"}
    assert set(store.keys()) == {"soft@example.com"}
    assert [e.address for e in store.entries()] == ["soft@example.com"]
    assert store.prune() == 1
    store.close()


def test_a_soft_bounce_never_shortens_a_permanent_suppression(tmp_path: Path) -> None:
    """A hard bounce stays permanent when a soft bounce for the same address follows."""
    store = SuppressionStore.in_dir(tmp_path)
    store.add("x@example.com", reason="550", source="imap", kind="hard_bounce", job_id="j1")
    store.add(
        "x@example.com", reason="452", source="imap", kind="soft_bounce", expires_at=time.time() + 1
    )
    [entry] = store.entries()
    assert (entry.kind, entry.expires_at, entry.job_id) == ("hard_bounce", None, "j1")
    store.add("x@example.com", reason="abuse", source="postmark", kind="complaint")
    assert store.entries()[0].kind == "complaint"
    store.close()


def test_a_list_made_by_an_older_release_gains_the_new_columns(tmp_path: Path) -> None:
    """The first release's table is migrated: SMTP refusals become hard bounces, the rest manual."""
    db = sqlite3.connect(tmp_path / suppression.DB_NAME)
    db.execute(
        "CREATE TABLE suppressed (address TEXT PRIMARY KEY, reason TEXT NOT NULL,"
        " status INTEGER, source TEXT NOT NULL, added_at TEXT NOT NULL) WITHOUT ROWID"
    )
    db.executemany(
        "INSERT INTO suppressed VALUES (?, ?, ?, ?, ?)",
        [
            ("a@example.com", "550 no", 550, "smtp", "2026-01-01T00:00:00+00:00"),
            ("b@example.com", "asked", None, "cli", "2026-01-02T00:00:00+00:00"),
        ],
    )
    db.commit()
    db.close()
    store = SuppressionStore.in_dir(tmp_path)
    assert [(e.address, e.kind) for e in store.entries()] == [
        ("a@example.com", "hard_bounce"),
        ("b@example.com", "manual"),
    ]
    store.close()
