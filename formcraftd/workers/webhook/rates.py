"""The configured rate of each webhook destination (`[workers.webhook.rate_limit]`).

A destination is a breaker key, `webhook:<host>:<port>`. A `hosts` entry
matches it by host (`api.example.com`), by host and port
(`api.example.com:8443`) or by domain (`*.example.com`: every host under
example.com, each with its own rate); the most specific entry wins (host and
port, then host, then the longest domain); otherwise the section's own rate
applies. A rate of 0 means no limit.
"""

from __future__ import annotations

import functools
from typing import TypedDict

from formcraftd.core.config import RateLimitConfig, WebhookWorkerConfig
from formcraftd.core.ratelimits import DestinationLimits, Rate, RateOf
from formcraftd.workers.webhook.hosts import HostTable
from formcraftd.workers.webhook.targets import KEY_PREFIX

__all__ = ["destination_limits", "rate_of", "reconfigure_limits"]

_CACHE_ENTRIES = 4096


def rate_of(config: RateLimitConfig) -> RateOf:
    """The configured rate of a destination key under `config` (cached per key)."""
    rates = HostTable(
        (rule.host, _rate(rule.requests_per_second, rule.burst or config.burst))
        for rule in config.hosts
    )
    default = _rate(config.requests_per_second, config.burst)

    @functools.lru_cache(maxsize=_CACHE_ENTRIES)
    def lookup(key: str) -> Rate | None:
        host, _, port = key.removeprefix(KEY_PREFIX).rpartition(":")
        return rates.lookup(host, default, port)

    return lookup


def _limited(config: RateLimitConfig) -> bool:
    """Whether any destination has a rate under `config`."""
    return config.requests_per_second > 0 or any(
        rule.requests_per_second > 0 for rule in config.hosts
    )


def _rate(per_second: float, burst: int) -> Rate | None:
    return Rate(per_second, burst) if per_second > 0 else None


class _Settings(TypedDict):
    """What a webhook worker's config sets on its destination limits, besides the rates."""

    max_wait_s: float
    max_waiting: int
    recovery_s: float
    limited: bool
    max_in_flight: int


def _settings(config: WebhookWorkerConfig) -> _Settings:
    limits = config.rate_limit
    return _Settings(
        max_wait_s=limits.max_wait_ms / 1000,
        max_waiting=config.concurrency,
        recovery_s=limits.recovery_s,
        limited=_limited(limits),
        max_in_flight=limits.max_in_flight,
    )


def destination_limits(config: WebhookWorkerConfig) -> DestinationLimits:
    """The destination limits of a webhook worker with `config`."""
    return DestinationLimits(rate_of(config.rate_limit), **_settings(config))


def reconfigure_limits(limits: DestinationLimits, config: WebhookWorkerConfig) -> None:
    """Apply a reloaded section's rates to `limits`."""
    limits.reconfigure(rate_of(config.rate_limit), **_settings(config))
