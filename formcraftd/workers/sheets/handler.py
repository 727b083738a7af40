"""The Google Sheets worker: `sheets.update` jobs as few, rate-limited Sheets v4 calls.

In ``append`` mode, jobs for the same (spreadsheetId, range, refresh token)
that arrive within `batch_window_ms` become ONE ``values.append`` with their
rows in arrival order (up to `batch_max_rows`); in ``update`` mode, jobs for
one spreadsheet (and refresh token) become one ``values.batchUpdate``. Every
job waits for its batch's call and returns only when it succeeded, so the
consumer acks it only then; when the call fails, each job gets its own copy of
the failure and follows its own retry or dead-letter path. A 400 for a batch of
several jobs is retried job by job, so one bad row does not dead-letter its
neighbours.

Each call first takes a token from the refresh token's bucket
(`requests_per_minute_per_user`) and from the process's bucket
(`requests_per_minute`), then holds the queue's concurrency slot only while
the request is on the wire. Access tokens come from
:class:`~formcraftd.workers.sheets.google_auth.TokenCache` (refreshed ahead of expiry or after a
401, once per refresh token). 429, 5xx and network errors are retried, with
``Retry-After`` honoured and the buckets paused; 400/403/404 dead-letter the
jobs as ``SHEETS_REQUEST_REJECTED``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

import aiohttp
import msgspec

from formcraftd.core import events
from formcraftd.core.config import SheetsWorkerConfig
from formcraftd.core.errors import JobFailure, PermanentFailure
from formcraftd.core.events import Emit, TokenRefreshedEvent
from formcraftd.core.handler import JobContext
from formcraftd.core.jobs import SheetsJob
from formcraftd.core.limits import TokenBucket
from formcraftd.workers.sheets.api import (
    ApiRequest,
    ApiResponse,
    SheetsApi,
    judge,
    load_discovery,
    per_user_limit,
    rate_limited,
    send,
)
from formcraftd.workers.sheets.batch import Batcher
from formcraftd.workers.sheets.google_auth import (
    AccessToken,
    OAuthClient,
    TokenCache,
    copy_failure,
    token_key,
)

if TYPE_CHECKING:
    from formcraftd.core.handler import Handler

__all__ = ["BatchKey", "SheetsHandler", "breaker_key"]

log = logging.getLogger("formcraftd.sheets")

MAX_BATCH_BYTES = 2_000_000  # Google's recommended ceiling for one request body
_DEFAULT_PAUSE_S = 1.0  # a rate-limit answer without Retry-After
_MAX_PREFETCH = 1000
_MAX_USERS = 10_000  # per-user buckets kept; the least recently used idle one goes first


def breaker_key(spreadsheet_id: str) -> str:
    """`sheets:<spreadsheetId>`."""
    return f"sheets:{spreadsheet_id}"


@dataclass(frozen=True, slots=True)
class BatchKey:
    """Jobs with equal keys may share one call."""

    mode: Literal["append", "update"]
    spreadsheet_id: str
    range: str  # "" in update mode: a batchUpdate carries each job's range
    user: str  # token_key() of the refresh token, never the token itself


@dataclass(frozen=True, slots=True)
class _Entry:
    job: SheetsJob
    ctx: JobContext


@dataclass(frozen=True, slots=True)
class _Settings:
    """What a reload may change, swapped in one assignment."""

    write_mode: Literal["append", "update"]
    value_input_option: str
    window_s: float
    max_rows: int

    @classmethod
    def from_config(cls, config: SheetsWorkerConfig) -> _Settings:
        return cls(
            config.write_mode,
            config.value_input_option,
            config.batch_window_ms / 1000,
            config.batch_max_rows,
        )


def _oauth_client(config: SheetsWorkerConfig) -> OAuthClient:
    return OAuthClient(config.client_id, config.client_secret, config.token_url)


class _UserBuckets:
    """One token bucket per refresh token (by key), least recently used evicted first."""

    def __init__(self, rate_per_minute: int) -> None:
        self._rate = rate_per_minute
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def get(self, user: str) -> TokenBucket:
        bucket = self._buckets.get(user)
        if bucket is None:
            bucket = self._buckets[user] = TokenBucket(self._rate)
            self._evict()
        self._buckets.move_to_end(user)
        return bucket

    def reconfigure(self, rate_per_minute: int) -> None:
        self._rate = rate_per_minute
        for bucket in self._buckets.values():
            bucket.reconfigure(rate_per_minute)

    def _evict(self) -> None:
        excess = len(self._buckets) - _MAX_USERS
        if excess <= 0:
            return
        for user in [u for u, b in self._buckets.items() if not b.busy][:excess]:
            del self._buckets[user]


class SheetsHandler:
    """Writes `sheets.update` jobs to Google Sheets in batches, within rate limits."""

    kind = "sheets"
    job_type = SheetsJob
    batching = True
    rate_limits = None  # its own token buckets, inside the batching

    def __init__(
        self, config: SheetsWorkerConfig, *, user_agent: str, emit: Emit | None = None
    ) -> None:
        self._settings = _Settings.from_config(config)
        self._user_agent = user_agent
        self._emit = emit
        self._api = SheetsApi(config.api_root_url)
        self._tokens = TokenCache(_oauth_client(config))
        if emit is not None:
            self._tokens.on_refreshed = self._token_refreshed
        self._process_bucket = TokenBucket(config.requests_per_minute)
        self._user_buckets = _UserBuckets(config.requests_per_minute_per_user)
        self._batcher: Batcher[BatchKey, _Entry] = Batcher(
            self._flush,
            window_s=self._settings.window_s,
            max_rows=self._settings.max_rows,
            max_bytes=MAX_BATCH_BYTES,
        )
        self._session: aiohttp.ClientSession | None = None
        self.api_calls = 0  # Sheets requests sent (for tests and the benchmark)

    @property
    def token_refreshes(self) -> int:
        """Requests sent to the OAuth token endpoint."""
        return self._tokens.refreshes

    def _token_refreshed(self, form_id: str, token: AccessToken) -> None:
        """Hand the app a refreshed token (`sheets.token_refreshed`, an event, never logged)."""
        if self._emit is not None:
            self._emit(
                TokenRefreshedEvent(
                    form_id=form_id,
                    access_token=token.value,
                    expiry_date=token.expiry_ms,
                    at=events.now(),
                )
            )

    async def start(self) -> None:
        """Open the shared keep-alive session."""
        if self._session is None:
            # trust_env: the Google endpoints may sit behind the operator's HTTPS proxy.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=100, limit_per_host=0),
                trust_env=True,
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        client = self._tokens.client
        if not client.client_id or not client.client_secret:
            log.warning(
                "workers.sheets.client_id / client_secret are not set: expired access "
                "tokens cannot be refreshed (env GOOGLE_CLIENT_ID, GOOGLE_CLIENT_SECRET)"
            )

    async def aclose(self) -> None:
        """Cancel unsent batches, then close the session."""
        try:
            await self._batcher.aclose()
        finally:
            session, self._session = self._session, None
            if session is not None:
                await session.close()

    def prefetch(self, concurrency: int) -> int:
        """Enough unacked jobs for full batches to form while calls run."""
        return min(max(concurrency * 2, self._settings.max_rows), _MAX_PREFETCH)

    @staticmethod
    def check(config: SheetsWorkerConfig) -> None:
        """Raise :class:`ConfigError` if `config` cannot be used (check-config, start, reload)."""
        _Settings.from_config(config)
        load_discovery(config.api_root_url)

    def prepare(self, config: SheetsWorkerConfig) -> Callable[[], None]:
        """Validate and build a reload's settings and API; the returned call applies them."""
        settings = _Settings.from_config(config)
        api = self._api
        if config.api_root_url != api.api_root_url:
            api = SheetsApi(config.api_root_url)

        def apply() -> None:
            self._settings, self._api = settings, api
            self._tokens.client = _oauth_client(config)
            self._process_bucket.reconfigure(config.requests_per_minute)
            self._user_buckets.reconfigure(config.requests_per_minute_per_user)
            self._batcher.reconfigure(
                window_s=settings.window_s, max_rows=settings.max_rows, max_bytes=MAX_BATCH_BYTES
            )

        return apply

    def reconfigure(self, config: SheetsWorkerConfig) -> None:
        """Apply a reloaded section; raises :class:`ConfigError` and changes nothing if bad."""
        self.prepare(config)()

    def breaker_key(self, job: SheetsJob) -> str:
        """`sheets:<spreadsheetId>`."""
        return breaker_key(job.payload.spreadsheet_id)

    async def handle(self, job: SheetsJob, ctx: JobContext) -> None:
        """Join the job's batch and return once the batch's call wrote its rows."""
        if self._session is None:
            raise RuntimeError("SheetsHandler.start() was not called")
        payload = job.payload
        mode = self._settings.write_mode
        key = BatchKey(
            mode,
            payload.spreadsheet_id,
            payload.range if mode == "append" else "",
            token_key(payload.auth.refresh_token),
        )
        # No await before submit: jobs join their batch in delivery order.
        size = len(msgspec.json.encode(payload.values))
        await self._batcher.submit(key, _Entry(job, ctx), rows=len(payload.values), size=size)

    # --- one batch ---------------------------------------------------------------

    async def _flush(self, key: BatchKey, entries: list[_Entry]) -> list[BaseException | None]:
        """Send one batch; each entry's outcome (None = written)."""
        try:
            await self._call(key, entries)
        except JobFailure as failure:
            if len(entries) > 1 and isinstance(failure, PermanentFailure) and failure.status == 400:
                log.info(
                    "%s rejected a batch of %d jobs with 400; sending them one by one",
                    breaker_key(key.spreadsheet_id),
                    len(entries),
                )
                return [await self._flush_one(key, entry) for entry in entries]
            return [failure, *(copy_failure(failure) for _ in entries[1:])]
        return [None] * len(entries)

    async def _flush_one(self, key: BatchKey, entry: _Entry) -> BaseException | None:
        try:
            await self._call(key, [entry])
        except JobFailure as failure:
            return failure
        return None

    async def _call(self, key: BatchKey, entries: list[_Entry]) -> None:
        """One API call for `entries` (one refresh-and-retry on 401); raises their fate.

        Traced as a client span under the first job's attempt, linked to the others'.
        """
        session = self._session
        if session is None:
            raise RuntimeError("SheetsHandler is closed")
        request = self._build(key, entries)
        with entries[0].ctx.trace.client(
            f"sheets {request.what.partition(' ')[0]}",
            lambda: _span_attributes(request, entries, self._api.api_root_url),
            links=[entry.ctx.trace for entry in entries[1:]],
        ) as span:
            response = await self._call_with_token(key, entries, request, session)
            span.set_attribute("http.response.status_code", response.status)
            judge(response, request)

    async def _call_with_token(
        self,
        key: BatchKey,
        entries: list[_Entry],
        request: ApiRequest,
        session: aiohttp.ClientSession,
    ) -> ApiResponse:
        auth = max((entry.job.payload.auth for entry in entries), key=lambda a: a.expiry_date)
        owner = entries[0].job.metadata.form_id
        slot = entries[0].ctx.slot  # every entry's slot is the same queue limiter
        started = time.monotonic()
        token = await self._tokens.access_token(
            session,
            auth.refresh_token,
            AccessToken(auth.access_token, auth.expiry_date),
            owner=owner,
        )
        response = await self._send(key, request, token, slot)
        if response.status == 401:
            # Google does not count a refused request against a quota: no new bucket tokens.
            token = await self._tokens.replace(session, auth.refresh_token, token, owner=owner)
            response = await self._send(key, request, token, slot, rate_limited=False)
        log.debug(
            "%s: %d jobs, %d rows -> HTTP %d in %.0f ms",
            request.what,
            len(entries),
            sum(len(entry.job.payload.values) for entry in entries),
            response.status,
            (time.monotonic() - started) * 1000,
        )
        self._pause_if_asked(key, response)
        return response

    def _build(self, key: BatchKey, entries: list[_Entry]) -> ApiRequest:
        option = self._settings.value_input_option
        if key.mode == "append":
            rows = [row for entry in entries for row in entry.job.payload.values]
            return self._api.append(key.spreadsheet_id, key.range, rows, option)
        data = [(entry.job.payload.range, entry.job.payload.values) for entry in entries]
        return self._api.batch_update(key.spreadsheet_id, data, option)

    async def _send(
        self,
        key: BatchKey,
        request: ApiRequest,
        token: AccessToken,
        slot: contextlib.AbstractAsyncContextManager[None],
        *,
        rate_limited: bool = True,
    ) -> ApiResponse:
        """Wait for both rate limits (no slot held), then send within the queue's slot."""
        if rate_limited:
            await self._user_buckets.get(key.user).acquire()
            await self._process_bucket.acquire()
        async with slot:
            session = self._session
            if session is None:
                raise RuntimeError("SheetsHandler is closed")
            self.api_calls += 1
            return await send(session, request, token, user_agent=self._user_agent)

    def _pause_if_asked(self, key: BatchKey, response: ApiResponse) -> None:
        """Pause the buckets for `Retry-After` (or a second after a bare rate-limit answer).

        The user's bucket always; the process's bucket too for a 5xx or for a
        limit that is not per user (a per-project quota is shared by everyone).
        """
        limited = rate_limited(response)
        if not limited and response.status < 500:
            return
        pause = response.retry_after
        if pause is None and limited:
            pause = _DEFAULT_PAUSE_S
        if pause is None or pause <= 0:
            return
        self._user_buckets.get(key.user).pause(pause)
        if response.status >= 500 or not per_user_limit(response):
            self._process_bucket.pause(pause)
        log.info(
            "%s: HTTP %d, pausing %s requests for %.1f s",
            breaker_key(key.spreadsheet_id),
            response.status,
            "this user's" if response.status < 500 and per_user_limit(response) else "all",
            pause,
        )


def _span_attributes(
    request: ApiRequest, entries: list[_Entry], api_root_url: str
) -> dict[str, str | int]:
    """The API call's span attributes: what it does and for how many jobs (no token)."""
    return {
        "http.request.method": request.method,
        "server.address": urlsplit(api_root_url).hostname or "",
        "formcraftd.sheets.call": request.what,
        "formcraftd.sheets.jobs": len(entries),
    }


if TYPE_CHECKING:

    def _conforms(handler: SheetsHandler) -> Handler[SheetsJob]:
        return handler
