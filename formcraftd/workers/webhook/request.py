"""What a webhook sends: the body, the headers a job may set, the built request.

A job's own headers never override ours (User-Agent, the signature headers)
nor the client's framing and hop-by-hop headers. A built request knows what it
carried that is secret, so a receiver echoing it back cannot leak it.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from typing import Any

import orjson
from yarl import URL

__all__ = ["WebhookRequest", "encode_body", "payload_headers"]

# Ours always win; framing and hop-by-hop headers are the client's, so a job cannot desync it.
_NOT_FROM_PAYLOAD = frozenset(
    {
        "user-agent",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "x-formcraft-signature",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "host",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
    }
)
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_SIGNATURE_HEADERS = ("webhook-signature", "X-FormCraft-Signature")


def encode_body(body: Any) -> bytes:
    """A str body as is (UTF-8); anything else as compact JSON."""
    if isinstance(body, str):
        return body.encode()
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError as exc:
        raise ValueError(f"payload.body cannot be encoded as JSON: {exc}") from None


def payload_headers(given: dict[str, str]) -> dict[str, str]:
    """The job's headers minus those we own; Content-Type defaults to JSON."""
    if not given:  # the usual case
        return {"Content-Type": "application/json"}
    headers: dict[str, str] = {}
    typed = False
    for name, value in given.items():
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"payload.headers has an invalid header name {name[:64]!r}")
        lowered = name.lower()
        if lowered not in _NOT_FROM_PAYLOAD:
            headers[name] = value
            typed = typed or lowered == "content-type"
    if not typed:
        headers["Content-Type"] = "application/json"
    return headers


@dataclass(slots=True)
class WebhookRequest:
    """One job's request, built once and not changed afterwards.

    Not frozen: a frozen dataclass's `__init__` costs several times as much,
    once per job. Headers, body and secret stay out of its repr.
    """

    method: str
    url: URL
    origin: str  # for reasons and logs: no userinfo, path or query
    headers: dict[str, str] = field(repr=False)
    body: bytes = field(repr=False)
    secret: str | list[str] = field(repr=False)
    payload_headers: dict[str, str] = field(repr=False)

    def sensitive(self) -> tuple[str, ...]:
        """What a receiver might echo back that must not leak through a snippet.

        Each secret (with and without its `whsec_` or `whsk_` prefix), every
        signature, every payload header value of 8 characters or more, and what
        the URL carries besides its origin and path: the userinfo (and the Basic
        credentials aiohttp builds from it) and the query string and its values.
        Built only when a response has a body to mask; longer ones are replaced
        first.
        """
        signatures = [
            signature.split(",", 1)[-1].removeprefix("sha256=")
            for name in _SIGNATURE_HEADERS
            if (value := self.headers.get(name)) is not None
            for signature in value.split(" ")
        ]
        secrets = [self.secret] if isinstance(self.secret, str) else self.secret
        unprefixed = [s.removeprefix("whsec_").removeprefix("whsk_") for s in secrets]
        long_values = [v for v in self.payload_headers.values() if len(v) >= 8]
        url = self.url
        from_url: list[str] = []
        if url.raw_user or url.raw_password:
            user, password = url.user or "", url.password or ""
            credentials = base64.b64encode(f"{user}:{password}".encode()).decode()
            from_url += [credentials, user, password, url.raw_user or "", url.raw_password or ""]
        if url.raw_query_string:
            from_url += [url.raw_query_string, url.query_string]
            from_url += [value for value in url.query.values() if len(value) >= 4]
        found = [*secrets, *unprefixed, *signatures, *long_values]
        return tuple(sorted((s for s in (*found, *from_url) if s), key=len, reverse=True))
