"""Tests for what a webhook sends: the body, the headers a job may set, the built request."""

from __future__ import annotations

import json

import pytest

from formcraftd.core.errors import PermanentFailure
from formcraftd.workers.webhook import WebhookHandler
from formcraftd.workers.webhook.request import encode_body
from tests.workers.webhook.support import USER_AGENT, WHSEC, Receiver, ctx, job

pytestmark = [pytest.mark.webhook, pytest.mark.timeout(10)]


def test_encode_body_sends_strings_as_is() -> None:
    """A str body is its UTF-8 bytes, not a JSON string."""
    assert encode_body("a=1&b=ü") == "a=1&b=ü".encode()


def test_encode_body_is_compact_json() -> None:
    """Non-string bodies are JSON without spaces."""
    assert encode_body({"a": [1, 2], "b": None}) == b'{"a":[1,2],"b":null}'


def test_encode_body_refuses_unencodable_values() -> None:
    """An integer too large for JSON encoding raises ValueError."""
    with pytest.raises(ValueError, match=r"payload\.body"):
        encode_body({"n": 2**80})


async def test_user_agent_wins_over_payload(receiver: Receiver, handler: WebhookHandler) -> None:
    """User-Agent is ours even when the payload tries to set it."""
    await handler.handle(job(receiver.url(), headers={"user-agent": "evil"}), ctx())
    assert receiver.seen[0].headers["User-Agent"] == USER_AGENT


async def test_payload_cannot_forge_signature_headers(
    receiver: Receiver, handler: WebhookHandler
) -> None:
    """A payload's webhook-* headers are replaced by ours."""
    headers = {"Webhook-Id": "forged", "webhook-signature": "v1,forged"}
    await handler.handle(job(receiver.url(), headers=headers, secret="s3cret-key"), ctx())
    h = receiver.seen[0].headers
    assert h["webhook-id"].startswith("msg_") and h["webhook-signature"] != "v1,forged"


async def test_payload_headers_are_passed(receiver: Receiver, handler: WebhookHandler) -> None:
    """Custom payload headers reach the receiver."""
    await handler.handle(
        job(receiver.url(), headers={"X-Custom": "yes", "Authorization": "B t"}), ctx()
    )
    h = receiver.seen[0].headers
    assert h["X-Custom"] == "yes" and h["Authorization"] == "B t"


async def test_method_put_is_used(receiver: Receiver, handler: WebhookHandler) -> None:
    """payload.method is the request method."""
    await handler.handle(job(receiver.url(), method="PUT"), ctx())
    assert receiver.seen[0].method == "PUT"


async def test_string_body_is_sent_as_is(receiver: Receiver, handler: WebhookHandler) -> None:
    """A string body arrives byte for byte, with the payload's Content-Type."""
    headers = {"content-type": "application/x-www-form-urlencoded"}
    await handler.handle(job(receiver.url(), body="a=1&b=2", headers=headers), ctx())
    seen = receiver.seen[0]
    assert seen.body == b"a=1&b=2"
    assert seen.headers["Content-Type"] == "application/x-www-form-urlencoded"


async def test_json_body_is_compact(receiver: Receiver, handler: WebhookHandler) -> None:
    """An object body arrives as compact JSON with Content-Type application/json."""
    await handler.handle(job(receiver.url(), body={"name": "Ada", "n": [1, 2]}), ctx())
    seen = receiver.seen[0]
    assert seen.body == b'{"name":"Ada","n":[1,2]}'
    assert seen.headers["Content-Type"] == "application/json"
    assert json.loads(seen.body) == {"name": "Ada", "n": [1, 2]}


async def test_request_repr_hides_what_is_secret(handler: WebhookHandler) -> None:
    """A built request's repr shows neither the secret, a signature, a header nor the body."""
    the_job = job(
        "http://127.0.0.1:9/hook",
        body={"card": "4111111111111111"},
        secret=WHSEC,
        headers={"Authorization": "Bearer sk_live_123456"},
    )
    request = handler._build(the_job, ctx(), handler._settings.policy)
    text = repr(request)
    signature = request.headers["webhook-signature"].removeprefix("v1,")
    for hidden in (WHSEC, WHSEC.removeprefix("whsec_"), signature, "sk_live", "4111"):
        assert hidden not in text
    assert "127.0.0.1:9" in text


async def test_payload_cannot_set_framing_headers(
    receiver: Receiver, handler: WebhookHandler
) -> None:
    """Host, Content-Length and Connection from a payload are dropped; JSON stays the default."""
    headers = {"Host": "evil.example", "Content-Length": "1", "Connection": "close"}
    await handler.handle(job(receiver.url(), body={"a": 1}, headers=headers), ctx())
    seen = receiver.seen[0]
    assert seen.headers["Host"] == f"127.0.0.1:{receiver.port}"
    assert seen.body == b'{"a":1}' and seen.headers["Content-Type"] == "application/json"


async def test_invalid_header_name_is_a_validation_error(
    receiver: Receiver, handler: WebhookHandler
) -> None:
    """A payload header name that is not an HTTP token fails permanently without a request."""
    with pytest.raises(PermanentFailure) as info:
        await handler.handle(job(receiver.url(), headers={"X Bad": "1"}), ctx())
    assert info.value.code == "VALIDATION_ERROR" and receiver.seen == []
