"""Real-looking bounce reports for the tests: DSNs as Gmail, Exim and Postfix write them,
an ARF complaint, and mail a bounce reader must leave alone.

Each report wraps a message formcraftd really built (:func:`sent_message`), so
the ids inside are the ones a bounce of that job would carry.
"""

from __future__ import annotations

import contextlib
import email.utils
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from email.headerregistry import Address
from pathlib import Path
from typing import Any

from formcraftd.core.events import Event
from formcraftd.workers.email import mime
from formcraftd.workers.email.bounces import BounceLedger, BouncePolicy
from formcraftd.workers.email.suppression import SuppressionList
from tests.support import Names, make_config

DOMAIN = "forms.example"
RETURN_PATH = "bounces+{job_id}@forms.example"


def sent_message(job_id: str, recipient: str) -> bytes:
    """The message formcraftd sends for `job_id` to `recipient`."""
    return mime.build_message(
        sender=Address("FormCraft", "no-reply", DOMAIN),
        recipients=[mime.parse_address(recipient)],
        content=mime.Content("New submission", "Hello", "<p>Hello</p>"),
        job_id=job_id,
        mailer="formcraftd/test",
    )


def verp(job_id: str) -> str:
    return mime.return_path(RETURN_PATH, job_id)


def _headers_only(message: bytes) -> str:
    head, _, _ = message.replace(b"\r\n", b"\n").partition(b"\n\n")
    return head.decode("ascii") + "\n"


def _body(message: bytes) -> str:
    return message.replace(b"\r\n", b"\n").decode("ascii")


def _date() -> str:
    return email.utils.formatdate(usegmt=True)


def gmail_dsn(job_id: str, recipient: str) -> bytes:
    """Gmail's "Address not found": multipart/related text, delivery-status, the whole original."""
    original = sent_message(job_id, recipient)
    to = verp(job_id)
    return f"""Delivered-To: {to}
Return-Path: <>
Received: from mail-sor-f69.google.com (mail-sor-f69.google.com [209.85.220.69])
        by mx.forms.example with ESMTPS id abc for <{to}>
From: Mail Delivery Subsystem <mailer-daemon@googlemail.com>
To: {to}
Auto-Submitted: auto-replied
Subject: Delivery Status Notification (Failure)
References: {mime.message_id(job_id, DOMAIN)}
In-Reply-To: {mime.message_id(job_id, DOMAIN)}
Message-ID: <65a1b2c3.5d0a0220.abc123.0001.GMR@mx.google.com>
Date: {_date()}
MIME-Version: 1.0
Content-Type: multipart/report; boundary="000000000000a1b2c3d4e5f60718"; report-type=delivery-status

--000000000000a1b2c3d4e5f60718
Content-Type: multipart/related; boundary="000000000000a1b2c3d4e5f60719"

--000000000000a1b2c3d4e5f60719
Content-Type: multipart/alternative; boundary="000000000000a1b2c3d4e5f6071a"

--000000000000a1b2c3d4e5f6071a
Content-Type: text/plain; charset="UTF-8"


** Address not found **

Your message wasn't delivered to {recipient} because the address couldn't be
found, or is unable to receive mail.

The response from the remote server was:
550 5.1.1 The email account that you tried to reach does not exist.

--000000000000a1b2c3d4e5f6071a
Content-Type: text/html; charset="UTF-8"

<html><body><h2>Address not found</h2></body></html>

--000000000000a1b2c3d4e5f6071a--
--000000000000a1b2c3d4e5f60719--
--000000000000a1b2c3d4e5f60718
Content-Type: message/delivery-status

Reporting-MTA: dns; googlemail.com
Received-From-MTA: dns; mx.forms.example (192.0.2.10)
Arrival-Date: {_date()}
X-Original-Message-ID: {mime.message_id(job_id, DOMAIN)}

Final-Recipient: rfc822; {recipient}
Action: failed
Status: 5.1.1
Remote-MTA: dns; gmail-smtp-in.l.google.com. (2607:f8b0:4864:20::1a, the server
 for the domain gmail.com.)
Diagnostic-Code: smtp; 550-5.1.1 The email account that you tried to reach does
 not exist. Please try 550-5.1.1 double-checking the recipient's email address
 for typos or 550-5.1.1 unnecessary spaces. 550 5.1.1
 https://support.google.com/mail/?p=NoSuchUser a1-20020a05 - gsmtp
Last-Attempt-Date: {_date()}

--000000000000a1b2c3d4e5f60718
Content-Type: message/rfc822

{_body(original)}
--000000000000a1b2c3d4e5f60718--
""".encode()


