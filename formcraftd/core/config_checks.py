"""What a config's types cannot say: checks across keys, and of hosts, URLs and templates.

:func:`~formcraftd.core.config.parse_document` runs :func:`check_cross_fields`
on every config it validates (check-config, start and reload). The webhook
worker's `no_proxy` parser uses :func:`is_host_name` too, so a host is read
by one rule wherever the config names one.
"""

from __future__ import annotations

import ipaddress
import re
import string
from urllib.parse import urlsplit

from formcraftd.core.errors import ConfigError
from formcraftd.core.settings import WORKER_KINDS, Config, WebhookWorkerConfig

__all__ = [
    "MAX_UNSUBSCRIBE_TEMPLATE",
    "UNSUBSCRIBE_PLACEHOLDERS",
    "check_cross_fields",
    "check_egress",
    "check_unsubscribe_url",
    "is_host_name",
]


def check_cross_fields(config: Config, source: str) -> None:
    """Raise a one-line :class:`ConfigError` naming the key for what no one key's type catches."""
    names: dict[str, str] = {}
    for kind in WORKER_KINDS:
        worker = config.worker(kind)
        for key, name in (
            ("queue", worker.queue),
            ("dead_letter_exchange", worker.dead_letter_exchange),
        ):
            if name in names:
                raise ConfigError(
                    f"{source}: key workers.{kind}.{key}: {name!r} is already used by {names[name]}"
                )
            names[name] = f"workers.{kind}.{key}"
    for url in config.broker.url.split(","):
        if urlsplit(url.strip()).scheme not in ("amqp", "amqps"):
            raise ConfigError(f"{source}: key broker.url: expected amqp:// or amqps:// URLs")
    unsubscribe = config.workers.email.unsubscribe_url
    if unsubscribe and (problem := check_unsubscribe_url(unsubscribe)):
        raise ConfigError(f"{source}: key workers.email.unsubscribe_url: {problem}")
    for cidr in config.workers.webhook.allowed_networks:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ConfigError(
                f"{source}: key workers.webhook.allowed_networks: {cidr[:100]!r} is not a CIDR"
            ) from None
    try:
        check_egress(config.workers.webhook)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


_HOST_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")


def is_host_name(name: str) -> bool:
    """A lowercase DNS name: 253 characters at most, labels of letters, digits, `-` and `_`."""
    labels = name.split(".")
    return len(name) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def check_egress(webhook: WebhookWorkerConfig) -> None:
    """Raise a one-line :class:`ConfigError` naming the key for a bad proxy or TLS entry.

    The webhook worker parses `no_proxy` and reads the files of the TLS entries
    (check-config, start and reload all build its routes and TLS contexts).
    """
    key = "key workers.webhook"
    if webhook.proxy_url:
        parts = urlsplit(webhook.proxy_url)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme != "http" or not parts.hostname or port == -1:
            raise ConfigError(
                f"{key}.proxy_url: expected http://[user:password@]host:port (an HTTP proxy)"
            )
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError(f"{key}.proxy_url: a proxy URL has no path, query or fragment")
    seen: set[str] = set()
    for i, tls in enumerate(webhook.tls):
        at = f"{key}.tls[{i}]"
        host = tls.host.lower().removesuffix(".")
        name = host.removeprefix("*.")
        if not name or not (is_host_name(name) or (host == name and _is_ip(host.strip("[]")))):
            raise ConfigError(
                f"{at}.host: {tls.host[:100]!r} is not a host name, IP or *.domain pattern"
            )
        if host in seen:
            raise ConfigError(f"{at}.host: {tls.host[:100]!r} already has an entry")
        seen.add(host)
        if not tls.client_cert and not tls.ca_file:
            raise ConfigError(f"{at}: give client_cert, ca_file or both")
        if tls.client_key and not tls.client_cert:
            raise ConfigError(f"{at}.client_key: needs client_cert")


UNSUBSCRIBE_PLACEHOLDERS = ("form_id", "submission_id", "job_id", "recipient")
# What RFC 3986 allows in a URL, the percent sign included; no space, quote or angle bracket.
_URL_TEXT = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]*")
MAX_UNSUBSCRIBE_TEMPLATE = 900  # the header line is at most 998 characters, values included


def check_unsubscribe_url(template: str) -> str:
    """Why `template` cannot be the unsubscribe URL template, or "" when it can."""
    if len(template) > MAX_UNSUBSCRIBE_TEMPLATE:
        return f"longer than {MAX_UNSUBSCRIBE_TEMPLATE} characters"
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError as exc:
        return f"not a template: {exc}"
    for literal, name, spec, conversion in fields:
        if not _URL_TEXT.fullmatch(literal):
            return "only URL characters may appear outside the placeholders (no space, quote, <>)"
        if name is None:
            continue
        if name not in UNSUBSCRIBE_PLACEHOLDERS:
            known = ", ".join(f"{{{known}}}" for known in UNSUBSCRIBE_PLACEHOLDERS)
            return f"unknown placeholder {{{name}}} (known: {known})"
        if spec or conversion:
            return f"placeholder {{{name}}} takes no conversion or format"
    parts = urlsplit(template)
    if parts.scheme != "https" or not parts.hostname:
        return "expected an https:// URL (RFC 8058 one-click unsubscribe needs HTTPS)"
    if "{" in parts.netloc:
        return "placeholders may appear only in the path and query"
    return ""
