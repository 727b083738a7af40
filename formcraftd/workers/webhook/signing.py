"""Standard Webhooks signing: the keys of a job's secrets, the message id, the signature headers.

Each job carries `webhook-id` and `webhook-timestamp`. With a secret, or a list of
secrets (the current one first, then those being rotated out), `webhook-signature`
carries one signature per secret over `id.timestamp.body`, space-separated, so a
receiver that knows any one of them keeps verifying during a rotation:

- `whsec_<base64 key>`, or any other string (its UTF-8 bytes are the key):
  `v1,<base64 HMAC-SHA256>`;
- `whsk_<base64 Ed25519 private key>`: `v1a,<base64 Ed25519 signature>`, which
  receivers verify with the public key, `whpk_<base64>` (:func:`public_key_of`).
  The key is the 32-byte private key followed by its 32-byte public key, as the
  Standard Webhooks reference server writes it; the 32-byte private key alone is
  accepted too. A `whpk_` public key cannot sign and is refused.

`X-FormCraft-Signature` (hex HMAC-SHA256 of the body alone, for simple receivers)
is keyed with the first secret when that one is an HMAC secret; an Ed25519 first
secret sends none, as there is no shared key a receiver could compute it with.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
from collections.abc import Callable, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = [
    "Ed25519Key",
    "HmacKey",
    "Signer",
    "SigningKey",
    "ed25519_private_key",
    "public_key_of",
    "sign",
    "signer_for",
    "signing_key",
    "webhook_id",
]

# Parsed keys are kept for this many distinct secrets (an HMAC about 0.3 KiB, an
# Ed25519 key about as much). A secret longer than _CACHEABLE_CHARS is parsed
# per job instead, which bounds the cache at about 5 MiB even if every secret
# were that long.
_CACHE_ENTRIES = 4096
_CACHEABLE_CHARS = 1024

_HMAC_PREFIX = "whsec_"
_ED25519_PREFIX = "whsk_"
_PUBLIC_PREFIX = "whpk_"
_ED25519_BYTES = 32


def signing_key(secret: str) -> bytes:
    """The HMAC key: base64-decoded after a `whsec_` prefix, else the UTF-8 bytes."""
    if not secret.startswith(_HMAC_PREFIX):
        return secret.encode()
    try:
        key = base64.b64decode(secret[len(_HMAC_PREFIX) :], validate=True)
    except ValueError:
        raise ValueError("payload.secret starts with whsec_ but is not valid base64") from None
    if not key:
        raise ValueError("payload.secret starts with whsec_ but holds an empty key")
    return key


def ed25519_private_key(secret: str) -> Ed25519PrivateKey:
    """The Ed25519 key of a `whsk_` secret; ValueError (never quoting it) if it is not one."""
    try:
        raw = base64.b64decode(secret.removeprefix(_ED25519_PREFIX), validate=True)
    except binascii.Error:
        raise ValueError("payload.secret starts with whsk_ but is not valid base64") from None
    if len(raw) not in (_ED25519_BYTES, 2 * _ED25519_BYTES):
        raise ValueError(
            "payload.secret starts with whsk_ but holds "
            f"{len(raw)} bytes, not an Ed25519 private key (32 bytes, or 64 with its public key)"
        )
    key = Ed25519PrivateKey.from_private_bytes(raw[:_ED25519_BYTES])
    public = raw[_ED25519_BYTES:]
    if public and not hmac.compare_digest(public, _public_bytes(key)):
        raise ValueError(
            "payload.secret starts with whsk_ but its last 32 bytes are not the public key "
            "of its first 32"
        )
    return key


def public_key_of(secret: str) -> str:
    """The `whpk_` public key receivers verify a `whsk_` secret's `v1a` signatures with."""
    raw = _public_bytes(ed25519_private_key(secret))
    return _PUBLIC_PREFIX + base64.b64encode(raw).decode()


def _public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def webhook_id(job_id: str, url: str) -> str:
    """`msg_` + a stable id: the same on every try, different for each endpoint."""
    return "msg_" + hashlib.sha256(f"{job_id}\n{url}".encode()).hexdigest()[:26]


