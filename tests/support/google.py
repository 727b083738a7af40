"""A fake Google for the Sheets worker: the OAuth token endpoint and Sheets v4 values calls.

It is a real aiohttp server on 127.0.0.1 that behaves like Google where the
worker can tell: the token endpoint implements the ``refresh_token`` grant
(``invalid_client``, ``invalid_grant``); the Sheets endpoints check the Bearer
token (unknown or expired: 401 UNAUTHENTICATED), know which spreadsheets exist
(unknown: 404 NOT_FOUND), validate the request (a row holding the string
"bad" is refused with 400 INVALID_ARGUMENT) and record every call. Tests script
failures: a queue of answers for the next calls (429 with Retry-After, 500,
...), a failure for every call, token endpoint failures, a slow token endpoint,
a latency for every Sheets call.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import orjson
from aiohttp import web

CLIENT_ID = "1234567890-fake.apps.googleusercontent.com"
CLIENT_SECRET = "GOCSPX-fake-client-secret"


@dataclass
class SheetsCall:
    """One Sheets request the fake received, and how it answered."""

    method: str  # "append" or "batchUpdate"
    spreadsheet_id: str
    range: str  # the URL's range for append; "" for batchUpdate
    rows: list[list[Any]]  # every row of the call, in order
    data: list[tuple[str, list[list[Any]]]]  # batchUpdate: (range, rows) per entry
    token: str
    query: dict[str, str]
    status: int
    client_port: int = 0  # the caller's TCP port: equal ports mean a reused connection
    at: float = field(default_factory=time.monotonic)


@dataclass
class TokenGrant:
    """One request to the token endpoint."""

    refresh_token: str
    status: int
    at: float = field(default_factory=time.monotonic)


@dataclass
class Failure:
    """A scripted error answer."""

    status: int
    retry_after: str | None = None
    message: str = "scripted failure"
    error_status: str = "INTERNAL"
    bare: bool = False  # answer {"error": message}, a string, as some Google endpoints do


class FakeGoogle:
    """The fake; `await FakeGoogle().start()`, then point the worker at `api_root_url`."""

    def __init__(self, *, token_lifetime_s: int = 3599) -> None:
        self.token_lifetime_s = token_lifetime_s
        self.spreadsheets: dict[str, dict[str, list[list[Any]]]] = {}
        self.refresh_tokens: set[str] = set()
        self.access_tokens: dict[str, float] = {}  # token -> expiry (time.time())
        self.calls: list[SheetsCall] = []
        self.grants: list[TokenGrant] = []
        self.script: deque[Failure] = deque()  # answers for the next Sheets calls
        self.always: Failure | None = None  # an answer for every Sheets call
        self.latency_s = 0.0  # added to every Sheets call
        self.token_delay_s = 0.0  # added to every token request
        self.token_failures: deque[Failure] = deque()
        self._serial = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._changed = asyncio.Condition()
        self.port = 0

    # --- setup ------------------------------------------------------------------

    @property
    def api_root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def token_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def sheets_config(self, **overrides: Any) -> dict[str, Any]:
        """A `[workers.sheets]` section that talks to this fake."""
        return {
            "enabled": True,
            "api_root_url": self.api_root_url,
            "token_url": self.token_url,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            **overrides,
        }

    def add_spreadsheet(self, spreadsheet_id: str) -> None:
        self.spreadsheets.setdefault(spreadsheet_id, {})

    def add_user(self, *, lifetime_s: float = 3599) -> tuple[str, str, int]:
        """A new refresh token and a valid access token: (refresh, access, expiry ms)."""
        refresh = f"1//fake-refresh-{secrets.token_urlsafe(12)}"
        self.refresh_tokens.add(refresh)
        access, expiry = self.issue(lifetime_s)
        return refresh, access, expiry

    def issue(self, lifetime_s: float) -> tuple[str, int]:
        """A new access token valid for `lifetime_s`: (token, expiry ms since the epoch)."""
        token = f"ya29.fake-{next(self._serial)}-{secrets.token_urlsafe(16)}"
        expiry = time.time() + lifetime_s
        self.access_tokens[token] = expiry
        return token, int(expiry * 1000)

    def revoke(self, refresh_token: str) -> None:
        self.refresh_tokens.discard(refresh_token)

    def rows(self, spreadsheet_id: str, range_: str) -> list[list[Any]]:
        return self.spreadsheets.get(spreadsheet_id, {}).get(range_, [])

    def succeeded(self) -> list[SheetsCall]:
        return [call for call in self.calls if call.status == 200]

    # --- lifecycle --------------------------------------------------------------

    async def start(self) -> FakeGoogle:
        app = web.Application()
        app.router.add_post("/token", self._token)
        app.router.add_post("/v4/spreadsheets/{tail:.*}", self._sheets)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def wait_for(self, predicate: Any, timeout: float = 15.0) -> None:
        """Wait until `predicate(self)` holds (checked after every request)."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: predicate(self))

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # --- the token endpoint ----------------------------------------------------

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        refresh = str(form.get("refresh_token", ""))
        if self.token_delay_s:
            await asyncio.sleep(self.token_delay_s)
        response = self._grant(form, refresh)
        self.grants.append(TokenGrant(refresh, response.status))
        await self._notify()
        return response

    def _grant(self, form: Any, refresh: str) -> web.Response:
        if self.token_failures:
            failure = self.token_failures.popleft()
            return _json({"error": failure.error_status}, failure.status, failure.retry_after)
        if form.get("grant_type") != "refresh_token" or not refresh:
            return _json({"error": "invalid_request"}, 400)
        if form.get("client_id") != CLIENT_ID or form.get("client_secret") != CLIENT_SECRET:
            return _json({"error": "invalid_client", "error_description": "Unauthorized"}, 401)
        if refresh not in self.refresh_tokens:
            return _json(
                {
                    "error": "invalid_grant",
                    "error_description": "Token has been expired or revoked.",
                },
                400,
            )
        token, _ = self.issue(self.token_lifetime_s)
        return _json(
            {
                "access_token": token,
                "expires_in": self.token_lifetime_s,
                "scope": "https://www.googleapis.com/auth/spreadsheets",
                "token_type": "Bearer",
            },
            200,
        )

    # --- the Sheets endpoints --------------------------------------------------

    async def _sheets(self, request: web.Request) -> web.Response:
        token = _bearer(request)
        parsed = _route(request.rel_url.raw_path)
        body = await request.read()
        call = SheetsCall(
            method=parsed[0] if parsed else "unknown",
            spreadsheet_id=parsed[1] if parsed else "",
            range=parsed[2] if parsed else "",
            rows=[],
            data=[],
            token=token,
            query=dict(request.query),
            status=0,
            client_port=_peer_port(request),
        )
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        response = self._answer(call, parsed, body)
        call.status = response.status
        self.calls.append(call)
        await self._notify()
        return response

    def _answer(
        self, call: SheetsCall, parsed: tuple[str, str, str] | None, body: bytes
    ) -> web.Response:
        expiry = self.access_tokens.get(call.token)
        if expiry is None or expiry <= time.time():
            return _google_error(
                401, "UNAUTHENTICATED", "Request had invalid authentication credentials."
            )
        if parsed is None:
            return _google_error(404, "NOT_FOUND", "Method not found.")
        failure = self.script.popleft() if self.script else self.always
        if failure is not None and failure.bare:
            return _json({"error": failure.message}, failure.status, failure.retry_after)
        if failure is not None:
            return _google_error(
                failure.status, failure.error_status, failure.message, failure.retry_after
            )
        if call.spreadsheet_id not in self.spreadsheets:
            return _google_error(404, "NOT_FOUND", "Requested entity was not found.")
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _google_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
        if call.method == "append":
            return self._append(call, document)
        return self._batch_update(call, document)

    def _append(self, call: SheetsCall, document: Any) -> web.Response:
        option = call.query.get("valueInputOption")
        if option not in ("RAW", "USER_ENTERED"):
            return _google_error(400, "INVALID_ARGUMENT", "Invalid valueInputOption")
        rows: Any = document.get("values") if isinstance(document, dict) else None
        if not _is_rows(rows) or any("bad" in row for row in rows):
            return _google_error(400, "INVALID_ARGUMENT", "Invalid values")
        call.rows = rows
        self.spreadsheets[call.spreadsheet_id].setdefault(call.range, []).extend(rows)
        updates = {
            "spreadsheetId": call.spreadsheet_id,
            "updatedRange": call.range,
            "updatedRows": len(rows),
            "updatedCells": sum(len(row) for row in rows),
        }
        return _json({"spreadsheetId": call.spreadsheet_id, "updates": updates}, 200)

    def _batch_update(self, call: SheetsCall, document: Any) -> web.Response:
        if not isinstance(document, dict) or document.get("valueInputOption") not in (
            "RAW",
            "USER_ENTERED",
        ):
            return _google_error(400, "INVALID_ARGUMENT", "Invalid valueInputOption")
        data = document.get("data")
        if not isinstance(data, list) or not all(
            isinstance(item, dict)
            and isinstance(item.get("range"), str)
            and _is_rows(item.get("values"))
            for item in data
        ):
            return _google_error(400, "INVALID_ARGUMENT", "Invalid data")
        sheet = self.spreadsheets[call.spreadsheet_id]
        for item in data:
            call.data.append((item["range"], item["values"]))
            call.rows.extend(item["values"])
            sheet[item["range"]] = item["values"]
        return _json(
            {
                "spreadsheetId": call.spreadsheet_id,
                "totalUpdatedRows": len(call.rows),
                "responses": [{"updatedRange": r} for r, _ in call.data],
            },
            200,
        )


