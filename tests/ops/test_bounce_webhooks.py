"""POST /bounces/mailgun and /bounces/postmark, and the admin API's suppression list,
served by the real HTTP app over loopback, feeding a real suppression policy."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from formcraftd.core.bounces import BounceIntake
from formcraftd.ops.http import Unavailable, build_app, start_server
from tests.support.bounces import MakePolicy, PolicyUnderTest, policy_factory

pytestmark = [pytest.mark.email]

SIGNING_KEY = "key-mailgun-signing-0123456789"
POSTMARK_PASSWORD = "postmark-webhook-password-42"
ADMIN_TOKEN = "admin-token-for-bounces"
RCPT = "ada@dest.example"


class Control:
    """The part of the daemon the routes use, over a real policy and suppression list."""

    def __init__(self, under: PolicyUnderTest | None) -> None:
        self.under = under

    def admin_token(self) -> str:
        return ADMIN_TOKEN

    def bounce_intake(self) -> BounceIntake | None:
        if self.under is None:
            return None
        policy = self.under.policy
        return BounceIntake(policy.config, policy, policy.counts)

    async def suppression_entries(self, reason: str | None) -> list[dict[str, Any]]:
        if self.under is None:
            raise Unavailable("the email worker is not running here")
        entries = await self.under.suppression.entries(reason)
        return [dataclasses.asdict(e) for e in entries]

    async def suppression_remove(self, address: str) -> bool:
        assert self.under is not None
        return await self.under.suppression.remove(address)


Serve = Callable[[PolicyUnderTest | None], Awaitable[str]]


@pytest.fixture
async def make_policy(tmp_path: Path) -> AsyncIterator[MakePolicy]:
    """Opened BouncePolicies over `tmp_path/var`; closed afterwards."""
    async with policy_factory(tmp_path / "var") as make:
        yield make


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Serves build_app(Control(...)) on a loopback port; returns its base URL."""
    runners = []

    async def start(under: PolicyUnderTest | None) -> str:
        runner = await start_server(build_app(Control(under)), "127.0.0.1", 0)  # type: ignore[arg-type]
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


async def configured(make_policy: MakePolicy) -> PolicyUnderTest:
    return await make_policy(
        mailgun_signing_key=SIGNING_KEY, postmark_password=POSTMARK_PASSWORD, mailgun_max_age_s=60
    )


def mailgun_body(
    event: dict[str, Any],
    *,
    key: str = SIGNING_KEY,
    timestamp: float | None = None,
    token: str = "",
) -> dict[str, Any]:
    stamp = str(int(time.time() if timestamp is None else timestamp))
    token = token or uuid.uuid4().hex
    signature = hmac.new(key.encode(), (stamp + token).encode(), hashlib.sha256).hexdigest()
    return {
        "signature": {"timestamp": stamp, "token": token, "signature": signature},
        "event-data": event,
    }


MAILGUN_FAILED = {
    "event": "failed",
    "severity": "permanent",
    "recipient": RCPT,
    "reason": "bounce",
    "delivery-status": {"code": 550, "message": "5.1.1 The email account does not exist"},
    "message": {"headers": {"message-id": "job-mg@forms.example"}},
}


async def post(url: str, body: Any, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    """POST `body` as JSON: the status and the JSON answer ({} for a plain-text one)."""
    async with aiohttp.ClientSession() as session, session.post(url, json=body, **kwargs) as r:
        if r.content_type != "application/json":
            return r.status, {}
        return r.status, await r.json()


async def test_a_signed_mailgun_failure_suppresses_and_names_the_job(
    serve: Serve, make_policy: MakePolicy
) -> None:
    """A permanent failure with a good signature: suppressed, matched by its Message-ID."""
    under = await configured(make_policy)
    await under.policy.record_sent("job-mg", "form-1", "sub-1", [RCPT])
    base = await serve(under)
    status, answer = await post(f"{base}/bounces/mailgun", mailgun_body(MAILGUN_FAILED))
    assert status == 200
    assert answer == {"result": "applied", "matched": True, "suppressed": True}
    [entry] = await under.suppression.entries()
    assert (entry.kind, entry.source, entry.job_id) == ("hard_bounce", "mailgun", "job-mg")


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (mailgun_body(MAILGUN_FAILED, key="not-the-key"), "wrong signature"),
        (mailgun_body(MAILGUN_FAILED, timestamp=time.time() - 3600), "stale timestamp"),
        ({"event-data": MAILGUN_FAILED}, "no signature"),
    ],
    ids=["a wrong key", "a stale timestamp", "no signature"],
)
async def test_a_mailgun_request_not_signed_right_is_refused_and_counted(
    serve: Serve, make_policy: MakePolicy, body: Any, why: str
) -> None:
    """401, nothing suppressed, the refusal counted; the signing key never in the answer."""
    under = await configured(make_policy)
    base = await serve(under)
    status, answer = await post(f"{base}/bounces/mailgun", body)
    assert (status, answer) == (401, {"error": why})
    assert await under.suppression.entries() == []
    assert under.policy.counts.refused == {"mailgun": 1}


async def test_a_replayed_mailgun_token_is_refused(serve: Serve, make_policy: MakePolicy) -> None:
    """The same signed request twice: the second is a replay."""
    under = await configured(make_policy)
    base = await serve(under)
    body = mailgun_body(MAILGUN_FAILED)
    assert (await post(f"{base}/bounces/mailgun", body))[0] == 200
    assert await post(f"{base}/bounces/mailgun", body) == (401, {"error": "token used before"})


