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

from formcraftd.core.bounces import BounceSource
from formcraftd.core.config import WorkerKind
from formcraftd.core.errors import AttemptErrorCode
from formcraftd.core.redaction import redact
from formcraftd.core.text import one_line, utc_now

EventOutcome = Literal["succeeded", "retrying", "dead_lettered", "delayed"]
SNIPPET_CHARS = 300
# With `[events] events_per_message` above 1, a message's body is a JSON array of
# events of one routing key, and this header says how many.
BATCH_HEADER = "x-formcraft-events"


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


class EndpointFailingEvent(
    msgspec.Struct, frozen=True, kw_only=True, tag_field="event", tag="endpoint_failing"
):
    """A destination's circuit breaker opened (`webhook.endpoint_failing`).

    Jobs for it wait without using a try until it recovers; `last_error_code`
    and `last_status` are those of the failure that opened it.
    """

    kind: Literal["webhook"] = "webhook"
    host: str
    port: int
    consecutive_failures: int
    last_error_code: str | None = None
    last_status: int | None = None
    since: str  # when the failures began
    at: str


class EndpointRecoveredEvent(
    msgspec.Struct, frozen=True, kw_only=True, tag_field="event", tag="endpoint_recovered"
):
    """A failing destination answered again; its breaker closed (`webhook.endpoint_recovered`)."""

    kind: Literal["webhook"] = "webhook"
    host: str
    port: int
    failing_since: str | None = None
    at: str


class EndpointGoneEvent(
    msgspec.Struct, frozen=True, kw_only=True, tag_field="event", tag="endpoint_gone"
):
    """A receiver answered 410 Gone (`webhook.endpoint_gone`): the app may disable it.

    The Standard Webhooks specification recommends that a sender stop sending
    to an endpoint that answers 410; the job itself is dead-lettered as
    `HTTP_STATUS`. `url` has its credentials and query values masked.
    """

    kind: Literal["webhook"] = "webhook"
    url: str
    host: str
    port: int
    job_id: str
    form_id: str
    submission_id: str
    at: str


class EmailBouncedEvent(
    msgspec.Struct, frozen=True, kw_only=True, tag_field="event", tag="bounced"
):
    """A mail bounced (`email.bounced`): a DSN in the bounce mailbox or a provider's webhook.

    `job_id`, `form_id` and `submission_id` are null when the bounce could not
    be matched to a job this host sent (a provider webhook is applied anyway).
    `bounce_type` is `hard` (suppressed at once) or `soft` (suppressed after
    `soft_bounce_limit` in the window); `suppressed` says whether it is now.
    """

    kind: Literal["email"] = "email"
    job_id: str | None
    form_id: str | None
    submission_id: str | None
    recipient: str
    bounce_type: Literal["hard", "soft"]
    status: str | None = None
    diagnostic: str | None = None
    source: BounceSource
    suppressed: bool
    at: str


class EmailComplainedEvent(
    msgspec.Struct, frozen=True, kw_only=True, tag_field="event", tag="complained"
):
    """A recipient marked a mail as spam (`email.complained`); the address is suppressed."""

    kind: Literal["email"] = "email"
    job_id: str | None
    form_id: str | None
    submission_id: str | None
    recipient: str
    feedback: str | None = None
    source: BounceSource
    at: str


EndpointEvent = EndpointFailingEvent | EndpointRecoveredEvent | EndpointGoneEvent
BounceEvent = EmailBouncedEvent | EmailComplainedEvent
Event = DeliveryEvent | TokenRefreshedEvent | EndpointEvent | BounceEvent
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
    if isinstance(event, DeliveryEvent):
        return f"{event.kind}.{event.outcome}"
    if isinstance(event, TokenRefreshedEvent):
        return "sheets.token_refreshed"
    if isinstance(event, EmailBouncedEvent):
        return "email.bounced"
    if isinstance(event, EmailComplainedEvent):
        return "email.complained"
    return f"{event.kind}.{_ENDPOINT_KEYS[type(event)]}"


_ENDPOINT_KEYS: dict[type[EndpointEvent], str] = {
    EndpointFailingEvent: "endpoint_failing",
    EndpointRecoveredEvent: "endpoint_recovered",
    EndpointGoneEvent: "endpoint_gone",
}


SCHEMA_DESCRIPTION = (
    "A delivery event: by default one per AMQP message, the body one JSON object,"
    " routing key <kind>.<outcome>. With [events] events_per_message > 1 a message"
    " body is a JSON array of these events (of one routing key, in the order they"
    f" were emitted), with the header {BATCH_HEADER}: <count>."
)


def schema() -> dict[str, object]:
    """The JSON Schema of the events (for `formcraftd schema events`)."""
    result: dict[str, object] = {"description": SCHEMA_DESCRIPTION} | msgspec.json.schema(Event)
    return result
