"""The suppression policy: hard bounces and complaints at once, soft ones after N in a window."""

from __future__ import annotations

import asyncio
import time

import pytest

from formcraftd.core.bounces import BounceReport
from formcraftd.core.events import EmailBouncedEvent, EmailComplainedEvent, Event, routing_key
from tests.support import bounces
from tests.support.bounces import MakePolicy, PolicyUnderTest
from tests.support.smtp import HandlerFactory, SmtpServer, email_job, job_context

pytestmark = [pytest.mark.email]

JOB = "job-7d1e"
RCPT = "ada@dest.example"


def report(kind: str = "hard", recipient: str = RCPT, **fields: object) -> BounceReport:
    defaults: dict[str, object] = {
        "status": "5.1.1" if kind == "hard" else "4.2.2",
        "diagnostic": "550 5.1.1 no such user" if kind == "hard" else "452 4.2.2 full",
        "envelope_to": (bounces.verp(JOB),),
    }
    return BounceReport(kind, recipient, "imap", **{**defaults, **fields})  # type: ignore[arg-type]


async def sent(under: PolicyUnderTest, *recipients: str) -> None:
    await under.policy.record_sent(JOB, "form-9", "sub-3", list(recipients or (RCPT,)))


async def test_a_hard_bounce_suppresses_at_once_and_names_the_job(make_policy: MakePolicy) -> None:
    """One hard bounce: suppressed for good, the entry and the event carry the job's ids."""
    under = await make_policy()
    await sent(under)
    outcome = await under.policy.take(report("hard"), require_match=True)
    assert (outcome.matched, outcome.job_id, outcome.suppressed) == (True, JOB, True)
    [entry] = await under.suppression.entries()
    assert (entry.kind, entry.source, entry.job_id, entry.expires_at) == (
        "hard_bounce",
        "imap",
        JOB,
        None,
    )
    [event] = under.events
    assert isinstance(event, EmailBouncedEvent)
    assert routing_key(event) == "email.bounced"
    assert (event.job_id, event.form_id, event.submission_id) == (JOB, "form-9", "sub-3")
    assert (event.bounce_type, event.recipient, event.suppressed) == ("hard", RCPT, True)


async def test_a_complaint_suppresses_at_once(make_policy: MakePolicy) -> None:
    """A complaint suppresses and publishes email.complained."""
    under = await make_policy()
    await sent(under)
    await under.policy.take(report("complaint"), require_match=True)
    assert under.suppression.suppressed([RCPT]) == {RCPT}
    [event] = under.events
    assert isinstance(event, EmailComplainedEvent)
    assert routing_key(event) == "email.complained"
    assert event.submission_id == "sub-3"


async def test_soft_bounces_suppress_after_the_limit_for_a_while(make_policy: MakePolicy) -> None:
    """The third soft bounce in the window suppresses until soft_suppression_s has passed."""
    under = await make_policy(soft_bounce_limit=3, soft_suppression_s=3600)
    await sent(under)
    outcomes = [await under.policy.take(report("soft"), require_match=True) for _ in range(3)]
    assert [o.suppressed for o in outcomes] == [False, False, True]
    [entry] = await under.suppression.entries("soft_bounce")
    assert entry.expires_at is not None
    assert under.suppression.suppressed([RCPT]) == {RCPT}
    events = [e for e in under.events if isinstance(e, EmailBouncedEvent)]
    assert [e.suppressed for e in events] == [False, False, True]


async def test_an_expired_soft_suppression_lets_the_address_get_mail_again(
    make_policy: MakePolicy,
) -> None:
    """Once the soft suppression's time is over, the address is no longer suppressed."""
    under = await make_policy(soft_bounce_limit=1, soft_suppression_s=1)
    await sent(under)
    assert (await under.policy.take(report("soft"), require_match=True)).suppressed
    assert under.suppression.suppressed([RCPT]) == {RCPT}
    deadline = time.time() + 2.5
    while under.suppression.suppressed([RCPT]):
        assert time.time() < deadline
        await asyncio.sleep(0.1)


