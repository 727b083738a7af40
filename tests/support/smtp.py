"""Real SMTP servers for the email tests: aiosmtpd on 127.0.0.1, in the test's event loop.

A :class:`SmtpServer` records every message it accepts and can be scripted:
per-recipient replies (``550``, ``452``, ...), replies to MAIL or DATA, a
connection dropped at DATA, STARTTLS with a self-signed certificate, AUTH.
Below the servers: the `email.send` jobs the tests give them, as published
and as the email handler gets them.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import shlex
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from formcraftd.core import jobs
from formcraftd.core.errors import PermanentFailure
from formcraftd.core.handler import JobContext
from formcraftd.core.jobs import EmailJob
from formcraftd.workers.email.handler import EmailHandler

USERNAME = "formcraft"
PASSWORD = "s3cret-smtp-password"


@dataclass
class Received:
    """One message the server accepted."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: bool

    @property
    def message(self) -> EmailMessage:
        data = self.data.replace(b"\r\n", b"\n")
        parsed = email.message_from_bytes(data, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


@dataclass
class Script:
    """What the server answers besides 250; replies are used up in order (the last stays)."""

    rcpt: dict[str, list[str]] = field(default_factory=dict)
    mail: list[str] = field(default_factory=list)
    data: list[str] = field(default_factory=list)
    drop_at_data: int = 0  # close the connection instead of answering DATA this many times

    @staticmethod
    def take(replies: list[str]) -> str | None:
        if not replies:
            return None
        return replies.pop(0) if len(replies) > 1 else replies[0]


class _Handler:
    def __init__(self, server: SmtpServer) -> None:
        self.server = server

    async def handle_MAIL(
        self, _smtp: SMTP, _session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.server.mail_commands += 1
        reply = Script.take(self.server.script.mail)
        if reply is not None and not reply.startswith("2"):
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, _smtp: SMTP, _session: Session, envelope: Envelope, address: str, _options: list[str]
    ) -> str:
        self.server.rcpt_commands.append(address)
        reply = Script.take(self.server.script.rcpt.get(address.lower(), []))
        if reply is not None and not reply.startswith("2"):
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, smtp: SMTP, session: Session, envelope: Envelope) -> str:
        script = self.server.script
        if script.drop_at_data:
            script.drop_at_data -= 1
            assert smtp.transport is not None
            smtp.transport.abort()
            return "421 dropped"  # never reaches the client
        reply = Script.take(script.data)
        if reply is not None:
            return reply
        assert isinstance(envelope.content, bytes)
        self.server.received.append(
            Received(
                str(envelope.mail_from),
                list(envelope.rcpt_tos),
                envelope.content,
                session.ssl is not None,
            )
        )
        async with self.server.changed:
            self.server.changed.notify_all()
        return "250 Message accepted"


class _RecordingSMTP(SMTP):
    """aiosmtpd's protocol, keeping track of open connections so a test can drop them."""

    def __init__(self, server: SmtpServer, **kwargs: Any) -> None:
        super().__init__(_Handler(server), **kwargs)
        self._server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self not in self._server.open:  # STARTTLS calls this again for the TLS transport
            self._server.connections += 1
        self._server.open.add(self)
        self._server.peak = max(self._server.peak, len(self._server.open))

    def connection_lost(self, error: Exception | None) -> None:
        self._server.open.discard(self)
        super().connection_lost(error)


class SmtpServer:
    """An aiosmtpd server on 127.0.0.1 (port 0), run in the current event loop."""

    def __init__(
        self,
        *,
        tls_context: ssl.SSLContext | None = None,
        require_starttls: bool = False,
        auth: bool = False,
    ) -> None:
        self.script = Script()
        self.received: list[Received] = []
        self.rcpt_commands: list[str] = []
        self.mail_commands = 0
        self.connections = 0  # accepted so far
        self.peak = 0  # most open at once
        self.open: set[_RecordingSMTP] = set()
        self.changed = asyncio.Condition()
        self.port = 0
        self._tls_context = tls_context
        self._require_starttls = require_starttls
        self._auth = auth
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> SmtpServer:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def _protocol(self) -> _RecordingSMTP:
        return _RecordingSMTP(
            self,
            hostname="mx.test",
            tls_context=self._tls_context,
            require_starttls=self._require_starttls,
            authenticator=_check_password if self._auth else None,
            auth_required=self._auth,
            loop=asyncio.get_running_loop(),
        )

    def drop_connections(self) -> None:
        """Close every open connection from the server side."""
        for protocol in list(self.open):
            if protocol.transport is not None:
                protocol.transport.close()

    async def wait_for(self, count: int, timeout: float = 15.0) -> list[Received]:
        """Wait until at least `count` messages arrived."""
        async with asyncio.timeout(timeout):
            async with self.changed:
                await self.changed.wait_for(lambda: len(self.received) >= count)
        return self.received

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self.drop_connections()
            await self._server.wait_closed()


