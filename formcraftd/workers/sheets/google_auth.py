"""Google OAuth access tokens: refreshed once per refresh token, cached in memory.

Jobs carry the user's tokens (the FormCraft app stores them when the user
connects a Google account). A job's access token is used while it has more
than a minute to live; otherwise, or when Google answers 401, the refresh
token is exchanged at `token_url` for a fresh one (the OAuth 2.0
``refresh_token`` grant, RFC 6749 §6).

At most one refresh runs per refresh token: concurrent callers wait for it and
share its result, or its failure. The fresh token is cached under the SHA-256
of the refresh token and preferred over the older tokens later jobs carry.
Token values never appear in reprs, logs or error reasons.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec
from cachetools import LRUCache

from formcraftd.core.errors import JobFailure, PermanentFailure, RetryLater
from formcraftd.core.retry import parse_retry_after
from formcraftd.core.streams import read_at_most

__all__ = [
    "REFRESH_MARGIN_MS",
    "AccessToken",
    "OAuthClient",
    "RefreshListener",
    "TokenCache",
    "copy_failure",
    "describe_transport_error",
    "token_key",
]

log = logging.getLogger("formcraftd.sheets")

REFRESH_MARGIN_MS = 60_000
"""A token with less than this left to live is refreshed before use."""

_TIMEOUT = aiohttp.ClientTimeout(total=30)
_MAX_RESPONSE_BYTES = 65_536
_ERROR_CODE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def describe_transport_error(exc: BaseException) -> str:
    """The error's type, and for a failed connection the host:port and the OS error.

    E.g. ``ClientConnectorError: cannot connect to 127.0.0.1:1: [Errno 111]
    Connection refused``. aiohttp's own message is not used: it quotes its
    event loop's wording and, for some errors, the URL.
    """
    name = type(exc).__name__
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"{name}: cannot connect to {exc.host}:{exc.port}: {_os_reason(exc.os_error)}"
    if isinstance(exc, OSError) and (exc.errno or exc.strerror):
        return f"{name}: {_os_reason(exc)}"
    return name


def _os_reason(error: OSError) -> str:
    if isinstance(error, socket.gaierror) or not error.errno:  # DNS: its own numbering
        return str(error.strerror or type(error).__name__)
    return f"[Errno {error.errno}] {os.strerror(error.errno)}"


def token_key(refresh_token: str) -> str:
    """The cache key of a refresh token: its SHA-256, hex (safe to log a prefix of)."""
    return hashlib.sha256(refresh_token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class AccessToken:
    """A bearer token and when it expires (ms since the epoch)."""

    value: str = field(repr=False)
    expiry_ms: int

    def usable(self, now_ms: float) -> bool:
        """Whether it may still be sent: set, and valid for more than a minute."""
        return bool(self.value) and self.expiry_ms - now_ms > REFRESH_MARGIN_MS


@dataclass(frozen=True, slots=True)
class OAuthClient:
    """The OAuth client (from Google Cloud console) and the token endpoint."""

    client_id: str
    client_secret: str = field(repr=False)
    token_url: str


RefreshListener = Callable[[str, AccessToken], None]
"""Called with the form id of the job that caused a refresh and the new token."""


class _TokenResponse(msgspec.Struct):
    access_token: str = ""
    expires_in: int = 0


class _ErrorResponse(msgspec.Struct):
    error: Any = ""


@dataclass(slots=True)
class _Flight:
    """The refreshes of one refresh token: one at a time, failures shared with waiters."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0
    finished: int = 0  # refresh attempts completed, successful or not
    failure: JobFailure | None = None


def copy_failure(failure: JobFailure) -> JobFailure:
    """A fresh exception equal to `failure`, for each of several jobs that share it.

    A copied RetryLater does not count against the circuit breaker: the batch
    made one call, and only the original counts as its one failure.
    """
    if isinstance(failure, PermanentFailure):
        return PermanentFailure(
            failure.code,
            failure.reason,
            status=failure.status,
            reached_service=failure.reached_service,
        )
    if isinstance(failure, RetryLater):
        return RetryLater(
            failure.code,
            failure.reason,
            after=failure.after,
            status=failure.status,
            counts_for_breaker=False,
        )
    return RetryLater("INTERNAL_ERROR", str(failure))


