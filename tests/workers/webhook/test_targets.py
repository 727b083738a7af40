"""Tests for webhook targets: breaker keys, URL parsing and the IP-literal check."""

from __future__ import annotations

import pytest

from formcraftd.core.config import WebhookWorkerConfig
from formcraftd.core.errors import PermanentFailure
from formcraftd.workers.webhook import WebhookHandler
from formcraftd.workers.webhook.targets import breaker_key, host_and_port
from tests.workers.webhook.support import LOOPBACK_ONLY, Receiver, ctx, job, started_handler

pytestmark = [pytest.mark.webhook, pytest.mark.timeout(10)]


@pytest.mark.parametrize(
    ("url", "key"),
    [
        ("https://Hooks.Example.COM/x?y=1", "webhook:hooks.example.com:443"),
        ("http://example.com/x", "webhook:example.com:80"),
        ("http://user:pw@example.com:8080/x", "webhook:example.com:8080"),
        ("https://[2001:DB8::1]/x", "webhook:[2001:db8::1]:443"),
    ],
)
def test_breaker_key_fills_default_ports(url: str, key: str) -> None:
    """The breaker key is the lowercased host and the effective port."""
    assert breaker_key(url) == key


@pytest.mark.parametrize(
    "url", ["http://host:99999/x", "http:///x", "http://[::1/x", "not a url at all"]
)
def test_breaker_key_of_an_invalid_url(url: str) -> None:
    """Every URL without a usable host and port shares one breaker key."""
    assert breaker_key(url) == "webhook:invalid-url"
    assert breaker_key(url) == "webhook:invalid-url"  # the same again, from the cache


def test_breaker_key_of_a_very_long_url() -> None:
    """A URL too long to be cached gets the same key as a short one."""
    assert breaker_key("https://Example.com/" + "a" * 5000) == "webhook:example.com:443"


async def test_breaker_key_of_a_job(handler: WebhookHandler) -> None:
    """The handler's breaker key comes from the job's URL."""
    assert handler.breaker_key(job("https://Example.com/x")) == "webhook:example.com:443"


async def test_very_long_url_is_delivered(receiver: Receiver, handler: WebhookHandler) -> None:
    """A URL too long to be cached is parsed per job and delivered all the same."""
    path = "/" + "a" * 5000
    for _ in range(2):
        the_job = job(receiver.url(path + "?token=t0k3n"))
        assert handler.breaker_key(the_job) == f"webhook:127.0.0.1:{receiver.port}"
        await handler.handle(the_job, ctx())
    assert [(s.path, s.query) for s in receiver.seen] == [(path, "token=t0k3n")] * 2


# --- IP literals -------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://[::1]/",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/",
        "https://192.168.0.1:8443/",
        "http://[::ffff:10.0.0.1]/",
        "http://100.64.1.1/",
        "http://[fe80::1]/",
    ],
)
async def test_guard_refuses_private_literals_without_traffic(
    guarded_handler: WebhookHandler, url: str, no_connections: list[object]
) -> None:
    """Private and link-local IP literals are refused with no connection attempt."""
    with pytest.raises(PermanentFailure) as info:
        await guarded_handler.handle(job(url), ctx())
    assert info.value.code == "SSRF_BLOCKED" and not info.value.reached_service


@pytest.mark.parametrize("url", ["http://127.1/", "http://2130706433/", "http://0x7f000001/"])
async def test_guard_refuses_legacy_ip_forms(
    guarded_handler: WebhookHandler, url: str, no_connections: list[object]
) -> None:
    """Numeric shorthands for loopback never reach a connection."""
    with pytest.raises(PermanentFailure) as info:
        await guarded_handler.handle(job(url), ctx())
    assert not info.value.reached_service


@pytest.mark.parametrize(
    ("url", "code", "words"),
    [
        ("http://host:99999/", "VALIDATION_ERROR", "not a valid URL"),
        ("http://256.1.1.1/", "VALIDATION_ERROR", "canonical IP address"),
        ("http://10.1.2.3/", "SSRF_BLOCKED", "private or reserved"),
    ],
)
async def test_unusable_targets_fail_the_same_way_every_time(
    handler: WebhookHandler, no_connections: list[object], url: str, code: str, words: str
) -> None:
    """A URL that is invalid or refused is refused again on the next job, without traffic."""
    reasons: list[str] = []
    for _ in range(2):
        with pytest.raises(PermanentFailure) as info:
            await handler.handle(job(url), ctx())
        assert info.value.code == code and not info.value.reached_service
        reasons.append(info.value.reason)
    assert words in reasons[0] and reasons[0] == reasons[1]


async def test_reload_changes_the_verdict_on_a_literal(receiver: Receiver) -> None:
    """An IP literal admitted before a reload is refused after it, and again admitted after."""
    allow = WebhookWorkerConfig(allowed_networks=LOOPBACK_ONLY, timeout_ms=2000)
    h = await started_handler(allow)
    try:
        url = receiver.url(host="127.0.0.1")
        await h.handle(job(url), ctx())
        h.reconfigure(WebhookWorkerConfig(timeout_ms=2000))
        with pytest.raises(PermanentFailure) as info:
            await h.handle(job(url), ctx())
        assert info.value.code == "SSRF_BLOCKED" and len(receiver.seen) == 1
        h.reconfigure(allow)
        await h.handle(job(url), ctx())
        assert len(receiver.seen) == 2
    finally:
        await h.aclose()


def test_breaker_keys_give_host_and_port() -> None:
    """host_and_port() reads back what breaker_key() writes; other keys give None."""
    assert host_and_port("webhook:hooks.example.com:443") == ("hooks.example.com", 443)
    assert host_and_port("webhook:[::1]:8080") == ("[::1]", 8080)
    assert host_and_port(breaker_key("https://Hooks.Example.com/x")) == ("hooks.example.com", 443)
    assert host_and_port("smtp:relay:25") is None
