"""Provider webhooks for bounces and complaints: `POST /bounces/mailgun`, `POST /bounces/postmark`.

Both feed the email worker's suppression policy (a :class:`BounceSink` the
daemon hands over), as the bounce mailbox does. Each endpoint answers 404
until it is configured: Mailgun's with `mailgun_signing_key`, Postmark's with
`postmark_password`.

- Mailgun signs each request: ``signature.signature`` is the hex HMAC-SHA256,
  keyed with the webhook signing key, of ``timestamp + token``. A wrong
  signature, a timestamp older than `mailgun_max_age_s` (or as far in the
  future) or a token already used is refused with 401.
- Postmark sends HTTP basic auth credentials (set in its webhook URL); wrong
  or missing ones are refused with 401.

Refused requests are counted (`formcraftd_bounce_webhooks_refused_total`) and
logged without the credentials. A provider's report is applied even when the
job it belongs to is unknown here (the provider vouches for the address); the
event then carries no job ids.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import time
from typing import Any

import orjson
from aiohttp import web
from cachetools import TTLCache

from formcraftd.core.bounces import BounceIntake, BounceReport, BounceType
from formcraftd.core.streams import read_at_most
from formcraftd.core.text import one_line

log = logging.getLogger("formcraftd.bounces")

MAX_BODY_BYTES = 1_048_576
TOKEN_MEMORY_S = 3600
_SEEN_TOKENS_MAX = 100_000
_POSTMARK_HARD = frozenset({"HardBounce", "BadEmailAddress", "ManuallyDeactivated"})
_POSTMARK_SOFT = frozenset({"SoftBounce", "Transient", "DnsError"})


class MailgunVerifier:
    """Checks Mailgun webhook signatures; remembers the tokens it accepted (no replays).

    Tokens are remembered for an hour, the longest `mailgun_max_age_s` allowed:
    a replay older than that is refused for its stale timestamp instead.
    """

    def __init__(self) -> None:
        self._seen: TTLCache[str, bool] = TTLCache(_SEEN_TOKENS_MAX, TOKEN_MEMORY_S)

    def check(
        self, key: str, signature: Any, max_age_s: float, now: float | None = None
    ) -> str | None:
        """None when `signature` (the payload's `signature` object) is good, else why not."""
        if not isinstance(signature, dict):
            return "no signature"
        timestamp, token, given = (signature.get(k) for k in ("timestamp", "token", "signature"))
        if not all(isinstance(v, str) and v for v in (timestamp, token, given)):
            return "incomplete signature"
        assert isinstance(timestamp, str) and isinstance(token, str) and isinstance(given, str)
        expected = hmac.new(key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected.encode(), given.encode()):
            return "wrong signature"
        try:
            age = (time.time() if now is None else now) - float(timestamp)
        except ValueError:
            return "bad timestamp"
        if abs(age) > max_age_s:
            return "stale timestamp"
        if token in self._seen:
            return "token used before"
        self._seen[token] = True
        return None


def mailgun_report(event: Any) -> BounceReport | None:
    """The bounce or complaint in Mailgun's `event-data`; None for other events."""
    if not isinstance(event, dict):
        return None
    name, severity = event.get("event"), event.get("severity")
    kind: BounceType
    if name == "complained":
        kind = "complaint"
    elif name == "failed" and severity in ("permanent", "temporary"):
        kind = "hard" if severity == "permanent" else "soft"
    else:
        return None
    recipient = event.get("recipient")
    if not isinstance(recipient, str):
        return None
    status = _dict(event.get("delivery-status"))
    code = status.get("code")
    said = status.get("message") or status.get("description") or event.get("reason")
    headers = _dict(_dict(event.get("message")).get("headers"))
    variables = _dict(event.get("user-variables"))
    return BounceReport(
        kind,
        recipient,
        "mailgun",
        status=str(status.get("enhanced-code") or code) if (code or status) else None,
        diagnostic=_line(said, code),
        message_ids=_strings(headers.get("message-id")),
        job_ids=_strings(variables.get("job_id") or variables.get("formcraft_job_id")),
    )


def postmark_report(payload: Any) -> BounceReport | None:
    """The bounce or spam complaint in a Postmark webhook; None for anything else."""
    if not isinstance(payload, dict):
        return None
    record, kind_name = payload.get("RecordType"), payload.get("Type")
    kind: BounceType
    if record == "SpamComplaint" or kind_name == "SpamComplaint":
        kind = "complaint"
    elif record == "Bounce" and kind_name in _POSTMARK_HARD:
        kind = "hard"
    elif record == "Bounce" and kind_name in _POSTMARK_SOFT:
        kind = "soft"
    else:
        return None
    recipient = payload.get("Email")
    if not isinstance(recipient, str):
        return None
    metadata = _dict(payload.get("Metadata"))
    return BounceReport(
        kind,
        recipient,
        "postmark",
        status=str(kind_name) if kind_name else None,
        diagnostic=_line(payload.get("Details") or payload.get("Description"), None),
        job_ids=_strings(metadata.get("job_id") or metadata.get("formcraft_job_id")),
    )


def postmark_authorized(request: web.Request, username: str, password: str) -> bool:
    """Whether the request's basic auth credentials are these (constant-time compare)."""
    header = request.headers.get("Authorization", "")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        given = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    expected = f"{username}:{password}".encode()
    return hmac.compare_digest(given, expected)


async def take(intake: BounceIntake, report: BounceReport | None) -> web.Response:
    """Apply a provider's report; 200 either way (a provider retries anything else)."""
    if report is None:
        return web.json_response({"result": "ignored", "reason": "not a bounce or complaint"})
    outcome = await intake.sink.take(report, require_match=False)
    return web.json_response(
        {
            "result": "applied" if outcome.ignored is None else "ignored",
            "matched": outcome.matched,
            "suppressed": outcome.suppressed,
        }
    )


def refuse(intake: BounceIntake, provider: str, why: str, request: web.Request) -> web.Response:
    intake.counts.refuse(provider)
    log.warning("POST /bounces/%s from %s refused: %s", provider, request.remote, why)
    headers = {"WWW-Authenticate": 'Basic realm="formcraftd"'} if provider == "postmark" else None
    return web.json_response({"error": why}, status=401, headers=headers)


async def read_json(request: web.Request) -> Any:
    """The JSON body (at most MAX_BODY_BYTES); 400 if it is not JSON, 413 if too large."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise web.HTTPRequestEntityTooLarge(MAX_BODY_BYTES, request.content_length)
    body = await read_at_most(request.content, MAX_BODY_BYTES + 1)
    if len(body) > MAX_BODY_BYTES:
        raise web.HTTPRequestEntityTooLarge(MAX_BODY_BYTES, len(body))
    try:
        return orjson.loads(body)
    except ValueError:
        raise web.HTTPBadRequest(text="the body is not JSON") from None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, str) and value:
        return (value,)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str) and v)
    return ()


def _line(text: Any, code: Any) -> str | None:
    if not text and not code:
        return None
    joined = " ".join(str(part) for part in (code, text) if part)
    return one_line(joined, 300)
