"""Where a webhook goes: a job's URL parsed once into its target and breaker key.

Also the SSRF check of IP-literal hosts, which aiohttp connects to without
resolving, so :class:`~formcraftd.workers.webhook.netguard.GuardedResolver`
never sees them. Reasons name only the URL's origin, never its path or query
(webhook URLs often carry tokens there).
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from typing import Literal

from yarl import URL

from formcraftd.core.errors import PermanentFailure
from formcraftd.workers.webhook.netguard import ALLOW_HINT, NetworkPolicy

__all__ = [
    "KEY_PREFIX",
    "Target",
    "breaker_key",
    "check_literal_host",
    "host_and_port",
    "target_of",
]

# Parsed URLs are kept for this many distinct URLs (about 1.2 KiB per ordinary
# URL). A URL longer than _CACHEABLE_CHARS is parsed per job instead, which
# bounds the cache at about 13 MiB even if every URL were that long.
_CACHE_ENTRIES = 4096
_CACHEABLE_CHARS = 1024
KEY_PREFIX = "webhook:"
_INVALID_KEY = "webhook:invalid-url"

Verdict = Literal["ok", "refused", "invalid"]


def breaker_key(url: str) -> str:
    """`webhook:<host>:<port>`, host lowercased, the scheme's default port filled in."""
    return target_of(url).breaker_key


def host_and_port(key: str) -> tuple[str, int] | None:
    """(host, port) of a `webhook:<host>:<port>` breaker key (an IPv6 host keeps its
    brackets); None for any other key."""
    if not key.startswith(KEY_PREFIX):
        return None
    host, _, port = key[len(KEY_PREFIX) :].rpartition(":")
    return (host, int(port)) if host and port.isdigit() else None


@dataclass(frozen=True, slots=True)
class Target:
    """What a job's URL string yields, worked out once per distinct string."""

    url: URL | None  # None: not a valid URL
    origin: str  # for reasons and logs: no userinfo, path or query
    breaker_key: str
    host: str  # the raw host, for the IP-literal check
    literal: bool  # an IP literal: aiohttp connects to it without resolving


def target_of(raw: str) -> Target:
    """The parsed target of `raw`: cached (every job of a form goes to one URL)."""
    if len(raw) > _CACHEABLE_CHARS:
        return _parse_target(raw)
    return _cached_target(raw)


def _parse_target(raw: str) -> Target:
    """Parse `raw` once into everything a delivery and its breaker need."""
    try:
        url = URL(raw)
    except ValueError:
        return Target(None, "", _INVALID_KEY, "", literal=False)
    key = _breaker_key_of(url)
    try:
        origin = str(url.origin())
    except ValueError:  # a breaker key but nothing to send to
        return Target(None, "", key, "", literal=False)
    host = url.raw_host or ""
    # The test mirrors aiohttp's own (`":" in host` or digits and dots), so
    # every host aiohttp will not resolve is checked against the policy.
    literal = ":" in host or host.replace(".", "").isdigit()
    if not literal and not _fits_dns(host):
        return Target(None, origin, key, host, literal=False)
    return Target(url, origin, key, host, literal)


def _fits_dns(host: str) -> bool:
    """Whether DNS can look `host` up: at most 253 characters, labels of 1 to 63 (RFC 1035).

    Looser than the config's :func:`~formcraftd.core.config_checks.is_host_name`
    on purpose: a job's URL is sent wherever the resolver can find it.
    """
    labels = host.removesuffix(".").split(".")
    return len(host) <= 253 and all(0 < len(label) <= 63 for label in labels)


_cached_target = functools.lru_cache(maxsize=_CACHE_ENTRIES)(_parse_target)


def _breaker_key_of(url: URL) -> str:
    """`webhook:<host>:<port>` of a parsed URL, or the shared key of invalid ones."""
    try:
        host, port = url.raw_host, url.port
    except ValueError:
        return _INVALID_KEY
    if not host:
        return _INVALID_KEY
    host = host.lower()
    return f"{KEY_PREFIX}[{host}]:{port}" if ":" in host else f"{KEY_PREFIX}{host}:{port}"


def check_literal_host(target: Target, policy: NetworkPolicy) -> None:
    """Refuse an IP-literal host up front: aiohttp connects to those without resolving.

    Host names are left to GuardedResolver, which checks what they resolve to.
    """
    verdict = _literal_verdict(target.host, policy)
    if verdict == "invalid":
        raise PermanentFailure(
            "VALIDATION_ERROR",
            f"{target.origin}: host is not a canonical IP address",
            reached_service=False,
        )
    if verdict == "refused":
        raise PermanentFailure(
            "SSRF_BLOCKED",
            f"{target.origin}: {target.host} is a private or reserved address; {ALLOW_HINT}",
            reached_service=False,
        )


@functools.lru_cache(maxsize=_CACHE_ENTRIES)
def _literal_verdict(host: str, policy: NetworkPolicy) -> Verdict:
    """ "ok", "refused" or "invalid" for an IP-literal host (cached: the same hosts recur)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return "invalid"
    return "ok" if policy.permits(ip) else "refused"