def exim_delay_dsn(job_id: str, recipient: str) -> bytes:
    """Exim's "Warning: message delayed" (Action: delayed) with the original's headers."""
    original = sent_message(job_id, recipient)
    to = verp(job_id)
    return f"""Return-path: <>
Envelope-to: {to}
Delivery-date: {_date()}
Received: from Debian-exim by mx.exim.example with local (Exim 4.96)
	id 1rXyZa-000123-AB
	for {to};
From: Mail Delivery System <Mailer-Daemon@mx.exim.example>
To: {to}
Subject: Warning: message 1rXyZa-000122-9Z delayed 24 hours
Content-Type: multipart/report; report-type=delivery-status; boundary=1707400000-eximdsn-1804289383
MIME-Version: 1.0
Message-Id: <E1rXyZa-000123-AB@mx.exim.example>
Date: {_date()}
Auto-Submitted: auto-replied

--1707400000-eximdsn-1804289383
Content-type: text/plain; charset=us-ascii

This message was created automatically by mail delivery software.
A message that you sent has not yet been delivered to one or more of its
recipients after more than 24 hours on the queue on mx.exim.example.

  {recipient}
    Delay reason: SMTP error from remote mail server after RCPT TO:<{recipient}>:
    452 4.2.2 Mailbox full

No action is required on your part. Delivery attempts will continue for
some time, and this warning may be repeated at intervals if the message
remains undelivered. Eventually the mail delivery software will give up,
and when that happens, the message will be returned to you.

--1707400000-eximdsn-1804289383
Content-type: message/delivery-status

Reporting-MTA: dns; mx.exim.example

Action: delayed
Final-Recipient: rfc822;{recipient}
Status: 4.0.0
Remote-MTA: dns; mx.full.example
Diagnostic-Code: smtp; 452 4.2.2 Mailbox full
Will-Retry-Until: {_date()}

--1707400000-eximdsn-1804289383
Content-type: text/rfc822-headers

{_headers_only(original)}
--1707400000-eximdsn-1804289383--
""".encode()


def postfix_dsn(
    job_id: str, recipient: str, *, action: str = "failed", status: str = "5.1.1"
) -> bytes:
    """Postfix's "Undelivered Mail Returned to Sender", X-Postfix-Sender naming the VERP address."""
    original = sent_message(job_id, recipient)
    to = verp(job_id)
    return f"""Return-Path: <>
X-Original-To: {to}
Delivered-To: {to}
Received: by mx.forms.example (Postfix) id 4TQ2Zd1x9Kz1; {_date()}
Date: {_date()}
From: MAILER-DAEMON@mail.postfix.example (Mail Delivery System)
Subject: Undelivered Mail Returned to Sender
To: {to}
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
	boundary="4TQ2Zc6Y8Pz2.1707400000/mail.postfix.example"
Content-Transfer-Encoding: 7bit
Message-Id: <20260101000000.4TQ2Zd1x9Kz1@mail.postfix.example>

This is a MIME-encapsulated message.

--4TQ2Zc6Y8Pz2.1707400000/mail.postfix.example
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

This is the mail system at host mail.postfix.example.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients. It's attached below.

<{recipient}>: host mx.dest.example[198.51.100.7] said: 550 5.1.1
    <{recipient}>: Recipient address rejected: User unknown in virtual
    mailbox table (in reply to RCPT TO command)

--4TQ2Zc6Y8Pz2.1707400000/mail.postfix.example
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mail.postfix.example
X-Postfix-Queue-ID: 4TQ2Zc6Y8Pz2
X-Postfix-Sender: rfc822; {to}
Arrival-Date: {_date()}

Final-Recipient: rfc822; {recipient}
Original-Recipient: rfc822;{recipient}
Action: {action}
Status: {status}
Remote-MTA: dns; mx.dest.example
Diagnostic-Code: smtp; 550 5.1.1 <{recipient}>: Recipient address rejected:
    User unknown in virtual mailbox table

--4TQ2Zc6Y8Pz2.1707400000/mail.postfix.example
Content-Description: Undelivered Message Headers
Content-Type: text/rfc822-headers

{_headers_only(original)}
--4TQ2Zc6Y8Pz2.1707400000/mail.postfix.example--
""".encode()


