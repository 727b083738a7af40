"""Delivery events: what the app is told about each attempt, as typed messages.

The publisher (:mod:`formcraftd.amqp.events`) sends them to a topic exchange
with routing key `<kind>.<outcome>`; workers emit their own kinds (the Sheets
worker's `sheets.token_refreshed`) through the `emit` callable they are given.
Events never carry a secret; the one exception is `sheets.token_refreshed`,
whose whole point is to hand the app the new access token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import msgspec

from formcraftd.core.config import WorkerKind
from formcraftd.core.errors import AttemptErrorCode
from formcraftd.core.redaction import redact
from formcraftd.core.text import one_line, utc_now

EventOutcome = Literal["succeeded", "retrying", "dead_lettered", "delayed"]
SNIPPET_CHARS = 300


class DeliveryEvent(msgspec.Struct, frozen=True, kw_only=True, tag_field="event", tag="delivery"):
    """One attempt of one job (routing key `<kind>.<outcome>`)."""

    kind: WorkerKind
    outcome: EventOutcome
    job_id: str
    queue: str
    form_id: str | None
    submission_id: str | None
    attempt: int
    status_code: int | None = None
    duration_ms: float = 0.0
    error_code: AttemptErrorCode | None = None
    error: str | None = None
    response_snippet: str | None = None
    at: str


class TokenRefreshedEvent(
    msgspec.Struct, frozen=True, kw_only=True, tag_field="event", tag="token_refreshed"
):
    """A refreshed Google access token for the app to store (`sheets.token_refreshed`)."""

    kind: Literal["sheets"] = "sheets"
    form_id: str
    access_token: str
    expiry_date: int  # ms since the epoch
    at: str


Event = DeliveryEvent | TokenRefreshedEvent
Emit = Callable[[Event], None]
"""Hands an event to the publisher; never blocks, never raises."""


def now() -> str:
    """Now in UTC as ``datetime.isoformat(timespec="milliseconds")`` writes it."""
    return utc_now()


def snippet(text: str | None) -> str | None:
    """A one-line, redacted, truncated excerpt (None stays None)."""
    if not text:
        return None
    return one_line(redact(text), SNIPPET_CHARS)


def routing_key(event: Event) -> str:
    if isinstance(event, TokenRefreshedEvent):
        return "sheets.token_refreshed"
    return f"{event.kind}.{event.outcome}"


def schema() -> dict[str, object]:
    """The JSON Schema of the events (for `formcraftd schema events`)."""
    result: dict[str, object] = msgspec.json.schema(Event)
    return result