@pytest.mark.parametrize(
    "fields",
    [
        {"envelope_to": ("bounces+unknown-job@forms.example",)},
        {"envelope_to": (), "message_ids": ("<other@forms.example>",)},
    ],
    ids=["an unknown VERP token", "an unknown Message-ID"],
)
async def test_a_report_for_no_known_job_is_ignored_when_a_match_is_required(
    make_policy: MakePolicy, fields: dict[str, object]
) -> None:
    """The bounce mailbox applies nothing it cannot match: nobody suppressed, no event."""
    under = await make_policy()
    await sent(under)
    outcome = await under.policy.take(report("hard", **fields), require_match=True)
    assert outcome.ignored is not None
    assert not under.suppression.suppressed([RCPT])
    assert under.events == []


async def test_a_report_about_someone_who_was_not_a_recipient_is_ignored(
    make_policy: MakePolicy,
) -> None:
    """A matching job whose recipients do not include the bounced address is no match."""
    under = await make_policy()
    await sent(under, "someone-else@dest.example")
    outcome = await under.policy.take(report("hard"), require_match=True)
    assert outcome.ignored is not None
    assert not under.suppression.suppressed([RCPT])


@pytest.mark.parametrize(
    "fields",
    [
        {"envelope_to": (), "message_ids": (f"<{JOB}@forms.example>",)},
        {"envelope_to": (), "job_ids": (JOB,)},
    ],
    ids=["by Message-ID", "by X-FormCraft-Job-Id"],
)
async def test_the_job_is_found_without_a_verp_return_path(
    make_policy: MakePolicy, fields: dict[str, object]
) -> None:
    """With no VERP return path configured, the original's ids still name the job."""
    under = await make_policy(return_path="")
    await sent(under)
    outcome = await under.policy.take(report("hard", **fields), require_match=True)
    assert outcome.job_id == JOB


async def test_a_provider_report_is_applied_even_without_a_job(make_policy: MakePolicy) -> None:
    """Webhooks (require_match=False) suppress the address; the event's ids are null."""
    under = await make_policy()
    outcome = await under.policy.take(report("hard", envelope_to=()), require_match=False)
    assert (outcome.matched, outcome.suppressed) == (False, True)
    [event] = under.events
    assert isinstance(event, EmailBouncedEvent)
    assert event.job_id is None


async def test_a_later_soft_bounce_never_lifts_a_hard_suppression(make_policy: MakePolicy) -> None:
    """Hard first, then soft bounces past the limit: the entry stays permanent."""
    under = await make_policy(soft_bounce_limit=1)
    await sent(under)
    await under.policy.take(report("hard"), require_match=True)
    await under.policy.take(report("soft"), require_match=True)
    [entry] = await under.suppression.entries()
    assert (entry.kind, entry.expires_at) == ("hard_bounce", None)


async def test_a_sent_job_is_remembered_so_its_bounce_names_form_and_submission(
    smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """The email handler notes each sent job; a DSN to its VERP address then matches it."""
    events: list[Event] = []
    handler = await make_handler(
        smtp_server,
        return_path=bounces.RETURN_PATH,
        bounces={"mailgun_signing_key": "on"},
        emit=events.append,
    )
    assert handler.bounces is not None
    job = email_job(RCPT)
    await handler.handle(job, job_context(JOB))
    assert smtp_server.received[0].mail_from == bounces.verp(JOB)
    outcome = await handler.bounces.take(report("hard"), require_match=True)
    assert outcome.job_id == JOB
    [event] = events
    assert isinstance(event, EmailBouncedEvent)
    assert (event.form_id, event.submission_id) == (
        job.metadata.form_id,
        job.metadata.submission_id,
    )
    assert handler.suppression.suppressed([RCPT]) == {RCPT}
