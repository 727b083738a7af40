"""Tests for the SSRF guard: the network policy and the guarded resolver."""

from __future__ import annotations

import ipaddress

import pytest

from formcraftd.core.config import WebhookWorkerConfig
from formcraftd.core.errors import ConfigError, PermanentFailure
from formcraftd.workers.webhook import WebhookHandler
from formcraftd.workers.webhook.netguard import NetworkPolicy
from tests.workers.webhook.support import Receiver, ctx, job, started_handler

pytestmark = [pytest.mark.webhook, pytest.mark.timeout(10)]


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "fd12::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "64:ff9b::a00:1",
        "2002:a00:1::1",
        "fec0::1",
    ],
)
def test_policy_refuses_non_public_addresses(address: str) -> None:
    """The default policy refuses loopback, private, link-local, CGNAT and reserved ranges."""
    assert not NetworkPolicy().permits(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"])
def test_policy_permits_public_addresses(address: str) -> None:
    """Global unicast addresses are permitted."""
    assert NetworkPolicy().permits(address)


def test_policy_allowed_networks_cover_mapped_addresses() -> None:
    """An allowed IPv4 network also admits its IPv4-mapped IPv6 form."""
    policy = NetworkPolicy(allowed=(ipaddress.ip_network("127.0.0.1/32"),))
    assert policy.permits("127.0.0.1") and policy.permits("::ffff:127.0.0.1")
    assert not policy.permits("127.0.0.2")


def test_invalid_allowed_network_is_a_config_error() -> None:
    """A bad CIDR raises ConfigError naming the key."""
    with pytest.raises(ConfigError, match=r"workers\.webhook\.allowed_networks"):
        WebhookHandler(WebhookWorkerConfig(allowed_networks=("10.0.0.0/33",)), user_agent="x")


# --- the guard, end to end ---------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_guard_refuses_loopback(
    receiver: Receiver, guarded_handler: WebhookHandler, host: str, no_connections: list[object]
) -> None:
    """The default config refuses loopback targets before any request is sent."""
    with pytest.raises(PermanentFailure) as info:
        await guarded_handler.handle(job(receiver.url(host=host), secret="guard-secret-1"), ctx())
    assert info.value.code == "SSRF_BLOCKED" and not info.value.reached_service
    assert "guard-secret-1" not in info.value.reason
    assert info.value.reason.endswith(
        "; to allow it, add its network to workers.webhook.allowed_networks"
    )
    assert receiver.seen == []


async def test_allowed_network_lets_loopback_through(
    receiver: Receiver, handler: WebhookHandler
) -> None:
    """allowed_networks=["127.0.0.1/32"] admits 127.0.0.1 by literal and by name."""
    await handler.handle(job(receiver.url(host="127.0.0.1")), ctx())
    await handler.handle(job(receiver.url(host="localhost")), ctx())
    assert len(receiver.seen) == 2


async def test_reconfigure_to_the_guard_drops_pooled_connections(receiver: Receiver) -> None:
    """After a reload turns the guard on, a host reached before is refused."""
    h = await started_handler(WebhookWorkerConfig(allow_private_networks=True, timeout_ms=2000))
    try:
        await h.handle(job(receiver.url(host="localhost")), ctx())
        h.reconfigure(WebhookWorkerConfig(timeout_ms=2000))
        with pytest.raises(PermanentFailure) as info:
            await h.handle(job(receiver.url(host="localhost")), ctx())
        assert info.value.code == "SSRF_BLOCKED" and len(receiver.seen) == 1
    finally:
        await h.aclose()
