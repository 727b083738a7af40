"""Tests for secret rotation and Ed25519 signing, each signature checked twice.

Every signature is verified by the reference implementation (the `standardwebhooks`
package for `v1`; it ignores `v1a`) and by an independent computation: the
standard library's HMAC for `v1`, and for `v1a` cryptography's Ed25519 verifier
with the `whpk_` public key plus a known answer from the Standard Webhooks
reference server.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Mapping

import orjson
import pytest
from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from standardwebhooks import Webhook, WebhookVerificationError

from formcraftd.core.errors import PermanentFailure
from formcraftd.workers.webhook import WebhookHandler
from formcraftd.workers.webhook.signing import public_key_of, signer_for
from tests.conftest import DaemonFactory, ReceiverFactory
from tests.support import Behaviour, Broker, Names, make_config, webhook_job
from tests.workers.webhook.support import Receiver, ctx, job

pytestmark = [pytest.mark.webhook, pytest.mark.timeout(30)]

NEW = "whsec_" + base64.b64encode(b"the-new-secret-of-rotation-0001").decode()
OLD = "whsec_" + base64.b64encode(b"the-old-secret-of-rotation-0002").decode()
# The key pair of the Standard Webhooks reference server's documentation and tests
# (svix-webhooks: README "asymmetric-key generate", worker.rs test_asymmetric_key_signing).
WHSK = (
    "whsk_6Xb/dCcHpPea21PS1N9VY/NZW723CEc77N4rJCubMbfVKIDij2HKpMKkioLlX0dRqSKJp4AJ6p9lMicMFs6Kvg=="
)
WHPK = "whpk_1SiA4o9hyqTCpIqC5V9HUakiiaeACeqfZTInDBbOir4="
SEED_ONLY = "whsk_" + base64.b64encode(base64.b64decode(WHSK[5:])[:32]).decode()
MISMATCHED = "whsk_" + base64.b64encode(base64.b64decode(WHSK[5:])[:32] + bytes(32)).decode()


def headers_for(secret: str | list[str], body: bytes, msg_id: str = "msg_rot") -> dict[str, str]:
    """What signer_for(secret) sends for `body`, signed now."""
    headers: dict[str, str] = {}
    signer_for(secret).add_headers(headers.__setitem__, msg_id, int(time.time()), body)
    return headers


def signatures(headers: Mapping[str, str]) -> list[str]:
    return headers["webhook-signature"].split(" ")


def expected_v1(key: bytes, headers: Mapping[str, str], body: bytes) -> str:
    """The v1 signature as a receiver computes it with the standard library."""
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def key_of(whsec: str) -> bytes:
    return base64.b64decode(whsec.removeprefix("whsec_"))


def verifies_v1a(public: str, headers: Mapping[str, str], body: bytes) -> bool:
    """Whether a v1a signature verifies with the whpk_ public key (cryptography's Ed25519)."""
    key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public.removeprefix("whpk_")))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    for item in signatures(headers):
        version, _, signature = item.partition(",")
        if version != "v1a":
            continue
        try:
            key.verify(base64.b64decode(signature), signed)
        except InvalidSignature:
            continue
        return True
    return False


def reference_verifies(secret: str | bytes, headers: Mapping[str, str], body: bytes) -> bool:
    """Whether the standardwebhooks package verifies the request with `secret`."""
    try:
        Webhook(secret).verify(body, dict(headers), json_parse=False)
    except WebhookVerificationError:
        return False
    return True


# --- the signatures ------------------------------------------------------------------


def test_a_list_signs_once_per_secret_in_order() -> None:
    """Two secrets give two space-separated v1 signatures, the current one first."""
    body = b'{"a":1}'
    headers = headers_for([NEW, OLD], body)
    assert signatures(headers) == [
        expected_v1(key_of(NEW), headers, body),
        expected_v1(key_of(OLD), headers, body),
    ]


def test_each_secret_of_a_rotation_verifies_alone_with_the_reference() -> None:
    """A receiver knowing only the new or only the old secret verifies; another secret fails."""
    body = b'{"a":1}'
    headers = headers_for([NEW, OLD], body)
    assert reference_verifies(NEW, headers, body)
    assert reference_verifies(OLD, headers, body)
    other = "whsec_" + base64.b64encode(b"a-secret-nobody-signed-with-003").decode()
    assert not reference_verifies(other, headers, body)