class HmacKey:
    """HMAC-SHA256 keyed once; each message is signed on a copy.

    Keying an HMAC hashes the key into its inner and outer pads; copying the
    keyed state skips that for every message after the first.
    """

    __slots__ = ("_mac",)

    def __init__(self, key: bytes) -> None:
        self._mac = hmac.new(key, digestmod=hashlib.sha256)

    def signature(self, signed_prefix: bytes, body: bytes) -> str:
        """`v1,<base64 HMAC-SHA256>` of `signed_prefix` + `body`."""
        mac = self._mac.copy()
        mac.update(signed_prefix)
        mac.update(body)
        return "v1," + base64.b64encode(mac.digest()).decode()

    def body_signature(self, body: bytes) -> str:
        """`sha256=<hex HMAC-SHA256>` of the body alone (`X-FormCraft-Signature`)."""
        mac = self._mac.copy()
        mac.update(body)
        return "sha256=" + mac.hexdigest()


class Ed25519Key:
    """An Ed25519 private key that signs `v1a` signatures."""

    __slots__ = ("_key",)

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    def signature(self, signed_prefix: bytes, body: bytes) -> str:
        """`v1a,<base64 Ed25519 signature>` of `signed_prefix` + `body`."""
        return "v1a," + base64.b64encode(self._key.sign(signed_prefix + body)).decode()


SigningKey = HmacKey | Ed25519Key


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The Standard Webhooks headers for one HMAC key, plus `X-FormCraft-Signature`.

    An empty key signs nothing: only `webhook-id` and `webhook-timestamp` are set.
    """
    headers: dict[str, str] = {}
    Signer((HmacKey(key),) if key else ()).add_headers(headers.__setitem__, msg_id, timestamp, body)
    return headers


class Signer:
    """Signs a message with every key of a job, the current one first."""

    __slots__ = ("_keys", "_legacy")

    def __init__(self, keys: Sequence[SigningKey]) -> None:
        self._keys = tuple(keys)
        first = self._keys[0] if self._keys else None
        self._legacy = first if isinstance(first, HmacKey) else None

    def add_headers(
        self, add: Callable[[str, str], None], msg_id: str, timestamp: int, body: bytes
    ) -> None:
        """Pass `webhook-id`, `webhook-timestamp` and, with keys, the signatures to `add`."""
        add("webhook-id", msg_id)
        add("webhook-timestamp", str(timestamp))
        if not self._keys:
            return
        prefix = f"{msg_id}.{timestamp}.".encode()
        add("webhook-signature", " ".join(key.signature(prefix, body) for key in self._keys))
        if self._legacy is not None:
            add("X-FormCraft-Signature", self._legacy.body_signature(body))


def signer_for(secret: str | Sequence[str]) -> Signer:
    """The signer for a job's secret or list of secrets; an empty secret signs nothing.

    Each secret's key is cached (a form's secrets recur on every submission). An
    invalid secret raises ValueError each time, naming its place in a list but
    never its value; failures are not cached.
    """
    if isinstance(secret, str):
        return Signer((_key_for(secret),) if secret else ())
    keys: list[SigningKey] = []
    for index, item in enumerate(secret):
        try:
            keys.append(_key_for(item))
        except ValueError as exc:
            # Every reason starts with "payload.secret": point at the item instead.
            where = f"payload.secret[{index}]"
            raise ValueError(where + str(exc).removeprefix("payload.secret")) from None
    return Signer(keys)


def _key_for(secret: str) -> SigningKey:
    if len(secret) > _CACHEABLE_CHARS:
        return _new_key(secret)
    return _cached_key(secret)


def _new_key(secret: str) -> SigningKey:
    """The key of one secret, by its prefix; ValueError if it is not a valid secret."""
    if secret.startswith(_ED25519_PREFIX):
        return Ed25519Key(ed25519_private_key(secret))
    if secret.startswith(_PUBLIC_PREFIX):
        raise ValueError(
            "payload.secret is a whpk_ public key, which cannot sign; give the whsk_ private key"
        )
    return HmacKey(signing_key(secret))


_cached_key = functools.lru_cache(maxsize=_CACHE_ENTRIES)(_new_key)
