"""Tests for Standard Webhooks signing: keys, message ids and signatures, unit and on the wire."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

import pytest

from formcraftd.core.errors import PermanentFailure
from formcraftd.workers.webhook import WebhookHandler
from formcraftd.workers.webhook.signing import sign, signing_key, webhook_id
from tests.workers.webhook.support import WHSEC, WHSEC_KEY, Receiver, ctx, job

pytestmark = [pytest.mark.webhook, pytest.mark.timeout(10)]


def expected_v1(key: bytes, msg_id: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


# --- pure functions ----------------------------------------------------------------


def test_signing_key_decodes_whsec_secrets() -> None:
    """A whsec_ secret's key is the base64-decoded rest."""
    assert signing_key(WHSEC) == WHSEC_KEY


def test_signing_key_uses_plain_secrets_as_utf8() -> None:
    """A secret without the whsec_ prefix is used as its UTF-8 bytes."""
    assert signing_key("plain-sécret") == "plain-sécret".encode()


def test_signing_key_error_does_not_echo_the_secret() -> None:
    """An invalid whsec_ secret raises ValueError whose message omits the secret."""
    with pytest.raises(ValueError, match="base64") as info:
        signing_key("whsec_not*base64*TOPSECRET")
    assert "TOPSECRET" not in str(info.value)


def test_webhook_id_is_stable_for_one_job_and_endpoint() -> None:
    """The same job id and URL always give the same msg_ id."""
    first = webhook_id("job-1", "https://a.example/hook")
    assert first == webhook_id("job-1", "https://a.example/hook")
    assert first.startswith("msg_") and len(first) == 30


def test_webhook_id_differs_per_endpoint_and_job() -> None:
    """Different URLs or jobs give different ids."""
    base = webhook_id("job-1", "https://a.example/hook")
    assert base != webhook_id("job-1", "https://b.example/hook")
    assert base != webhook_id("job-2", "https://a.example/hook")


def test_sign_without_key_sets_only_id_and_timestamp() -> None:
    """An empty key yields webhook-id and webhook-timestamp but no signatures."""
    assert sign(b"", "msg_x", 1700000000, b"{}") == {
        "webhook-id": "msg_x",
        "webhook-timestamp": "1700000000",
    }


def test_sign_matches_reference_hmacs() -> None:
    """Both signatures are HMAC-SHA256 as receivers compute them, for every message."""
    for body in (b'{"a":1}', b"", b"second message"):
        headers = sign(WHSEC_KEY, "msg_x", 1700000000, body)
        assert headers["webhook-signature"] == expected_v1(WHSEC_KEY, "msg_x", "1700000000", body)
        plain = hmac.new(WHSEC_KEY, body, hashlib.sha256).hexdigest()
        assert headers["X-FormCraft-Signature"] == "sha256=" + plain


# --- what a receiver gets ----------------------------------------------------------


async def test_whsec_signature_verifies(receiver: Receiver, handler: WebhookHandler) -> None:
    """The v1 signature and X-FormCraft-Signature verify with the decoded whsec_ key."""
    await handler.handle(job(receiver.url(), body={"a": 1}, secret=WHSEC), ctx())
    seen = receiver.seen[0]
    h = seen.headers
    assert h["webhook-signature"] == expected_v1(
        WHSEC_KEY, h["webhook-id"], h["webhook-timestamp"], seen.body
    )
    assert (
        h["X-FormCraft-Signature"]
        == "sha256=" + hmac.new(WHSEC_KEY, seen.body, hashlib.sha256).hexdigest()
    )


async def test_plain_secret_signature_verifies(receiver: Receiver, handler: WebhookHandler) -> None:
    """A plain secret signs with its UTF-8 bytes."""
    await handler.handle(job(receiver.url(), body="x", secret="plain-secret"), ctx())
    h = receiver.seen[0].headers
    assert h["webhook-signature"] == expected_v1(
        b"plain-secret", h["webhook-id"], h["webhook-timestamp"], b"x"
    )


async def test_no_secret_sends_no_signature(receiver: Receiver, handler: WebhookHandler) -> None:
    """Without a secret the id and timestamp are sent but no signature headers."""
    await handler.handle(job(receiver.url()), ctx())
    h = receiver.seen[0].headers
    assert "webhook-id" in h and "webhook-timestamp" in h
    assert "webhook-signature" not in h and "X-FormCraft-Signature" not in h


async def test_webhook_id_is_the_same_on_every_try(
    receiver: Receiver, handler: WebhookHandler
) -> None:
    """Two tries of one job carry the same webhook-id."""
    the_job = job(receiver.url(), secret=WHSEC)
    await handler.handle(the_job, ctx(attempt=1))
    await handler.handle(the_job, ctx(attempt=2))
    assert receiver.seen[0].headers["webhook-id"] == receiver.seen[1].headers["webhook-id"]


async def test_webhook_id_differs_for_another_endpoint(
    receiver: Receiver, handler: WebhookHandler
) -> None:
    """The same job sent to two URLs carries two different webhook-ids."""
    await handler.handle(job(receiver.url("/a")), ctx())
    await handler.handle(job(receiver.url("/b")), ctx())
    assert receiver.seen[0].headers["webhook-id"] != receiver.seen[1].headers["webhook-id"]


async def test_webhook_timestamp_is_fresh(receiver: Receiver, handler: WebhookHandler) -> None:
    """webhook-timestamp is the current unix time in seconds."""
    await handler.handle(job(receiver.url()), ctx())
    assert abs(int(receiver.seen[0].headers["webhook-timestamp"]) - time.time()) <= 2


async def test_invalid_whsec_secret_is_a_validation_error(
    receiver: Receiver, handler: WebhookHandler
) -> None:
    """A whsec_ secret that is not base64 fails permanently without a request or the secret.

    Every time: a secret that failed is not remembered as if it had worked.
    """
    for _ in range(2):
        with pytest.raises(PermanentFailure) as info:
            await handler.handle(job(receiver.url(), secret="whsec_***TOPSECRET***"), ctx())
        assert info.value.code == "VALIDATION_ERROR" and not info.value.reached_service
        assert "TOPSECRET" not in info.value.reason and receiver.seen == []


async def test_one_secret_signs_every_job(receiver: Receiver, handler: WebhookHandler) -> None:
    """Jobs sharing a secret each carry signatures that verify for their own body."""
    for i in range(3):
        await handler.handle(job(receiver.url(), body={"n": i}, secret=WHSEC), ctx(f"job-{i}"))
    for seen in receiver.seen:
        h = seen.headers
        assert h["webhook-signature"] == expected_v1(
            WHSEC_KEY, h["webhook-id"], h["webhook-timestamp"], seen.body
        )
        plain = hmac.new(WHSEC_KEY, seen.body, hashlib.sha256).hexdigest()
        assert h["X-FormCraft-Signature"] == "sha256=" + plain
    assert len({s.headers["webhook-signature"] for s in receiver.seen}) == 3


async def test_very_long_secret_signs(receiver: Receiver, handler: WebhookHandler) -> None:
    """A secret too long to be cached signs every job all the same."""
    secret = "s" * 3000
    for i in range(2):
        await handler.handle(job(receiver.url(), body={"n": i}, secret=secret), ctx(f"job-{i}"))
    for seen in receiver.seen:
        h = seen.headers
        assert h["webhook-signature"] == expected_v1(
            secret.encode(), h["webhook-id"], h["webhook-timestamp"], seen.body
        )