def test_plain_secrets_in_a_list_sign_with_their_utf8_bytes() -> None:
    """Secrets without whsec_ are keyed with their UTF-8 bytes, as a single one is."""
    body = "süß".encode()
    headers = headers_for(["plain-new-sécret", "plain-old"], body)
    assert signatures(headers) == [
        expected_v1("plain-new-sécret".encode(), headers, body),
        expected_v1(b"plain-old", headers, body),
    ]
    assert reference_verifies(b"plain-old", headers, body)


def test_a_one_item_list_signs_as_the_secret_alone() -> None:
    """[secret] sends exactly the headers that secret alone sends."""
    body = b"{}"
    assert headers_for([NEW], body) == headers_for(NEW, body)


def test_the_legacy_header_is_keyed_with_the_first_secret() -> None:
    """X-FormCraft-Signature is the HMAC of the body with the first secret only."""
    body = b'{"a":1}'
    headers = headers_for([NEW, OLD], body)
    plain = hmac.new(key_of(NEW), body, hashlib.sha256).hexdigest()
    assert headers["X-FormCraft-Signature"] == "sha256=" + plain


def test_an_ed25519_first_secret_sends_no_legacy_header() -> None:
    """With a whsk_ key first there is no shared key for X-FormCraft-Signature."""
    headers = headers_for([WHSK, OLD], b"{}")
    assert "X-FormCraft-Signature" not in headers
    assert [s.split(",")[0] for s in signatures(headers)] == ["v1a", "v1"]


def test_an_ed25519_secret_after_an_hmac_one_keeps_the_legacy_header() -> None:
    """A whsk_ key later in the list leaves X-FormCraft-Signature to the first secret."""
    body = b"{}"
    headers = headers_for([NEW, WHSK], body)
    plain = hmac.new(key_of(NEW), body, hashlib.sha256).hexdigest()
    assert headers["X-FormCraft-Signature"] == "sha256=" + plain


def test_whsk_signs_as_the_reference_server_does() -> None:
    """The reference server's known answer: Ed25519 is deterministic, so it must match."""
    headers: dict[str, str] = {}
    signer_for(WHSK).add_headers(
        headers.__setitem__, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}'
    )
    assert headers["webhook-signature"] == (
        "v1a,hnO3f9T8Ytu9HwrXslvumlUpqtNVqkhqw/enGzPCXe5BdqzCInXqYXFymVJaA7AZdpXwVLPo3mNl8EM+m7TBAg=="
    )


def test_v1a_verifies_with_the_public_key() -> None:
    """The v1a signature verifies with the whpk_ key, and not for another body."""
    body = b'{"a":1}'
    headers = headers_for(WHSK, body)
    assert public_key_of(WHSK) == WHPK
    assert verifies_v1a(WHPK, headers, body)
    assert not verifies_v1a(WHPK, headers, b'{"a":2}')


def test_a_32_byte_whsk_key_signs_as_its_64_byte_form() -> None:
    """The private key alone (without its public half) is the same key."""
    assert public_key_of(SEED_ONLY) == WHPK
    body = b"{}"
    assert headers_for(SEED_ONLY, body) == headers_for(WHSK, body)


def test_the_reference_verifies_v1_beside_a_v1a() -> None:
    """A mixed header: the reference skips v1a and verifies the v1 of the HMAC secret."""
    body = b'{"a":1}'
    headers = headers_for([WHSK, OLD], body)
    assert reference_verifies(OLD, headers, body)
    assert verifies_v1a(WHPK, headers, body)


@pytest.mark.parametrize(
    ("secret", "problem"),
    [
        ("whsk_TOPSECRET*not*base64", "not valid base64"),
        ("whsk_" + base64.b64encode(b"TOPSECRET-16byte").decode(), "holds 16 bytes"),
        (MISMATCHED, "not the public key"),
        (WHPK, "whpk_ public key"),
    ],
    ids=["not-base64", "wrong-length", "mismatched-public-half", "public-key"],
)
def test_an_invalid_ed25519_secret_is_refused_without_quoting_it(secret: str, problem: str) -> None:
    """A bad whsk_ key (or a whpk_ one) raises ValueError naming the problem, not the key."""
    with pytest.raises(ValueError, match=problem) as info:
        signer_for(secret)
    assert secret[5:15] not in str(info.value)


def test_an_invalid_secret_in_a_list_is_named_by_its_place() -> None:
    """The reason points at the item (payload.secret[1]), never its value."""
    with pytest.raises(ValueError, match=r"^payload\.secret\[1\] starts with whsk_") as info:
        signer_for([NEW, "whsk_TOPSECRET*"])
    assert "TOPSECRET" not in str(info.value)


