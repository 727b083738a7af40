"""The bounce mailbox against a real Dovecot: DSNs and complaints applied, the rest untouched."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgspec
import pytest

from formcraftd.core.bounces import BounceCounts
from formcraftd.core.events import EmailBouncedEvent, EmailComplainedEvent
from formcraftd.workers.email.bounces.mailbox import BounceMailbox
from tests.support import TcpProxy, bounces
from tests.support.bounces import MakePolicy, PolicyUnderTest
from tests.support.imap import PASSWORD, USER, Dovecot, running_dovecot

pytestmark = [pytest.mark.email]

PROCESSED = "formcraftd-processed"
WAIT_S = 15.0


@pytest.fixture
async def dovecot(tmp_path: Path) -> AsyncIterator[Dovecot]:
    """Dovecot with IDLE and MOVE, as shipped."""
    async with running_dovecot(tmp_path / "dovecot") as server:
        yield server


@pytest.fixture
async def plain_dovecot(tmp_path: Path) -> AsyncIterator[Dovecot]:
    """Dovecot offering neither IDLE nor MOVE."""
    async with running_dovecot(tmp_path / "dovecot", idle=False) as server:
        yield server


@contextlib.asynccontextmanager
async def reading(
    server: Dovecot, under: PolicyUnderTest, *, password: str = PASSWORD, port: int = 0
) -> AsyncIterator[tuple[BounceMailbox, BounceCounts]]:
    """A BounceMailbox reading `server` (through `port` if given) as a background task."""
    config = under.policy.config
    settings = {
        "imap_host": "127.0.0.1",
        "imap_port": port or server.port,
        "imap_security": "none",
        "imap_username": USER,
        "imap_password": password,
        "imap_poll_interval_s": 0.2,
        # Dovecot may miss a message delivered while IDLE is being set up (it sees
        # it at its next check); restarting IDLE often bounds that wait.
        "imap_idle_s": 2,
        "imap_timeout_s": 5,
    }
    config = msgspec.structs.replace(config, **settings)
    counts = under.policy.counts  # one tally, as the daemon wires it
    mailbox = BounceMailbox(config, under.policy, counts, backoff_s=(0.1, 0.5))
    task = asyncio.create_task(mailbox.run())
    try:
        yield mailbox, counts
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(check: Callable[[], bool], timeout: float = WAIT_S) -> None:
    """Wait for a condition seen from outside (the Maildir on disk, the reader's state)."""
    async with asyncio.timeout(timeout):
        while not check():  # noqa: ASYNC110 - the Maildir has no event to wait for
            await asyncio.sleep(0.05)


def processed_flags(server: Dovecot) -> list[str]:
    """The Maildir flags of the processed folder's messages, keywords by name."""
    names = server.keywords(PROCESSED)
    return [
        "".join(sorted(flag for flag in flags if flag.isupper()))
        + "".join(f" {names[f]}" for f in flags if f.islower())
        for _, flags in server.messages(PROCESSED)
    ]


async def test_dsns_of_three_mta_styles_and_a_complaint_are_applied_and_filed(
    dovecot: Dovecot, make_policy: MakePolicy
) -> None:
    """Gmail, Exim and Postfix DSNs and an ARF complaint: suppressed, events, flagged, moved."""
    under = await make_policy(soft_bounce_limit=1)
    reports = {
        "gmail@dest.example": bounces.gmail_dsn,
        "exim@dest.example": bounces.exim_delay_dsn,
        "postfix@dest.example": bounces.postfix_dsn,
        "angry@dest.example": bounces.arf_complaint,
    }
    for n, (rcpt, make) in enumerate(reports.items()):
        job = f"job-{n}"
        await under.policy.record_sent(job, f"form-{n}", f"sub-{n}", [rcpt])
        await dovecot.append(make(job, rcpt))
    async with reading(dovecot, under) as (mailbox, counts):
        await until(lambda: len(dovecot.messages(PROCESSED)) == 4)
        await mailbox.wait_scans(1)
    assert dovecot.messages("INBOX") == []
    assert processed_flags(dovecot) == ["FS"] * 4  # Flagged and Seen
    entries = {e.address: (e.kind, e.job_id) for e in await under.suppression.entries()}
    assert entries == {
        "gmail@dest.example": ("hard_bounce", "job-0"),
        "exim@dest.example": ("soft_bounce", "job-1"),
        "postfix@dest.example": ("hard_bounce", "job-2"),
        "angry@dest.example": ("complaint", "job-3"),
    }
    bounced = {e.recipient: e for e in under.events if isinstance(e, EmailBouncedEvent)}
    assert bounced["exim@dest.example"].bounce_type == "soft"
    assert bounced["gmail@dest.example"].form_id == "form-0"
    [complaint] = [e for e in under.events if isinstance(e, EmailComplainedEvent)]
    assert (complaint.submission_id, complaint.source) == ("sub-3", "imap")
    assert counts.taken == {("imap", "hard"): 2, ("imap", "soft"): 1, ("imap", "complaint"): 1}


async def test_mail_it_cannot_parse_or_match_is_left_untouched_and_counted_once(
    dovecot: Dovecot, make_policy: MakePolicy
) -> None:
    """Replies, old-style bounces, unknown jobs, other recipients stay in INBOX, unflagged."""
    under = await make_policy()
    await under.policy.record_sent("job-known", "f", "s", ["ada@dest.example"])
    left_alone = [
        bounces.human_reply("job-known"),
        bounces.plain_text_bounce("job-known", "ada@dest.example"),
        bounces.arf_complaint("job-known", "ada@dest.example", feedback_type="not-spam"),
        bounces.gmail_dsn("job-never-sent", "ada@dest.example"),
        bounces.postfix_dsn("job-known", "not-a-recipient@dest.example"),
    ]
    for raw in left_alone:
        await dovecot.append(raw)
    async with reading(dovecot, under) as (mailbox, counts):
        await mailbox.wait_scans(1)  # the first search finds all five
    inbox = dovecot.messages("INBOX")
    assert len(inbox) == 5
    assert all(flags == "" for _, flags in inbox), inbox  # not even \Seen
    assert dovecot.messages(PROCESSED) == []
    assert counts.skipped == {"unparsed": 3, "unmatched": 2}
    assert await under.suppression.entries() == []
    assert under.events == []


async def test_a_bounce_arriving_while_it_idles_is_applied_at_once(
    dovecot: Dovecot, make_policy: MakePolicy
) -> None:
    """With IDLE, a DSN delivered later is handled without waiting for a poll."""
    under = await make_policy()
    await under.policy.record_sent("job-late", "f", "s", ["late@dest.example"])
    async with reading(dovecot, under) as (mailbox, _):
        await mailbox.wait_scans(1)
        await dovecot.append(bounces.postfix_dsn("job-late", "late@dest.example"))
        await until(lambda: bool(under.suppression.suppressed(["late@dest.example"])), 5)
        await until(lambda: len(dovecot.messages(PROCESSED)) == 1)


async def test_without_idle_or_move_it_polls_and_copies(
    plain_dovecot: Dovecot, make_policy: MakePolicy
) -> None:
    """A server without IDLE and MOVE: found by polling, copied, the original expunged."""
    under = await make_policy()
    await under.policy.record_sent("job-p", "f", "s", ["p@dest.example"])
    async with reading(plain_dovecot, under) as (mailbox, _):
        await mailbox.wait_scans(1)
        await plain_dovecot.append(bounces.gmail_dsn("job-p", "p@dest.example"))
        await until(lambda: len(plain_dovecot.messages(PROCESSED)) == 1)
        await until(lambda: plain_dovecot.messages("INBOX") == [])
    assert processed_flags(plain_dovecot) == ["FS"]


async def test_a_lost_server_is_retried_with_backoff_until_it_is_back(
    dovecot: Dovecot, make_policy: MakePolicy, caplog: pytest.LogCaptureFixture
) -> None:
    """The connection drops and the server is unreachable a while: it reconnects and goes on."""
    under = await make_policy()
    await under.policy.record_sent("job-r", "f", "s", ["r@dest.example"])
    caplog.set_level(logging.WARNING, "formcraftd.email.bounces")
    proxy = await TcpProxy(dovecot.port).start()
    async with reading(dovecot, under, port=proxy.port) as (mailbox, _):
        await until(lambda: mailbox.connected)
        await proxy.kill()  # the connection drops; connecting again is refused
        await until(lambda: not mailbox.connected and mailbox.last_error is not None)
        await until(lambda: "Refused" in (mailbox.last_error or ""))
        await proxy.start()
        await until(lambda: mailbox.connected)
        await dovecot.append(bounces.postfix_dsn("job-r", "r@dest.example"))
        await until(lambda: bool(under.suppression.suppressed(["r@dest.example"])))
    await proxy.kill()
    assert any("retrying in" in r.getMessage() for r in caplog.records)


async def test_a_refused_login_is_logged_without_the_password_and_retried(
    dovecot: Dovecot, make_policy: MakePolicy, caplog: pytest.LogCaptureFixture
) -> None:
    """Wrong credentials: a warning naming the mailbox, never the password; no crash."""
    under = await make_policy()
    wrong = "wrong-imap-password-456"
    caplog.set_level(logging.DEBUG)
    async with reading(dovecot, under, password=wrong) as (mailbox, _):
        await until(lambda: mailbox.last_error is not None and "LOGIN" in mailbox.last_error)
        await until(lambda: sum("retrying in" in r.getMessage() for r in caplog.records) >= 2)
    assert not mailbox.connected
    assert all(wrong not in r.getMessage() for r in caplog.records)
