"""The access-token cache against the fake Google token endpoint on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from formcraftd.workers.sheets.google_auth import AccessToken, OAuthClient, TokenCache
from tests.support.google import CLIENT_ID, CLIENT_SECRET, FakeGoogle

pytestmark = [pytest.mark.sheets, pytest.mark.timeout(30)]

NO_TOKEN = AccessToken("", 0)


@pytest.fixture
async def google() -> AsyncIterator[FakeGoogle]:
    """The fake Google, stopped afterwards."""
    fake = await FakeGoogle().start()
    yield fake
    await fake.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session, closed afterwards."""
    async with aiohttp.ClientSession() as client:
        yield client


def two_token_cache(google: FakeGoogle) -> TokenCache:
    """A cache that holds the tokens of two refresh tokens at most."""
    return TokenCache(OAuthClient(CLIENT_ID, CLIENT_SECRET, google.token_url), max_entries=2)


async def test_the_cache_holds_at_most_max_entries(
    google: FakeGoogle, session: aiohttp.ClientSession
) -> None:
    """Past max_entries the oldest refresh token's access token is forgotten and fetched again."""
    tokens = two_token_cache(google)
    first, second, third = (google.add_user()[0] for _ in range(3))
    for refresh in (first, second, third):
        await tokens.access_token(session, refresh, NO_TOKEN)
    assert len(tokens) == 2 and len(google.grants) == 3
    await tokens.access_token(session, third, NO_TOKEN)
    assert len(google.grants) == 3
    await tokens.access_token(session, first, NO_TOKEN)
    assert [grant.refresh_token for grant in google.grants] == [first, second, third, first]


async def test_a_token_in_use_outlasts_an_idle_one(
    google: FakeGoogle, session: aiohttp.ClientSession
) -> None:
    """Using a cached token makes the idle one the first to be forgotten."""
    tokens = two_token_cache(google)
    used, idle, newcomer = (google.add_user()[0] for _ in range(3))
    for refresh in (used, idle, used, newcomer):
        await tokens.access_token(session, refresh, NO_TOKEN)
    await tokens.access_token(session, used, NO_TOKEN)
    await tokens.access_token(session, idle, NO_TOKEN)
    assert [grant.refresh_token for grant in google.grants] == [used, idle, newcomer, idle]
