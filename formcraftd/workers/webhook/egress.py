"""The egress proxy: which requests go through `proxy_url`, and what the proxy answered itself.

`no_proxy` lists the destinations sent direct: `*` (every one), a host name
(that host and every name under it), `.example.com` (only the names under
it), any of these with `:port`, an IP address or a CIDR (IP-literal URLs
only; host names are not resolved to match). Environment variables
(`HTTP_PROXY`, `NO_PROXY`) are never read: the session keeps trust_env off.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from yarl import URL

from formcraftd.core.config import WebhookWorkerConfig
from formcraftd.core.config_checks import is_host_name
from formcraftd.core.errors import ConfigError

__all__ = ["EgressProxy", "NoProxyRule", "is_proxy_answer"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Headers a proxy sets on an answer it wrote itself (Smokescreen strips its own
# from upstream answers; Squid and proxy.py mark their error pages).
_PROXY_MARKS = ("X-Smokescreen-Error", "X-Squid-Error", "Proxy-Agent")


@dataclass(frozen=True, slots=True)
class NoProxyRule:
    """One `no_proxy` item: a host suffix, an exact host, or a network; any port unless set."""

    suffix: str = ""  # ".example.com": names under it (an exact host is in `exact` too)
    exact: str = ""
    network: IPNetwork | None = None
    port: int | None = None

    @classmethod
    def parse(cls, entry: str) -> NoProxyRule:
        """Parse one item; raise ValueError when it is none of the forms above."""
        text = entry.strip().lower()
        try:
            return cls(network=ipaddress.ip_network(text.strip("[]"), strict=False))
        except ValueError:
            pass
        port: int | None = None
        host, colon, digits = text.rpartition(":")
        if colon and digits.isdigit() and not host.endswith(":") and int(digits) <= 65535:
            text, port = host, int(digits)
        text = text.strip("[]")
        try:
            return cls(network=ipaddress.ip_network(text), port=port)
        except ValueError:
            pass
        name = text.removesuffix(".")
        if name.startswith("."):
            bare = name[1:]
            if not is_host_name(bare):
                raise ValueError(entry)
            return cls(suffix=name, port=port)
        if not is_host_name(name):
            raise ValueError(entry)
        return cls(suffix="." + name, exact=name, port=port)

    def matches(
        self, host: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None, port: int
    ) -> bool:
        """Whether a destination (lowercased host, its IP if a literal, port) is bypassed."""
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            return ip is not None and ip.version == self.network.version and ip in self.network
        return host == self.exact or host.endswith(self.suffix)


@dataclass(frozen=True, slots=True)
class EgressProxy:
    """The configured proxy and its bypass list.

    The URL keeps its credentials: aiohttp sends them to the proxy only, as
    Proxy-Authorization on CONNECT or on a plain-http request (its documented
    form; aiohttp 3.14 deprecates BasicAuth objects). They stay out of reprs,
    and reasons never quote the URL.
    """

    url: URL = field(repr=False)
    bypass_all: bool
    rules: tuple[NoProxyRule, ...]

    @classmethod
    def from_config(cls, config: WebhookWorkerConfig) -> EgressProxy | None:
        """None without `proxy_url`; a bad `no_proxy` item is a :class:`ConfigError`."""
        rules: list[NoProxyRule] = []
        bypass_all = False
        for i, entry in enumerate(config.no_proxy):
            if entry.strip() == "*":
                bypass_all = True
                continue
            try:
                rules.append(NoProxyRule.parse(entry))
            except ValueError:
                raise ConfigError(
                    f"key workers.webhook.no_proxy[{i}]: {entry[:100]!r} is not a host, "
                    ".domain, IP, CIDR or *"
                ) from None
        if not config.proxy_url:
            return None
        return cls(URL(config.proxy_url), bypass_all, tuple(rules))

    @property
    def host(self) -> str:
        """The proxy's host as aiohttp resolves it (lowercase, no brackets)."""
        return (self.url.host or "").lower()

    @property
    def port(self) -> int:
        """The proxy's port (80 when the URL gives none)."""
        return self.url.port or 80

    def used_for(self, host: str, port: int) -> bool:
        """Whether a request to `host`:`port` goes through the proxy (not in `no_proxy`)."""
        if self.bypass_all:
            return False
        if not self.rules:
            return True
        host = host.lower().strip("[]").removesuffix(".")
        try:
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        return not any(rule.matches(host, ip, port) for rule in self.rules)


def is_proxy_answer(status: int, headers: Mapping[str, str]) -> bool:
    """Whether an error answer to a proxied plain-http request was written by the proxy.

    A plain-http request goes to the proxy in absolute form, with no CONNECT,
    so the proxy's own failure arrives as an ordinary HTTP response. Only a
    407 or a proxy's marker header tells it apart from the destination's.
    `headers` must be case-insensitive (aiohttp's response headers are).
    """
    if status < 400:
        return False
    return status == 407 or any(mark in headers for mark in _PROXY_MARKS)
