"""TLS per destination: client certificates (mTLS) and private CAs from `[[workers.webhook.tls]]`.

Each entry's files are read once, into one :class:`ssl.SSLContext`, when the
config is checked or applied (check-config, start, reload), so a missing or
bad file is a :class:`ConfigError` naming the key and a reload that would
break TLS changes nothing. A request picks the context of its URL's host: an
exact entry first, else the longest `*.domain` pattern that covers it; a
host with no entry gets aiohttp's default (the system CAs, no client
certificate).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

from formcraftd.core.config import WebhookTlsConfig, WebhookWorkerConfig
from formcraftd.core.errors import ConfigError
from formcraftd.workers.webhook.hosts import HostTable

__all__ = ["TlsContexts"]


def _no_password() -> bytes:
    """Refuse encrypted keys instead of letting OpenSSL prompt on the terminal."""
    raise ValueError("the private key is encrypted; give an unencrypted key file")


def _reason(exc: BaseException) -> str:
    """A short, path-free reason: OSError's strerror, or the OpenSSL reason code."""
    if isinstance(exc, ssl.SSLError):
        return (exc.reason or "invalid PEM data").lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def context_of(entry: WebhookTlsConfig, at: str) -> ssl.SSLContext:
    """The client context of one entry; a file that cannot be used is a ConfigError naming it."""
    # With a cafile, create_default_context trusts that bundle only (no system CAs).
    try:
        context = ssl.create_default_context(cafile=entry.ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"key {at}.ca_file: {entry.ca_file}: cannot load a CA bundle: {_reason(exc)}"
        ) from None
    if entry.client_cert:
        try:
            context.load_cert_chain(
                entry.client_cert, entry.client_key or None, password=_no_password
            )
        except (OSError, ssl.SSLError, ValueError) as exc:
            key = f"{at}.client_key" if entry.client_key else f"{at}.client_cert"
            raise ConfigError(
                f"key {key}: cannot load the client certificate and key: {_reason(exc)}"
            ) from None
    return context


@dataclass(frozen=True, slots=True)
class TlsContexts:
    """The SSL context of each configured host or pattern."""

    contexts: HostTable[ssl.SSLContext] = field(default_factory=HostTable)

    @classmethod
    def from_config(cls, config: WebhookWorkerConfig) -> TlsContexts:
        """Build every entry's context (reads the files); raise ConfigError naming the key."""
        return cls(
            HostTable(
                (_normal(entry.host), context_of(entry, f"workers.webhook.tls[{i}]"))
                for i, entry in enumerate(config.tls)
            )
        )

    def for_host(self, host: str) -> ssl.SSLContext | None:
        """The context for `host` (an exact entry, else the longest pattern); None = default."""
        if not self.contexts:
            return None
        return self.contexts.lookup(_normal(host), None)


def _normal(host: str) -> str:
    return host.lower().removesuffix(".").strip("[]")