# --- through the handler --------------------------------------------------------------


async def test_a_rotation_reaches_the_receiver_verifiable_with_each_secret(
    receiver: Receiver, handler: WebhookHandler
) -> None:
    """On the wire: the reference verifies the request with the new and the old secret."""
    await handler.handle(job(receiver.url(), body={"a": 1}, secret=[NEW, OLD]), ctx())
    seen = receiver.seen[0]
    assert reference_verifies(NEW, seen.headers, seen.body)
    assert reference_verifies(OLD, seen.headers, seen.body)
    assert signatures(seen.headers)[1] == expected_v1(key_of(OLD), seen.headers, seen.body)


async def test_a_bad_secret_in_a_list_is_a_validation_error(
    receiver: Receiver, handler: WebhookHandler
) -> None:
    """A job whose second secret is no Ed25519 key fails permanently, without a request."""
    with pytest.raises(PermanentFailure) as info:
        await handler.handle(job(receiver.url(), secret=[NEW, "whsk_TOPSECRET"]), ctx())
    assert info.value.code == "VALIDATION_ERROR" and not info.value.reached_service
    assert "payload.secret[1]" in info.value.reason and "TOPSECRET" not in info.value.reason
    assert receiver.seen == []


async def test_an_echoing_receiver_cannot_leak_any_secret_of_a_list(
    receiver: Receiver, handler: WebhookHandler
) -> None:
    """Secrets and signatures echoed back in an error body are masked in the reason."""
    secrets = [NEW, WHSK, "plain-old-secret-value"]

    async def echo(request: web.Request) -> web.StreamResponse:
        echoed = {"headers": dict(request.headers), "known": [s[-12:] for s in secrets]}
        return web.Response(status=400, text=json.dumps(echoed) + " " + " ".join(secrets))

    receiver.behaviour = echo
    with pytest.raises(PermanentFailure) as info:
        await handler.handle(job(receiver.url(), secret=secrets), ctx())
    sent = receiver.seen[0].headers
    for leaked in (*secrets, NEW[6:], WHSK[5:], *signatures(sent)):
        assert leaked.split(",")[-1] not in info.value.reason
    assert sent["X-FormCraft-Signature"].removeprefix("sha256=") not in info.value.reason


# --- end to end: broker, daemon, receivers ----------------------------------------------


Check = Callable[[Mapping[str, str], bytes], bool]


def verifying(check: Check, answered: list[int]) -> Behaviour:
    """A receiver behaviour answering 204 when `check(headers, body)` holds, else 401."""

    async def behaviour(request: web.Request, _n: int) -> web.StreamResponse:
        status = 204 if check(dict(request.headers), await request.read()) else 401
        answered.append(status)
        return web.Response(status=status)

    return behaviour


@pytest.mark.e2e
async def test_rotation_and_ed25519_end_to_end(
    names: Names, amqp: Broker, receiver_factory: ReceiverFactory, start_daemon: DaemonFactory
) -> None:
    """Through RabbitMQ and the daemon, each receiver verifies with the one key it knows.

    A receiver that knows only the new secret, one that knows only the old one (both
    with the reference verifier) and one with only the Ed25519 public key all answer
    2xx, which settles each job as delivered on its first try.
    """
    answered: list[int] = []
    checks: list[Check] = [
        lambda h, b: reference_verifies(NEW, h, b),
        lambda h, b: reference_verifies(OLD, h, b),
        lambda h, b: verifies_v1a(WHPK, h, b),
    ]
    receivers = [await receiver_factory(verifying(check, answered)) for check in checks]
    cfg = make_config(names, retry={"attempts": 1})
    await start_daemon(cfg)
    queue = cfg.workers.webhook.queue
    for receiver, secret in zip(receivers, ([NEW, OLD], [NEW, OLD], [WHSK, OLD]), strict=True):
        await amqp.publish(
            queue, webhook_job(receiver.url, body={"to": receiver.port}, secret=secret)
        )
    for receiver in receivers:
        [request] = await receiver.wait_for(1)
        assert orjson.loads(request.body) == {"to": receiver.port}
    assert answered == [204, 204, 204]
    deadline = time.monotonic() + 10
    while await amqp.depth(queue):
        if time.monotonic() > deadline:
            raise AssertionError(f"{queue} still holds jobs after 10 s")
        await asyncio.sleep(0.05)
    assert await amqp.depth(f"dlq.{queue}") == 0
