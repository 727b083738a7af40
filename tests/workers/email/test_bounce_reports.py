"""DSN and ARF parsing: what the bounce reader makes of the reports real servers send."""

from __future__ import annotations

import pytest

from formcraftd.workers.email.bounces.mailbox import read_report
from formcraftd.workers.email.bounces.reports import NotAReport
from tests.support import bounces

pytestmark = [pytest.mark.email]

JOB = "job-0f3c9a"
RCPT = "ada@dest.example"
VERP = bounces.verp(JOB)


@pytest.mark.parametrize(
    ("make", "kind", "status"),
    [
        (bounces.gmail_dsn, "hard", "5.1.1"),
        (bounces.exim_delay_dsn, "soft", "4.0.0"),
        (bounces.postfix_dsn, "hard", "5.1.1"),
    ],
)
def test_each_mta_style_dsn_names_the_recipient_the_kind_and_the_job(
    make: object, kind: str, status: str
) -> None:
    """Gmail, Exim and Postfix DSNs: recipient, hard/soft, status, and the job's identifiers."""
    assert callable(make)
    parsed = read_report(make(JOB, RCPT))
    [result] = parsed.results
    assert (parsed.format, result.type, result.recipient, result.status) == (
        "dsn",
        kind,
        RCPT,
        status,
    )
    assert parsed.message_ids == [f"<{JOB}@{bounces.DOMAIN}>"]
    assert parsed.job_ids == [JOB]
    assert VERP in parsed.envelope_to


def test_a_dsn_diagnostic_is_one_bounded_line_without_its_type() -> None:
    """`Diagnostic-Code: smtp; 550 ...` folded over lines becomes `550 ...` on one line."""
    [result] = read_report(bounces.postfix_dsn(JOB, RCPT)).results
    assert result.diagnostic is not None
    assert result.diagnostic.startswith("550 5.1.1 <ada@dest.example>: Recipient address rejected")
    assert "\n" not in result.diagnostic


def test_a_failed_action_with_a_4xx_status_is_a_soft_bounce() -> None:
    """The sending server gave up on a temporary failure: soft, not hard."""
    [result] = read_report(bounces.postfix_dsn(JOB, RCPT, status="4.2.2")).results
    assert result.type == "soft"


@pytest.mark.parametrize("action", ["delivered", "relayed", "expanded"])
def test_a_dsn_that_reports_no_failure_is_not_a_bounce(action: str) -> None:
    """A success notification is not parsed as a bounce; the reader leaves it alone."""
    with pytest.raises(NotAReport):
        read_report(bounces.postfix_dsn(JOB, RCPT, action=action, status="2.0.0"))


def test_an_arf_complaint_names_the_complainer() -> None:
    """Feedback-Type abuse with Original-Rcpt-To: a complaint by that recipient."""
    parsed = read_report(bounces.arf_complaint(JOB, RCPT))
    [result] = parsed.results
    assert (parsed.format, result.type, result.recipient) == ("arf", "complaint", RCPT)
    assert parsed.job_ids == [JOB]


def test_a_redacted_complaint_falls_back_to_the_originals_single_recipient() -> None:
    """Without Original-Rcpt-To, the original's To names the complainer when it holds one."""
    [result] = read_report(bounces.arf_complaint(JOB, RCPT, redacted=True)).results
    assert result.recipient == RCPT


@pytest.mark.parametrize("feedback_type", ["not-spam", "auth-failure"])
def test_feedback_that_is_no_complaint_is_left_alone(feedback_type: str) -> None:
    """not-spam and DMARC failure reports are not complaints."""
    with pytest.raises(NotAReport):
        read_report(bounces.arf_complaint(JOB, RCPT, feedback_type=feedback_type))


@pytest.mark.parametrize(
    "raw",
    [
        bounces.human_reply(JOB),
        bounces.plain_text_bounce(JOB, RCPT),
        bounces.sent_message(JOB, RCPT),
        b"\xff\xfe not even a message",
    ],
    ids=["a reply", "a non-RFC 3464 bounce", "an ordinary message", "garbage"],
)
def test_anything_else_is_not_a_report(raw: bytes) -> None:
    """Replies, old-style bounces, ordinary mail and garbage are not reports."""
    with pytest.raises(NotAReport):
        read_report(raw)
