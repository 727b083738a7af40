"""Which configured rate a webhook destination gets (`[workers.webhook.rate_limit]`)."""

from __future__ import annotations

import pytest
from aiohttp import web

from formcraftd.core import config
from formcraftd.core.config import WebhookWorkerConfig
from formcraftd.core.errors import ConfigError, RetryLater, Throttled
from formcraftd.core.ratelimits import Rate
from formcraftd.workers.webhook import WebhookHandler
from formcraftd.workers.webhook.rates import rate_of
from tests.workers.webhook.support import LOOPBACK_ONLY, Behaviour, Receiver, ctx, job

SECTION = """
[workers.webhook.rate_limit]
requests_per_second = 20
burst = 4
hosts = [
    { host = "api.example.com", requests_per_second = 5 },
    { host = "api.example.com:8443", requests_per_second = 1, burst = 1 },
    { host = "*.example.com", requests_per_second = 2 },
    { host = "*.eu.example.com", requests_per_second = 3 },
    { host = "free.example.org", requests_per_second = 0 },
    { host = "[::1]:9000", requests_per_second = 7 },
]
"""


def rates(text: str = SECTION) -> config.RateLimitConfig:
    return config.parse(text, environ={}).workers.webhook.rate_limit


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("webhook:api.example.com:443", Rate(5, 4)),
        ("webhook:api.example.com:8443", Rate(1, 1)),
        ("webhook:hooks.example.com:443", Rate(2, 4)),
        ("webhook:a.eu.example.com:443", Rate(3, 4)),
        ("webhook:example.com:443", Rate(20, 4)),
        ("webhook:free.example.org:443", None),
        ("webhook:[::1]:9000", Rate(7, 4)),
        ("webhook:elsewhere.net:80", Rate(20, 4)),
    ],
)
def test_the_most_specific_entry_wins(key: str, expected: Rate | None) -> None:
    """host:port beats host, host beats a domain, a longer domain a shorter one."""
    assert rate_of(rates())(key) == expected


def test_by_default_no_destination_is_limited() -> None:
    """The shipped default is no limit at all (the hot path stays free)."""
    assert rate_of(config.RateLimitConfig())("webhook:example.com:443") is None


@pytest.mark.parametrize(
    "host",
    ["API.example.com", "a.*.example.com", "example.com/path", "https://example.com", ""],
)
def test_a_host_that_cannot_match_is_refused(host: str) -> None:
    """Hosts are lowercase names, `*.domain` or IP addresses, with an optional port."""
    text = f'[[workers.webhook.rate_limit.hosts]]\nhost = "{host}"\nrequests_per_second = 1\n'
    with pytest.raises(ConfigError, match=r"workers\.webhook\.rate_limit\.hosts\[0\]"):
        config.parse(text, environ={})


def test_a_host_given_twice_is_refused() -> None:
    """Two entries for one host would leave which one applies to chance."""
    text = (
        '[workers.webhook.rate_limit]\nhosts = [{ host = "a.b", requests_per_second = 1 }, '
        '{ host = "a.b", requests_per_second = 2 }]\n'
    )
    with pytest.raises(ConfigError, match="given twice"):
        config.parse(text, environ={})


# --- the handler: what a receiver's answer does to its destination ------------------


def answer(status: int, **headers: str) -> Behaviour:
    async def respond(_request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, headers=headers)

    return respond


async def test_a_429_pauses_the_destination_it_came_from(
    receiver: Receiver, handler: WebhookHandler
) -> None:
    """The handler tells its limits of a 429: that destination's next job is delayed."""
    receiver.behaviour = answer(429, **{"Retry-After": "30"})
    hook = job(receiver.url())
    with pytest.raises(RetryLater):
        await handler.handle(hook, ctx())
    with pytest.raises(Throttled) as info:
        handler.rate_limits.admit(handler.breaker_key(hook))
    assert 25 <= info.value.remaining <= 30
    assert handler.rate_limits.admit("webhook:elsewhere.example:443") is None


async def test_a_500_does_not_slow_the_destination_down(
    receiver: Receiver, handler: WebhookHandler
) -> None:
    """Only 429 and 503 speak of load; a 500 is the breaker's business."""
    receiver.behaviour = answer(500, **{"Retry-After": "30"})
    with pytest.raises(RetryLater):
        await handler.handle(job(receiver.url()), ctx())
    assert not handler.rate_limits.engaged


async def test_a_reload_applies_new_rates_live(handler: WebhookHandler) -> None:
    """prepare() + apply: a destination unlimited before is limited after, and back."""
    key = "webhook:api.example.com:443"
    assert handler.rate_limits.admit(key) is None
    limited = WebhookWorkerConfig(
        allowed_networks=LOOPBACK_ONLY,
        rate_limit=config.RateLimitConfig(
            max_wait_ms=0,
            hosts=(config.HostRateLimit(host="api.example.com", requests_per_second=1, burst=1),),
        ),
    )
    handler.prepare(limited)()
    assert handler.rate_limits.admit(key) is None
    with pytest.raises(Throttled):
        handler.rate_limits.admit(key)
    handler.prepare(WebhookWorkerConfig(allowed_networks=LOOPBACK_ONLY))()
    assert handler.rate_limits.admit(key) is None
