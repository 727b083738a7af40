"""Standard Webhooks signing: the key of a secret, the message id, the signature headers.

Each job carries `webhook-id`, `webhook-timestamp` and, with a secret,
`webhook-signature` (v1, base64 HMAC-SHA256 over `id.timestamp.body`) plus
`X-FormCraft-Signature` (hex HMAC-SHA256 of the body alone) for simple receivers.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
from collections.abc import Callable

__all__ = ["Signer", "sign", "signer_for", "signing_key", "webhook_id"]

# Keyed HMACs are kept for this many distinct secrets (about 0.3 KiB each). A
# secret longer than _CACHEABLE_CHARS is keyed per job instead, which bounds
# the cache at about 5 MiB even if every secret were that long.
_CACHE_ENTRIES = 4096
_CACHEABLE_CHARS = 1024


def signing_key(secret: str) -> bytes:
    """The HMAC key: base64-decoded after a `whsec_` prefix, else the UTF-8 bytes."""
    if not secret.startswith("whsec_"):
        return secret.encode()
    try:
        key = base64.b64decode(secret[len("whsec_") :], validate=True)
    except ValueError:
        raise ValueError("payload.secret starts with whsec_ but is not valid base64") from None
    if not key:
        raise ValueError("payload.secret starts with whsec_ but holds an empty key")
    return key


def webhook_id(job_id: str, url: str) -> str:
    """`msg_` + a stable id: the same on every try, different for each endpoint."""
    return "msg_" + hashlib.sha256(f"{job_id}\n{url}".encode()).hexdigest()[:26]


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The Standard Webhooks headers, plus `X-FormCraft-Signature` for simple receivers.

    An empty key signs nothing: only `webhook-id` and `webhook-timestamp` are set.
    """
    headers: dict[str, str] = {}
    Signer(key).add_headers(headers.__setitem__, msg_id, timestamp, body)
    return headers


class Signer:
    """HMAC-SHA256 keyed once; each message is signed on a copy.

    Keying an HMAC hashes the key into its inner and outer pads; copying the
    keyed state skips that for every message after the first.
    """

    __slots__ = ("_mac",)

    def __init__(self, key: bytes) -> None:
        self._mac = hmac.new(key, digestmod=hashlib.sha256) if key else None

    def add_headers(
        self, add: Callable[[str, str], None], msg_id: str, timestamp: int, body: bytes
    ) -> None:
        """Pass `webhook-id`, `webhook-timestamp` and, with a key, both signatures to `add`."""
        add("webhook-id", msg_id)
        add("webhook-timestamp", str(timestamp))
        if self._mac is None:
            return
        v1 = self._mac.copy()
        v1.update(f"{msg_id}.{timestamp}.".encode())
        v1.update(body)
        add("webhook-signature", "v1," + base64.b64encode(v1.digest()).decode())
        plain = self._mac.copy()
        plain.update(body)
        add("X-FormCraft-Signature", "sha256=" + plain.hexdigest())


def signer_for(secret: str) -> Signer:
    """The signer for a secret: cached (a form's secret recurs on every submission).

    An invalid secret raises ValueError each time; failures are not cached.
    """
    if len(secret) > _CACHEABLE_CHARS:
        return _new_signer(secret)
    return _cached_signer(secret)


def _new_signer(secret: str) -> Signer:
    """A signer keyed with `secret`; ValueError if it is not a valid secret."""
    return Signer(signing_key(secret))


_cached_signer = functools.lru_cache(maxsize=_CACHE_ENTRIES)(_new_signer)
