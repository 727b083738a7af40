"""The Sheets v4 calls the worker makes, built by aiogoogle from the packaged discovery document.

aiogoogle turns the discovery document into requests (URL templates, path
escaping, query parameters). The document ships in the package, trimmed to
``spreadsheets.values.append`` and ``spreadsheets.values.batchUpdate``, and its
``rootUrl`` is replaced by `api_root_url`, so nothing is fetched at start and
tests can point the worker at a local fake. The requests are sent over the
worker's own keep-alive aiohttp session, so 401s, 429s and ``Retry-After``
are seen and handled here rather than inside a client library.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import msgspec
from aiogoogle.resource import GoogleAPI
from yarl import URL

from formcraftd.core.errors import ConfigError, PermanentFailure, RetryCode, RetryLater
from formcraftd.core.redaction import redact
from formcraftd.core.retry import parse_retry_after
from formcraftd.core.streams import read_at_most
from formcraftd.core.text import one_line
from formcraftd.workers.sheets.google_auth import (
    AccessToken,
    describe_transport_error,
)

__all__ = ["ApiRequest", "ApiResponse", "SheetsApi", "judge", "load_discovery", "send"]

_TIMEOUT_S = 30.0
_MAX_RESPONSE_BYTES = 65_536
# 408/409 (ABORTED) and 425 are transient; Google asks clients to retry them with backoff.
_RETRYABLE = frozenset({408, 409, 425, 429})
_RATE_LIMITED = re.compile(r"rate_?limit_?exceeded|RESOURCE_EXHAUSTED", re.IGNORECASE)


@cache
def _packaged_discovery() -> str:
    return (
        resources.files("formcraftd.workers.sheets")
        .joinpath("discovery", "sheets.v4.json")
        .read_text(encoding="utf-8")
    )


def load_discovery(api_root_url: str) -> dict[str, Any]:
    """The packaged Sheets v4 discovery document, rooted at `api_root_url`."""
    parts = urlsplit(api_root_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(
            f"workers.sheets.api_root_url: expected an absolute http(s) URL, got {api_root_url!r}"
        )
    document: dict[str, Any] = json.loads(_packaged_discovery())
    root = api_root_url if api_root_url.endswith("/") else api_root_url + "/"
    document["rootUrl"] = document["mtlsRootUrl"] = root
    document["baseUrl"] = root + document["servicePath"]
    return document


@dataclass(frozen=True, slots=True)
class ApiRequest:
    """One Sheets call, ready to send (without its Authorization header)."""

    method: str
    url: str
    body: bytes
    what: str  # for reasons and logs: "values.append on <spreadsheetId>"


@dataclass(frozen=True, slots=True)
class ApiResponse:
    """What the worker needs of an answer."""

    status: int
    retry_after: float | None
    error_status: str  # Google's error status, e.g. NOT_FOUND ("" if none)
    error_message: str  # one line, capped, with the token masked


class SheetsApi:
    """Builds ``values.append`` and ``values.batchUpdate`` requests with aiogoogle."""

    def __init__(self, api_root_url: str) -> None:
        self.api_root_url = api_root_url
        # GoogleAPI edits the dict it is given: each instance parses its own.
        api = GoogleAPI(load_discovery(api_root_url))  # type: ignore[no-untyped-call]
        self._values: Any = api.spreadsheets.values

    def append(
        self, spreadsheet_id: str, range_: str, rows: list[list[Any]], value_input_option: str
    ) -> ApiRequest:
        """``values.append`` of `rows` after the table in `range_`, inserting new rows."""
        request = self._values.append(
            spreadsheetId=spreadsheet_id,
            range=range_,
            valueInputOption=value_input_option,
            insertDataOption="INSERT_ROWS",
            json={"majorDimension": "ROWS", "values": rows},
            path_params_safe_chars={"spreadsheetId": "", "range": ""},
        )
        return _finish(request, f"values.append on {spreadsheet_id}")

    def batch_update(
        self,
        spreadsheet_id: str,
        data: list[tuple[str, list[list[Any]]]],
        value_input_option: str,
    ) -> ApiRequest:
        """``values.batchUpdate`` writing each (range, rows) of `data`, in order."""
        body = {
            "valueInputOption": value_input_option,
            "data": [
                {"range": range_, "majorDimension": "ROWS", "values": rows} for range_, rows in data
            ],
        }
        request = self._values.batchUpdate(
            spreadsheetId=spreadsheet_id,
            json=body,
            path_params_safe_chars={"spreadsheetId": ""},
        )
        return _finish(request, f"values.batchUpdate on {spreadsheet_id}")


def _finish(request: Any, what: str) -> ApiRequest:
    return ApiRequest(
        method=str(request.method),
        url=str(request.url),
        body=msgspec.json.encode(request.json),
        what=what,
    )


async def send(
    session: aiohttp.ClientSession, request: ApiRequest, token: AccessToken, *, user_agent: str
) -> ApiResponse:
    """Send one call; network errors and timeouts raise :class:`RetryLater`."""
    headers = {
        "Authorization": f"Bearer {token.value}",
        "Content-Type": "application/json",
        "User-Agent": user_agent,
    }
    try:
        async with session.request(
            request.method,
            URL(request.url, encoded=True),
            data=request.body,
            headers=headers,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=_TIMEOUT_S),
        ) as resp:
            # Read even a success's (small) body, so the connection can be kept alive.
            body = await read_at_most(resp.content, _MAX_RESPONSE_BYTES)
            retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            status = resp.status
    except TimeoutError:
        raise RetryLater(
            "SHEETS_CONNECTION", f"{request.what}: no answer within {_TIMEOUT_S:.0f} s"
        ) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise RetryLater(
            "SHEETS_CONNECTION", f"{request.what}: {describe_transport_error(exc)}"
        ) from None
    if 200 <= status < 300:
        return ApiResponse(status, retry_after, "", "")
    error_status, message = _google_error(body, token.value)
    return ApiResponse(status, retry_after, error_status, message)


class _Error(msgspec.Struct):
    status: str = ""
    message: str = ""


class _ErrorBody(msgspec.Struct):
    error: _Error | str = ""


def _google_error(body: bytes, secret: str) -> tuple[str, str]:
    """Google's error status and message from an error body, masked and on one line.

    Whatever its shape, what comes back has the access token we sent replaced
    and the rest redacted: an error body may echo the request.
    """
    if not body:
        return "", ""
    try:
        error = msgspec.json.decode(body, type=_ErrorBody).error
    except msgspec.MsgspecError:
        return "", _masked(body.decode("utf-8", errors="replace"), secret)
    if isinstance(error, str):
        return "", _masked(error, secret)
    return _masked(error.status, secret)[:64], _masked(error.message, secret)


def _masked(text: str, secret: str) -> str:
    return one_line(redact(text.replace(secret, "[redacted]") if secret else text))


def judge(response: ApiResponse, request: ApiRequest) -> None:
    """Return on 2xx; otherwise raise the fate of every job in the call.

    401 is the caller's to handle (refresh and retry once) before this is called.
    """
    status = response.status
    if 200 <= status < 300:
        return
    reason = f"{request.what}: HTTP {status}"
    if response.error_status:
        reason += f" {response.error_status}"
    if response.error_message:
        reason += f": {response.error_message}"
    if status in _RETRYABLE or status >= 500 or rate_limited(response):
        code: RetryCode = "SHEETS_RATE_LIMITED" if rate_limited(response) else "SHEETS_UNAVAILABLE"
        raise RetryLater(code, reason, after=response.retry_after, status=status)
    if status == 401:
        raise PermanentFailure(
            "AUTH_REVOKED", f"{reason} (even with a fresh access token)", status=status
        )
    raise PermanentFailure("SHEETS_REQUEST_REJECTED", reason, status=status)


def rate_limited(response: ApiResponse) -> bool:
    """A 429, or a 403 that Google uses for a rate or quota limit."""
    if response.status == 429:
        return True
    text = f"{response.error_status} {response.error_message}"
    return response.status == 403 and bool(_RATE_LIMITED.search(text))


def per_user_limit(response: ApiResponse) -> bool:
    """Whether a rate-limit answer names a per-user quota (so other users may go on)."""
    return "peruser" in response.error_message.replace(" ", "").lower()
