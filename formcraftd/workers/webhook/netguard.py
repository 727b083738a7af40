"""The SSRF guard: which addresses formcraftd may connect to, checked on resolution.

Unless private networks are allowed, only public addresses are permitted, plus
the CIDRs an operator lists. :class:`GuardedResolver` drops refused addresses
from each DNS answer before aiohttp's connector sees them, so the address that
is checked is the address that is connected (no DNS-rebinding gap).

With an egress proxy, the connection goes to the proxy: the resolver lets the
proxy's own host and port through unchecked (the operator chose it), and
:meth:`GuardedResolver.check_host` looks a proxied destination up beforehand.
That pre-check has a DNS-rebinding gap (the proxy resolves again), so the
proxy must enforce its own policy; it refuses the obvious private targets.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from formcraftd.core.config import WebhookWorkerConfig
from formcraftd.core.errors import ConfigError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOW_HINT = "to allow it, add its network to workers.webhook.allowed_networks"
"""How an SSRF refusal tells the operator to allow a private target on purpose."""

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def is_public_address(ip: IPAddress) -> bool:
    """False for loopback, private, link-local, CGNAT, multicast, reserved and the like."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and not is_public_address(embedded):
            return False
        if ip.is_site_local:
            return False
    return ip.is_global and not (
        ip.is_multicast
        or ip.is_reserved
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_unspecified
        or ip in _CGNAT
    )


class AddressRefused(Exception):
    """The guard refused every address of a host.

    Deliberately not an OSError: aiohttp wraps OSErrors from resolution into
    retryable connection errors, and a refusal must never be retried.
    """

    def __init__(self, host: str, *, partly: bool = False) -> None:
        which = "a private or reserved address" if partly else "only private or reserved addresses"
        super().__init__(f"{host} resolves to {which}; {ALLOW_HINT}")
        self.host = host


@dataclass(frozen=True, slots=True)
class NetworkPolicy:
    """Which addresses the worker may connect to."""

    allow_private: bool = False
    allowed: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_config(cls, config: WebhookWorkerConfig) -> NetworkPolicy:
        """Parse `allowed_networks` once; a bad CIDR is a :class:`ConfigError`."""
        networks: list[IPNetwork] = []
        for cidr in config.allowed_networks:
            try:
                networks.append(ipaddress.ip_network(cidr, strict=False))
            except ValueError:
                raise ConfigError(
                    f"workers.webhook.allowed_networks: {cidr[:100]!r} is not a CIDR"
                ) from None
        return cls(config.allow_private_networks, tuple(networks))

    def permits(self, address: str | IPAddress) -> bool:
        """Whether connecting to `address` is allowed; unparsable means no."""
        if self.allow_private:
            return True
        try:
            ip = ipaddress.ip_address(address) if isinstance(address, str) else address
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return is_public_address(ip) or any(ip in net for net in self.allowed)


# Pre-check verdicts are kept as long as the connector keeps DNS answers.
_VERDICT_TTL_S = 10.0
_VERDICT_ENTRIES = 4096


class GuardedResolver(AbstractResolver):
    """aiohttp's default resolver, minus the addresses the policy refuses.

    `exempt` is the egress proxy's (host, port): resolved unchecked.
    """

    def __init__(self, policy: NetworkPolicy, exempt: tuple[str, int] | None = None) -> None:
        self._policy = policy
        self._exempt = exempt
        self._inner = DefaultResolver()
        self._verdicts: dict[str, tuple[float, bool]] = {}

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Resolve, then keep only permitted addresses; none left is a refusal."""
        results = await self._inner.resolve(host, port, family)
        if self._exempt is not None and (host.lower(), port) == self._exempt:
            return results
        permitted = [r for r in results if self._policy.permits(r["host"])]
        if not permitted:
            raise AddressRefused(host)
        return permitted

    async def check_host(self, host: str) -> None:
        """Raise :class:`AddressRefused` if `host` resolves to any refused address.

        For a destination reached through the proxy, which resolves it again
        and may pick any of its addresses, hence "any". A failed lookup is
        left to the proxy (its DNS may see names this host cannot). IP
        literals are checked up front by the targets module.
        """
        if self._policy.allow_private or ":" in host or host.replace(".", "").isdigit():
            return
        now = time.monotonic()
        cached = self._verdicts.get(host)
        if cached is not None and cached[0] > now:
            refused = cached[1]
        else:
            try:
                results = await self._inner.resolve(host, 0, socket.AF_UNSPEC)
            except OSError:
                return
            refused = any(not self._policy.permits(r["host"]) for r in results)
            if len(self._verdicts) >= _VERDICT_ENTRIES:
                self._verdicts.clear()
            self._verdicts[host] = (now + _VERDICT_TTL_S, refused)
        if refused:
            raise AddressRefused(host, partly=True)

    async def close(self) -> None:
        """Release the wrapped resolver."""
        await self._inner.close()