def arf_complaint(
    job_id: str, recipient: str, *, feedback_type: str = "abuse", redacted: bool = False
) -> bytes:
    """A feedback-loop spam complaint (RFC 5965), the original attached whole."""
    original = sent_message(job_id, recipient)
    rcpt_line = "" if redacted else f"Original-Rcpt-To: <{recipient}>\n"
    return f"""From: Feedback Loop <feedback@fbl.mailbox.example>
To: {verp(job_id)}
Subject: FW: New submission
Date: {_date()}
Message-ID: <fbl-{job_id[:8]}@fbl.mailbox.example>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report;
	boundary="----=_Part_ARF_42"

------=_Part_ARF_42
Content-Type: text/plain; charset="US-ASCII"
Content-Transfer-Encoding: 7bit

This is an email abuse report for an email message received from IP
192.0.2.10 on {_date()}. For more information about this format please
see http://www.mipassoc.org/arf/.

------=_Part_ARF_42
Content-Type: message/feedback-report

Feedback-Type: {feedback_type}
User-Agent: ExampleFBL/1.0
Version: 1
Original-Mail-From: <{verp(job_id)}>
{rcpt_line}Arrival-Date: {_date()}
Reported-Domain: {DOMAIN}
Source-IP: 192.0.2.10

------=_Part_ARF_42
Content-Type: message/rfc822
Content-Disposition: inline

{_body(original)}
------=_Part_ARF_42--
""".encode()


def human_reply(job_id: str) -> bytes:
    """Somebody answered the notification: not a report, never touched."""
    return f"""From: Ada <ada@example.com>
To: {verp(job_id)}
Subject: Re: New submission
In-Reply-To: {mime.message_id(job_id, DOMAIN)}
Message-ID: <reply-1@example.com>
Date: {_date()}
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii

Thanks, but please stop sending these to me.
""".encode()


def plain_text_bounce(job_id: str, recipient: str) -> bytes:
    """An old-style bounce with no delivery-status part: not parsed, left alone."""
    return f"""From: MAILER-DAEMON@old.example
To: {verp(job_id)}
Subject: failure notice
Date: {_date()}
Message-ID: <qmail-1@old.example>

Hi. This is the qmail-send program at old.example.
I'm afraid I wasn't able to deliver your message to the following addresses.

<{recipient}>:
Sorry, no mailbox here by that name. (#5.1.1)
""".encode()


# --- a policy over a real suppression list and ledger ------------------------------------


@dataclass
class PolicyUnderTest:
    """A BouncePolicy on a real suppression list and ledger, and the events it emitted."""

    policy: BouncePolicy
    events: list[Event]

    @property
    def suppression(self) -> SuppressionList:
        return self.policy.suppression


MakePolicy = Callable[..., Awaitable[PolicyUnderTest]]


@contextlib.asynccontextmanager
async def policy_factory(state_dir: Path) -> AsyncIterator[MakePolicy]:
    """Makes opened BouncePolicies over `state_dir` (bounce settings as keyword arguments,
    `return_path` too); closes them all at the end."""
    opened: list[BouncePolicy] = []

    async def make(**settings: Any) -> PolicyUnderTest:
        return_path = settings.pop("return_path", RETURN_PATH)
        section: dict[str, Any] = {"state_dir": str(state_dir), "return_path": return_path}
        section["bounces"] = {"postmark_password": "on", **settings}
        cfg = make_config(Names(), email=section).workers.email
        events: list[Event] = []
        suppression = SuppressionList(cfg.state_dir)
        await suppression.open()
        policy = BouncePolicy(
            cfg.bounces,
            return_path=cfg.return_path,
            suppression=suppression,
            ledger=BounceLedger(cfg.state_dir),
            emit=events.append,
        )
        await policy.ledger.open()
        opened.append(policy)
        return PolicyUnderTest(policy, events)

    try:
        yield make
    finally:
        for policy in opened:
            await policy.ledger.aclose()
            await policy.suppression.aclose()
