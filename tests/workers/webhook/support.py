"""What the webhook tests share: a recording receiver on loopback, jobs and contexts."""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from formcraftd.core.config import WebhookWorkerConfig
from formcraftd.core.handler import JobContext
from formcraftd.core.jobs import Metadata, WebhookJob, WebhookPayload
from formcraftd.workers.webhook import WebhookHandler

USER_AGENT = "formcraftd/9.9.9"
WHSEC_KEY = b"0123456789abcdef0123456789abcdef"
WHSEC = "whsec_" + base64.b64encode(WHSEC_KEY).decode()
LOOPBACK_ONLY = ("127.0.0.1/32",)

Behaviour = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Seen:
    """One request as the receiver saw it."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


async def answer_200(_request: web.Request) -> web.StreamResponse:
    return web.Response(text="ok")


@dataclass
class Receiver:
    """A real aiohttp server on 127.0.0.1 that records requests and answers with `behaviour`."""

    port: int = 0
    behaviour: Behaviour = answer_200
    seen: list[Seen] = field(default_factory=list)

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(
            Seen(request.method, request.path, request.query_string, dict(request.headers), body)
        )
        return await self.behaviour(request)


async def started_handler(config: WebhookWorkerConfig) -> WebhookHandler:
    """A started handler with `config`; the caller closes it."""
    handler = WebhookHandler(config, user_agent=USER_AGENT)
    await handler.start()
    return handler


def job(
    url: str,
    *,
    body: Any = None,
    secret: str | list[str] = "",
    headers: dict[str, str] | None = None,
    method: str = "POST",
) -> WebhookJob:
    payload = WebhookPayload(
        url=url,
        method=method,  # type: ignore[arg-type]
        headers=headers or {},
        body=body,
        secret=secret,
    )
    return WebhookJob(payload=payload, metadata=Metadata(form_id="f1", submission_id="s1"))


def ctx(job_id: str = "job-1", attempt: int = 1) -> JobContext:
    return JobContext(job_id=job_id, attempt=attempt, queue="webhook_tasks")