class TokenCache:
    """Fresh access tokens per refresh token, with single-flight refreshes."""

    def __init__(
        self,
        client: OAuthClient,
        *,
        max_entries: int = 10_000,
        clock_ms: Callable[[], float] = lambda: time.time() * 1000,
    ) -> None:
        self.client = client
        self.on_refreshed: RefreshListener | None = None
        self.refreshes = 0  # token requests sent, for tests and the benchmark
        self._clock_ms = clock_ms
        # At most max_entries tokens; reading one marks it recently used.
        self._cache: LRUCache[str, AccessToken] = LRUCache(max_entries)
        self._flights: dict[str, _Flight] = {}

    def __len__(self) -> int:
        return len(self._cache)

    async def access_token(
        self,
        session: aiohttp.ClientSession,
        refresh_token: str,
        offered: AccessToken,
        *,
        owner: str = "",
    ) -> AccessToken:
        """The newest usable token: the cached one, the offered one, or a fresh one."""
        key = token_key(refresh_token)
        best = self._newest(key, offered)
        if best.usable(self._clock_ms()):
            return best
        return await self._refresh(session, key, refresh_token, best, owner)

    async def replace(
        self,
        session: aiohttp.ClientSession,
        refresh_token: str,
        rejected: AccessToken,
        *,
        owner: str = "",
    ) -> AccessToken:
        """A token other than `rejected` (which the API answered 401 to)."""
        key = token_key(refresh_token)
        cached = self._cache.get(key)
        if cached is not None and cached.value == rejected.value:
            del self._cache[key]
        return await self._refresh(session, key, refresh_token, rejected, owner)

    def _newest(self, key: str, offered: AccessToken) -> AccessToken:
        cached = self._cache.get(key)
        if cached is None or (offered.value and offered.expiry_ms > cached.expiry_ms):
            return offered
        return cached

    def _store(self, key: str, token: AccessToken) -> None:
        if self._cache.maxsize:  # a cache of size 0 holds nothing (and refuses to)
            self._cache[key] = token

    async def _refresh(
        self,
        session: aiohttp.ClientSession,
        key: str,
        refresh_token: str,
        stale: AccessToken,
        owner: str,
    ) -> AccessToken:
        """Refresh unless a refresh finished while we waited; share a failed one's verdict."""
        flight = self._flights.get(key)
        if flight is None:
            flight = self._flights[key] = _Flight()
        flight.users += 1
        finished_before = flight.finished
        try:
            async with flight.lock:
                cached = self._cache.get(key)
                fresh = cached is not None and cached.usable(self._clock_ms())
                if cached is not None and fresh and cached.value != stale.value:
                    return cached
                if flight.finished != finished_before and flight.failure is not None:
                    raise copy_failure(flight.failure)  # the refresh we waited for failed
                try:
                    token = await self._request(session, refresh_token)
                except BaseException as exc:  # a cancelled refresh leaves no verdict to share
                    flight.failure = exc if isinstance(exc, JobFailure) else None
                    flight.finished += 1
                    raise
                flight.failure = None
                flight.finished += 1
                self._store(key, token)
        finally:
            flight.users -= 1
            if flight.users == 0:
                del self._flights[key]
        log.info(
            "refreshed the Google access token of refresh token %s… (valid %.0f s)",
            key[:12],
            (token.expiry_ms - self._clock_ms()) / 1000,
        )
        self._notify(owner, token)
        return token

    def _notify(self, owner: str, token: AccessToken) -> None:
        listener = self.on_refreshed
        if listener is None:
            return
        try:
            listener(owner, token)
        except Exception:
            log.exception("the token-refreshed listener failed")

    async def _request(self, session: aiohttp.ClientSession, refresh_token: str) -> AccessToken:
        """One refresh_token grant at the token endpoint; job-fate exceptions on failure."""
        client = self.client
        if not client.client_id or not client.client_secret:
            raise RetryLater(
                "OAUTH_CLIENT_REJECTED",
                "no Google OAuth client is configured (workers.sheets.client_id / client_secret)",
            )
        form = {
            "grant_type": "refresh_token",
            "client_id": client.client_id,
            "client_secret": client.client_secret,
            "refresh_token": refresh_token,
        }
        self.refreshes += 1
        try:
            async with session.post(
                client.token_url, data=form, timeout=_TIMEOUT, allow_redirects=False
            ) as resp:
                body = await read_at_most(resp.content, _MAX_RESPONSE_BYTES)
                status, retry_after = resp.status, resp.headers.get("Retry-After")
        except TimeoutError:
            raise RetryLater(
                "OAUTH_UNAVAILABLE", "OAuth token endpoint: no answer within 30 s"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise RetryLater(
                "OAUTH_UNAVAILABLE", f"OAuth token endpoint: {describe_transport_error(exc)}"
            ) from None
        return self._parse(status, body, retry_after)

    def _parse(self, status: int, body: bytes, retry_after: str | None) -> AccessToken:
        if status == 200:
            try:
                parsed = msgspec.json.decode(body, type=_TokenResponse)
            except msgspec.MsgspecError:
                parsed = _TokenResponse()
            if not parsed.access_token or parsed.expires_in <= 0:
                raise RetryLater(
                    "OAUTH_UNAVAILABLE",
                    "OAuth token endpoint: malformed token response",
                    status=status,
                )
            expiry = int(self._clock_ms()) + parsed.expires_in * 1000
            return AccessToken(parsed.access_token, expiry)
        error = _error_code(body)
        if error == "invalid_grant":
            raise PermanentFailure(
                "AUTH_REVOKED",
                "Google refused the refresh token (invalid_grant): access was revoked or "
                "expired; the user must reconnect the Google account in FormCraft",
                status=status,
                reached_service=False,
            )
        reason = f"OAuth token endpoint: HTTP {status}" + (f" {error}" if error else "")
        if status == 429 or status >= 500:
            raise RetryLater(
                "OAUTH_UNAVAILABLE", reason, after=parse_retry_after(retry_after), status=status
            )
        log.error("%s: check workers.sheets.client_id, client_secret and token_url", reason)
        raise RetryLater("OAUTH_CLIENT_REJECTED", reason, status=status)


def _error_code(body: bytes) -> str:
    """The OAuth `error` code of an error response, when it looks like one."""
    try:
        error = msgspec.json.decode(body, type=_ErrorResponse).error
    except msgspec.MsgspecError:
        return ""
    return error if isinstance(error, str) and _ERROR_CODE.fullmatch(error) else ""
