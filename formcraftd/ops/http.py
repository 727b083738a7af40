"""The embedded HTTP server: health, metrics, the status page and the admin API.

It runs inside the daemon's event loop with `AppRunner(handle_signals=False)`:
the daemon, not aiohttp, owns the signals. `/admin/*` needs
`Authorization: Bearer <http.admin_token>` (compared in constant time): 401
without credentials, 403 with wrong ones, and 403 for everyone while no token
is configured.
"""

from __future__ import annotations

import hmac
import os
from importlib import resources
from typing import Any, Protocol

from aiohttp import web

from formcraftd.amqp.dead_letters import ReplayFilter, parse_when
from formcraftd.core.bounces import BounceIntake
from formcraftd.core.errors import FormcraftError
from formcraftd.ops import bounce_webhooks
from formcraftd.ops.metrics import CONTENT_TYPE


class UnknownQueue(FormcraftError):
    """An admin request named a queue this daemon does not consume."""


class Unavailable(FormcraftError):
    """An admin request needs a part of the daemon that is not running (the email worker)."""


class CannotListen(FormcraftError):
    """The HTTP server could not bind its address (in use, not local, no permission)."""


class Control(Protocol):
    """What the HTTP server asks of the daemon."""

    def health(self) -> tuple[bool, dict[str, Any]]: ...

    def ready(self) -> tuple[bool, dict[str, Any]]: ...

    def render_metrics(self) -> bytes: ...

    def status(self) -> dict[str, Any]: ...

    def admin_token(self) -> str: ...

    async def reload(self) -> dict[str, Any]: ...

    async def pause(self, queue: str) -> dict[str, Any]: ...

    async def resume(self, queue: str) -> dict[str, Any]: ...

    async def dlq_peek(self, queue: str, limit: int) -> list[dict[str, Any]]: ...

    async def dlq_replay(
        self,
        queue: str,
        limit: int | None,
        *,
        only: ReplayFilter | None = None,
        dry_run: bool = False,
    ) -> dict[str, Any]: ...

    def breaker_reset(self, key: str) -> bool: ...

    def bounce_intake(self) -> BounceIntake | None:
        """The bounce policy, its counts and current settings; None when bounces are off."""
        ...

    async def suppression_entries(self, reason: str | None) -> list[dict[str, Any]]:
        """The suppression list (raise Unavailable without the email worker)."""
        ...

    async def suppression_remove(self, address: str) -> bool:
        """Take an address off the list; raise ValueError for an invalid one."""
        ...


CONTROL_KEY = web.AppKey("control", Control)
MAILGUN_KEY = web.AppKey("mailgun_verifier", bounce_webhooks.MailgunVerifier)
PAGE_KEY = web.AppKey("status_page", bytes)
MAX_PEEK = 1000


def _control(request: web.Request) -> Control:
    return request.app[CONTROL_KEY]


def _limit(request: web.Request, default: int | None) -> int | None:
    raw = request.query.get("limit")
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(text="limit must be a whole number") from None
    if value < 1:
        raise web.HTTPBadRequest(text="limit must be at least 1")
    return value


