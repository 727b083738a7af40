"""Endpoint health: which webhook destinations are failing or gone, told to the app.

A destination is *failing* while its circuit breaker (``webhook:<host>:<port>``)
is open or half-open: the breaker opening publishes `webhook.endpoint_failing`
and its closing `webhook.endpoint_recovered`. A receiver that answered 410 Gone
is *gone* (`webhook.endpoint_gone`, published by the webhook worker); it is
shown for an hour (or until its breaker recovers from failing). Both
lists are on the status page and in `/admin/status` while they last, whether
or not delivery events are enabled.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from cachetools import TTLCache

from formcraftd.core.breakers import BreakerState, CircuitBreaker
from formcraftd.core.events import (
    Emit,
    EndpointFailingEvent,
    EndpointGoneEvent,
    EndpointRecoveredEvent,
    Event,
    now,
)
from formcraftd.workers.webhook.targets import KEY_PREFIX, host_and_port

GONE_SHOWN_S = 3600.0
GONE_SHOWN_MAX = 100


class EndpointHealth:
    """Follows the webhook breakers and the 410s; publishes and remembers what it saw."""

    def __init__(self, publish: Emit | None) -> None:
        self._publish = publish
        self.failing: dict[str, EndpointFailingEvent] = {}
        self.gone: TTLCache[str, EndpointGoneEvent] = TTLCache(GONE_SHOWN_MAX, GONE_SHOWN_S)

    def breaker_changed(self, breaker: CircuitBreaker, state: BreakerState) -> None:
        """A breaker changed state: a webhook destination starts or stops failing."""
        where = host_and_port(breaker.key)
        if where is None:
            return
        host, port = where
        if state == "open" and breaker.key not in self.failing:
            event = EndpointFailingEvent(
                host=host,
                port=port,
                consecutive_failures=breaker.consecutive_failures,
                last_error_code=breaker.last_error_code,
                last_status=breaker.last_status,
                since=_iso(breaker.failing_since),
                at=now(),
            )
            self.failing[breaker.key] = event
            self._emit(event)
        elif state == "closed" and breaker.key in self.failing:
            failing = self.failing.pop(breaker.key)
            self._emit(
                EndpointRecoveredEvent(host=host, port=port, failing_since=failing.since, at=now())
            )
            self.gone.pop(breaker.key, None)

    def forget(self, key: str) -> None:
        """The breaker for `key` was dropped (it was closed and idle)."""
        self.failing.pop(key, None)

    def emit(self, event: Event) -> None:
        """What the workers emit: a 410 is remembered, then everything is published."""
        if isinstance(event, EndpointGoneEvent):
            self.gone[f"{KEY_PREFIX}{event.host}:{event.port}"] = event
        self._emit(event)

    def snapshot(self) -> dict[str, list[dict[str, Any]]]:
        return {
            "failing": [_fields(event) for event in self.failing.values()],
            "gone": [_fields(event) for event in self.gone.values()],
        }

    def _emit(self, event: Event) -> None:
        if self._publish is not None:
            self._publish(event)


def _fields(event: EndpointFailingEvent | EndpointGoneEvent) -> dict[str, Any]:
    fields = {name: getattr(event, name) for name in event.__struct_fields__}
    fields["event"] = event.__struct_config__.tag
    return fields


def _iso(instant: float | None) -> str:
    moment = dt.datetime.fromtimestamp(instant, dt.UTC) if instant else dt.datetime.now(dt.UTC)
    return moment.isoformat(timespec="milliseconds")