def _route(raw_path: str) -> tuple[str, str, str] | None:
    """(method, spreadsheetId, range) from the raw (still escaped) path; None if unknown.

    Like Google's router, an unescaped `/` in a range makes the path unknown.
    """
    parts = raw_path.split("/")  # "", "v4", "spreadsheets", id, ...
    if len(parts) == 5 and parts[4] == "values:batchUpdate":
        return "batchUpdate", unquote(parts[3]), ""
    if len(parts) == 6 and parts[4] == "values" and parts[5].endswith(":append"):
        return "append", unquote(parts[3]), unquote(parts[5].removesuffix(":append"))
    return None


def _peer_port(request: web.Request) -> int:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return int(peer[1]) if peer else 0


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    return header.removeprefix("Bearer ") if header.startswith("Bearer ") else ""


def _is_rows(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(row, list) for row in value)


def _json(document: Any, status: int, retry_after: str | None = None) -> web.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return web.Response(
        body=orjson.dumps(document), status=status, content_type="application/json", headers=headers
    )


def _google_error(
    status: int, error_status: str, message: str, retry_after: str | None = None
) -> web.Response:
    return _json(
        {"error": {"code": status, "message": message, "status": error_status}}, status, retry_after
    )


def sheets_job_body(
    *,
    refresh_token: str,
    access_token: str = "",
    expiry_ms: int = 0,
    spreadsheet_id: str = "sheet-1",
    range_: str = "Sheet1!A:C",
    values: list[list[Any]] | None = None,
    form_id: str = "form-1",
    submission_id: str = "sub-1",
) -> bytes:
    """A `sheets.update` job as the FormCraft app publishes it."""
    job = {
        "type": "sheets.update",
        "payload": {
            "spreadsheetId": spreadsheet_id,
            "range": range_,
            "values": values if values is not None else [["a", 1]],
            "auth": {
                "access_token": access_token,
                "refresh_token": refresh_token,
                "expiry_date": expiry_ms,
            },
        },
        "metadata": {"formId": form_id, "submissionId": submission_id},
    }
    return orjson.dumps(job)