@web.middleware
async def admin_auth(request: web.Request, handler: Any) -> web.StreamResponse:
    """Guard `/admin/*` with the bearer token; constant-time comparison.

    Every error under `/admin` is a JSON `{"error": ...}` body, aiohttp's own
    404, 405 (its Allow header kept) and 400 included.
    """
    if request.path.startswith("/admin/") or request.path == "/admin":
        token = _control(request).admin_token()
        if not token:
            return web.json_response(
                {"error": "the admin API is disabled: set http.admin_token"}, status=403
            )
        given = request.headers.get("Authorization", "")
        if not given.startswith("Bearer "):
            return web.json_response(
                {"error": "missing bearer token"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="formcraftd"'},
            )
        if not hmac.compare_digest(given[len("Bearer ") :].encode(), token.encode()):
            return web.json_response({"error": "wrong token"}, status=403)
        try:
            response: web.StreamResponse = await handler(request)
        except (UnknownQueue, Unavailable) as exc:
            return web.json_response({"error": str(exc)}, status=404)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _json_error(request, exc)
        return response
    served: web.StreamResponse = await handler(request)
    return served


def _json_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    """aiohttp's plain-text error as the admin API's JSON body, same status and Allow."""
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        message = f"{request.method} is not allowed on {request.path}; allowed: {allowed}"
    elif exc.text and exc.text != f"{exc.status}: {exc.reason}":  # a message of ours
        message = exc.text
    elif isinstance(exc, web.HTTPNotFound):
        message = f"no admin endpoint {request.path}"
    else:
        message = exc.reason
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    return web.json_response({"error": message}, status=exc.status, headers=headers)


async def healthz(request: web.Request) -> web.Response:
    healthy, body = _control(request).health()
    return web.json_response(body, status=200 if healthy else 503)


async def readyz(request: web.Request) -> web.Response:
    ready, body = _control(request).ready()
    return web.json_response(body, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    body = _control(request).render_metrics()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def status_page(request: web.Request) -> web.Response:
    return web.Response(body=request.app[PAGE_KEY], content_type="text/html", charset="utf-8")


async def status_json(request: web.Request) -> web.Response:
    return web.json_response(_control(request).status())


async def admin_reload(request: web.Request) -> web.Response:
    result = await _control(request).reload()
    return web.json_response(result, status=200 if result["result"] == "success" else 422)


async def admin_pause(request: web.Request) -> web.Response:
    return web.json_response(await _control(request).pause(request.match_info["queue"]))


async def admin_resume(request: web.Request) -> web.Response:
    return web.json_response(await _control(request).resume(request.match_info["queue"]))


async def admin_dlq_peek(request: web.Request) -> web.Response:
    limit = min(_limit(request, 10) or 10, MAX_PEEK)
    letters = await _control(request).dlq_peek(request.match_info["queue"], limit)
    return web.json_response({"queue": request.match_info["queue"], "dead_letters": letters})


async def admin_dlq_replay(request: web.Request) -> web.Response:
    """Replay dead letters; `since`, `until`, `error_code`, `host`, `form_id`,
    `dry_run` in the query string select them as `formcraftd dlq replay` does."""
    query = request.query
    try:
        only = ReplayFilter(
            since=parse_when(query["since"]) if "since" in query else None,
            until=parse_when(query["until"]) if "until" in query else None,
            error_code=query.get("error_code"),
            host=query.get("host"),
            form_id=query.get("form_id"),
        )
    except ValueError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    dry_run = query.get("dry_run", "").lower() in ("1", "true", "yes")
    result = await _control(request).dlq_replay(
        request.match_info["queue"], _limit(request, None), only=only, dry_run=dry_run
    )
    return web.json_response(result)


async def admin_breaker_reset(request: web.Request) -> web.Response:
    key = request.match_info["key"]
    if not _control(request).breaker_reset(key):
        return web.json_response({"error": f"no breaker {key!r}"}, status=404)
    return web.json_response({"breaker": key, "state": "closed"})


async def admin_suppression_list(request: web.Request) -> web.Response:
    """The suppressed addresses in force; `reason` (hard_bounce, soft_bounce, complaint,
    manual) selects one kind, `limit` caps the answer."""
    reason = request.query.get("reason") or None
    if reason is not None and reason not in SUPPRESSION_REASONS:
        raise web.HTTPBadRequest(text=f"reason must be one of: {', '.join(SUPPRESSION_REASONS)}")
    entries = await _control(request).suppression_entries(reason)
    limit = _limit(request, None)
    shown = entries if limit is None else entries[:limit]
    return web.json_response({"count": len(entries), "entries": shown})


async def admin_suppression_remove(request: web.Request) -> web.Response:
    address = request.match_info["address"]
    try:
        removed = await _control(request).suppression_remove(address)
    except ValueError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    if not removed:
        return web.json_response({"error": "not on the suppression list"}, status=404)
    return web.json_response({"address": address.strip().casefold(), "removed": True})


SUPPRESSION_REASONS = ("hard_bounce", "soft_bounce", "complaint", "manual")


def _intake(request: web.Request, configured: str) -> BounceIntake:
    """The bounce intake when this provider's endpoint is configured; else 404."""
    intake = _control(request).bounce_intake()
    if intake is None or not getattr(intake.config, configured):
        raise web.HTTPNotFound(text="this bounce webhook is not configured")
    return intake


async def bounces_mailgun(request: web.Request) -> web.Response:
    intake = _intake(request, "mailgun_signing_key")
    payload = await bounce_webhooks.read_json(request)
    signature = payload.get("signature") if isinstance(payload, dict) else None
    config = intake.config
    why = request.app[MAILGUN_KEY].check(
        config.mailgun_signing_key, signature, config.mailgun_max_age_s
    )
    if why is not None:
        return bounce_webhooks.refuse(intake, "mailgun", why, request)
    event = payload.get("event-data")
    return await bounce_webhooks.take(intake, bounce_webhooks.mailgun_report(event))


async def bounces_postmark(request: web.Request) -> web.Response:
    intake = _intake(request, "postmark_password")
    config = intake.config
    if not bounce_webhooks.postmark_authorized(
        request, config.postmark_username, config.postmark_password
    ):
        return bounce_webhooks.refuse(intake, "postmark", "wrong or missing credentials", request)
    payload = await bounce_webhooks.read_json(request)
    return await bounce_webhooks.take(intake, bounce_webhooks.postmark_report(payload))


def build_app(control: Control) -> web.Application:
    app = web.Application(middlewares=[admin_auth])
    app[CONTROL_KEY] = control
    app[MAILGUN_KEY] = bounce_webhooks.MailgunVerifier()
    app[PAGE_KEY] = resources.files("formcraftd.ops").joinpath("static/status.html").read_bytes()
    router = app.router
    router.add_get("/", status_page)
    router.add_get("/status.json", status_json)
    router.add_get("/healthz", healthz)
    router.add_get("/readyz", readyz)
    router.add_get("/metrics", metrics)
    router.add_get("/admin/status", status_json)
    router.add_post("/admin/reload", admin_reload)
    router.add_post("/admin/queues/{queue}/pause", admin_pause)
    router.add_post("/admin/queues/{queue}/resume", admin_resume)
    router.add_get("/admin/dlq/{queue}", admin_dlq_peek)
    router.add_post("/admin/dlq/{queue}/replay", admin_dlq_replay)
    router.add_post("/admin/breakers/{key}/reset", admin_breaker_reset)
    router.add_get("/admin/suppression", admin_suppression_list)
    router.add_delete("/admin/suppression/{address}", admin_suppression_remove)
    router.add_post("/bounces/mailgun", bounces_mailgun)
    router.add_post("/bounces/postmark", bounces_postmark)
    return app


async def start_server(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Start serving `app` on host:port; the caller must `await runner.cleanup()`.

    A bind failure is :class:`CannotListen`, one line naming the address.
    """
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise CannotListen(f"cannot listen on {_address(host, port)}: {_reason(exc)}") from None
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reason(exc: OSError) -> str:
    """`address already in use`, from the errno rather than the event loop's wording."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return reason[:1].lower() + reason[1:]


def bound_port(runner: web.AppRunner) -> int:
    """The port the server listens on (useful when configured as 0)."""
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    raise RuntimeError("the HTTP server is not listening")