def _check_password(
    _server: SMTP, _session: Session, _envelope: Envelope, _mechanism: str, auth_data: Any
) -> AuthResult:
    ok = (
        isinstance(auth_data, LoginPassword)
        and auth_data.login == USERNAME.encode()
        and auth_data.password == PASSWORD.encode()
    )
    return AuthResult(success=ok, handled=False)  # aiosmtpd answers 235 or 535


@dataclass(frozen=True)
class Certificate:
    """A self-signed certificate for 127.0.0.1 and localhost."""

    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        return context


def make_certificate(folder: Path) -> Certificate:
    """Generate the certificate with the openssl command-line tool."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    command = shlex.split(
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2"
        " -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1,DNS:localhost"
    )
    subprocess.run(
        [*command, "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return Certificate(cert, key)


SmtpFactory = Callable[..., Awaitable[SmtpServer]]


@contextlib.asynccontextmanager
async def running_servers() -> AsyncIterator[SmtpFactory]:
    """Start servers with the yielded factory; every one is stopped on exit."""
    started: list[SmtpServer] = []

    async def start(**kwargs: Any) -> SmtpServer:
        server = await SmtpServer(**kwargs).start()
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            await server.stop()


def email_payload(
    to: tuple[str, ...] | list[str] = ("owner@example.com",),
    *,
    subject: str = "New submission: {{ data.form_name }}",
    template: str = "submission-notification",
    data: dict[str, Any] | None = None,
    attachments: list[dict[str, str]] | None = None,
    form_id: str = "form-1",
    submission_id: str = "sub-1",
) -> dict[str, Any]:
    """An `email.send` job as the app publishes it (JSON-ready)."""
    return {
        "type": "email.send",
        "payload": {
            "to": list(to),
            "subject": subject,
            "template": template,
            "data": data if data is not None else SAMPLE_DATA,
            "attachments": attachments or [],
        },
        "metadata": {"formId": form_id, "submissionId": submission_id, "retryCount": 0},
    }


def email_body(*to: str, **kwargs: Any) -> bytes:
    """An `email.send` job's message body, to `to` (by default owner@example.com)."""
    return orjson.dumps(email_payload(to or ("owner@example.com",), **kwargs))


SAMPLE_DATA: dict[str, Any] = {
    "form_name": "Contact us",
    "submitted_at": "2024-05-01 10:00 UTC",
    "submission_url": "https://app.formcraft.example/s/sub-1",
    "answers": [
        {"label": "Name", "value": "Ada Lovelace"},
        {"label": "Message", "value": "<script>alert('hi')</script> & more"},
        {"label": "Topics", "value": ["engines", "poetry"]},
    ],
}


HandlerFactory = Callable[..., Awaitable[EmailHandler]]


def email_job(*to: str, **kwargs: Any) -> EmailJob:
    """A validated `email.send` job (default: one recipient, the shipped notification)."""
    job = jobs.decode(msgspec.json.encode(email_payload(to or ("owner@example.com",), **kwargs)))
    assert isinstance(job, EmailJob)
    return job


def job_context(job_id: str = "job-1", attempt: int = 1) -> JobContext:
    return JobContext(job_id=job_id, attempt=attempt, queue="email_tasks")


async def fails_with(handler: EmailHandler, job: EmailJob, code: str) -> PermanentFailure:
    """Handle `job`, expecting a PermanentFailure with `code` and a one-line reason."""
    with pytest.raises(PermanentFailure) as caught:
        await handler.handle(job, job_context())
    assert caught.value.code == code, caught.value.reason
    assert "\n" not in caught.value.reason
    return caught.value
