"""Bounces and complaints as one typed report, whichever way they arrived.

The email worker's bounce mailbox parses DSNs and ARF reports into
:class:`BounceReport`; the provider webhooks of the HTTP server (which must not
depend on the email worker) build the same thing from Mailgun's and Postmark's
JSON. Both hand reports to a :class:`BounceSink`, which the daemon wires to the
email worker's suppression policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from formcraftd.core.config import BouncesConfig

BounceType = Literal["hard", "soft", "complaint"]
BounceSource = Literal["imap", "mailgun", "postmark"]


@dataclass(frozen=True, slots=True)
class BounceReport:
    """One recipient's bounce or complaint, and what may name the job it was about.

    `message_ids` are Message-ID values of the original message, `job_ids` its
    `X-FormCraft-Job-Id` values, `envelope_to` the addresses the report was
    sent to (the VERP return path): any of them can identify the job.
    """

    type: BounceType
    recipient: str
    source: BounceSource
    status: str | None = None  # the enhanced status code (5.1.1) or SMTP code
    diagnostic: str | None = None  # one line: what the remote server said
    message_ids: tuple[str, ...] = ()
    job_ids: tuple[str, ...] = ()
    envelope_to: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class BounceOutcome:
    """What the policy made of a report."""

    matched: bool  # the job it belongs to is known
    job_id: str | None = None
    suppressed: bool = False  # the address is (now) suppressed
    ignored: str | None = None  # why nothing was done, when nothing was


class BounceSink(Protocol):
    """Takes bounce reports: applies the suppression policy and publishes the events."""

    async def take(self, report: BounceReport, *, require_match: bool) -> BounceOutcome:
        """Apply `report`. With `require_match`, a report whose job is unknown (or whose
        recipient was not one of the job's) is not applied: ``ignored`` says why."""
        ...


@dataclass(slots=True)
class BounceCounts:
    """What the bounce intake counted; exported as metrics when `/metrics` is scraped."""

    taken: dict[tuple[BounceSource, BounceType], int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)  # "unparsed", "unmatched"
    refused: dict[str, int] = field(default_factory=dict)  # webhook requests, by provider

    def took(self, source: BounceSource, kind: BounceType) -> None:
        self.taken[source, kind] = self.taken.get((source, kind), 0) + 1

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def refuse(self, provider: str) -> None:
        self.refused[provider] = self.refused.get(provider, 0) + 1


class BackgroundReader(Protocol):
    """The bounce mailbox as the daemon sees it: a task to supervise, a state to show."""

    connected: bool
    last_error: str | None

    async def run(self) -> None: ...


@dataclass(frozen=True, slots=True)
class BounceIntake:
    """What the email worker offers the daemon when bounce handling is configured:
    the policy to feed (webhooks), its counts (metrics), and the mailbox reader, if any."""

    config: BouncesConfig
    sink: BounceSink
    counts: BounceCounts
    mailbox: BackgroundReader | None = None