async def test_other_mailgun_events_are_acknowledged_and_ignored(
    serve: Serve, make_policy: MakePolicy
) -> None:
    """A signed `delivered` event: 200 (so Mailgun does not retry), nothing done."""
    under = await configured(make_policy)
    base = await serve(under)
    body = mailgun_body({"event": "delivered", "recipient": RCPT})
    status, answer = await post(f"{base}/bounces/mailgun", body)
    assert (status, answer["result"]) == (200, "ignored")
    assert await under.suppression.entries() == []


def basic(password: str, user: str = "postmark") -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        ({"RecordType": "Bounce", "Type": "HardBounce", "Email": RCPT}, "hard_bounce"),
        ({"RecordType": "SpamComplaint", "Type": "SpamComplaint", "Email": RCPT}, "complaint"),
    ],
    ids=["a hard bounce", "a spam complaint"],
)
async def test_postmark_bounces_and_complaints_behind_basic_auth_are_applied(
    serve: Serve,
    make_policy: MakePolicy,
    payload: dict[str, Any],
    kind: str,
) -> None:
    """With the right credentials, Postmark's hard bounce or complaint suppresses the address."""
    under = await configured(make_policy)
    base = await serve(under)
    status, _ = await post(f"{base}/bounces/postmark", payload, headers=basic(POSTMARK_PASSWORD))
    assert status == 200
    [entry] = await under.suppression.entries()
    assert (entry.address, entry.kind, entry.source) == (RCPT, kind, "postmark")


@pytest.mark.parametrize("headers", [{}, basic("wrong"), {"Authorization": "Basic !!!"}])
async def test_postmark_without_the_right_credentials_is_refused_and_counted(
    serve: Serve, make_policy: MakePolicy, headers: dict[str, str]
) -> None:
    """Missing, wrong or garbled basic auth: 401 with a Basic challenge, counted."""
    under = await configured(make_policy)
    base = await serve(under)
    payload = {"RecordType": "Bounce", "Type": "HardBounce", "Email": RCPT}
    url = f"{base}/bounces/postmark"
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=payload, headers=headers) as r,
    ):
        assert r.status == 401
        assert r.headers["WWW-Authenticate"].startswith("Basic")
        assert POSTMARK_PASSWORD not in await r.text()
    assert await under.suppression.entries() == []
    assert under.policy.counts.refused == {"postmark": 1}


@pytest.mark.parametrize("provider", ["mailgun", "postmark"])
async def test_the_endpoints_are_off_unless_configured(
    serve: Serve, make_policy: MakePolicy, provider: str
) -> None:
    """Without bounce handling, or without that provider's secret: 404."""
    base = await serve(None)
    assert (await post(f"{base}/bounces/{provider}", {}))[0] == 404
    only_imap = await make_policy(postmark_password="", imap_host="h", imap_username="u")
    other = await serve(only_imap)
    assert (await post(f"{other}/bounces/{provider}", {}))[0] == 404


async def test_the_admin_api_lists_by_reason_and_removes_entries(
    serve: Serve, make_policy: MakePolicy
) -> None:
    """GET /admin/suppression?reason=..., DELETE /admin/suppression/{address}, bearer token."""
    under = await configured(make_policy)
    suppression = under.suppression
    await suppression.add(RCPT, reason="550", status=550, source="imap", kind="hard_bounce")
    await suppression.add(
        "b@dest.example", reason="abuse", status=None, source="postmark", kind="complaint"
    )
    base = await serve(under)
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession(headers=auth) as session:
        async with session.get(f"{base}/admin/suppression?reason=complaint") as r:
            listed = await r.json()
        assert r.status == 200
        assert [e["address"] for e in listed["entries"]] == ["b@dest.example"]
        assert listed["entries"][0]["kind"] == "complaint"
        async with session.get(f"{base}/admin/suppression?reason=nope") as r:
            assert r.status == 400
        async with session.delete(f"{base}/admin/suppression/Ada@Dest.example") as r:
            assert (r.status, (await r.json())["removed"]) == (200, True)
        async with session.delete(f"{base}/admin/suppression/{RCPT}") as r:
            assert r.status == 404
    async with aiohttp.ClientSession() as session, session.get(f"{base}/admin/suppression") as r:
        assert r.status == 401
    assert not suppression.suppressed([RCPT])


async def test_a_body_that_arrives_in_pieces_is_read_to_its_end(
    serve: Serve, make_policy: MakePolicy
) -> None:
    """A provider's JSON sent in several chunks, apart in time, is read whole: the
    report is applied, not refused as a body that is not JSON."""
    under = await configured(make_policy)
    await under.policy.record_sent("job-mg", "form-1", "sub-1", [RCPT])
    base = await serve(under)
    raw = orjson.dumps(mailgun_body(MAILGUN_FAILED))

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(raw), 64):
            yield raw[start : start + 64]
            await asyncio.sleep(0.02)

    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{base}/bounces/mailgun", data=pieces(), headers={"Content-Type": "application/json"}
        ) as response,
    ):
        assert response.status == 200, await response.text()
        assert await response.json() == {"result": "applied", "matched": True, "suppressed": True}
