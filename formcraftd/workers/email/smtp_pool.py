"""A bounded pool of kept-open SMTP connections (aiosmtplib), with per-recipient results.

A relay that requires STARTTLS costs a TCP and a TLS handshake, EHLO and AUTH
per connection; keeping connections open and sending one transaction after
another on them is most of the email worker's throughput. The pool:

- holds at most `size` connections (the worker's concurrency), most recently
  used first, so that spare ones go idle and are closed after `idle_timeout_s`
  by a small reaper task owned by :meth:`SmtpPool.start` / :meth:`SmtpPool.aclose`;
- runs each transaction as MAIL, one RCPT per recipient, DATA, so every
  recipient gets its own answer (:class:`RecipientReplies`);
- when a kept-open connection turns out to be gone before any message data
  was sent (closed, or a 421 in answer to MAIL, which is how a server that
  timed the session out answers), drops it and runs the transaction once
  more on a fresh one;
- raises :class:`SmtpError` for everything else, saying whether a later try
  may succeed (`transient`) and whether the credentials were refused (`auth`).

Errors never carry the password; server replies are cut to one short line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import aiosmtplib

from formcraftd.core.config import EmailWorkerConfig
from formcraftd.core.errors import FormcraftError
from formcraftd.core.limits import ResizableLimiter

__all__ = ["RecipientReplies", "SmtpError", "SmtpPool", "SmtpSettings"]

log = logging.getLogger("formcraftd.email")

IDLE_TIMEOUT_S = 60.0
_OK = 250
_RCPT_OK = (250, 251)
_QUIT_TIMEOUT_S = 2.0
# Losing the connection here means no message data was sent yet: safe to redo at once.
_BEFORE_DATA = ("mail", "rcpt")
_TRANSPORT_ERRORS = (
    aiosmtplib.SMTPServerDisconnected,
    aiosmtplib.SMTPTimeoutError,
    ConnectionError,
    TimeoutError,
    OSError,
)


@dataclass(frozen=True, slots=True)
class SmtpSettings:
    """Where and how to connect; connections opened under other settings are retired."""

    host: str
    port: int
    security: Literal["none", "starttls", "tls"]
    username: str
    password: str = field(repr=False)
    timeout_s: float

    @classmethod
    def from_config(cls, config: EmailWorkerConfig) -> SmtpSettings:
        return cls(
            config.smtp_host,
            config.smtp_port,
            config.smtp_security,
            config.smtp_username,
            config.smtp_password,
            config.smtp_timeout_s,
        )

    @property
    def endpoint(self) -> str:
        host = self.host.lower()
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


class SmtpError(FormcraftError):
    """A transaction that did not happen; `status` is the SMTP reply code, if any."""

    def __init__(
        self, reason: str, *, status: int | None = None, transient: bool, auth: bool = False
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.transient = transient
        self.auth = auth


class _Stale(Exception):
    """A kept-open connection was found closed before any message data went out."""


@dataclass(frozen=True, slots=True)
class RecipientReplies:
    """The server's answer per recipient: accepted ones, and refused ones with their reply."""

    accepted: tuple[str, ...]
    refused: dict[str, tuple[int, str]]


@dataclass(slots=True, eq=False)
class _Connection:
    client: aiosmtplib.SMTP
    settings: SmtpSettings
    last_used: float
    transactions: int = 0


class SmtpPool:
    """At most `size` kept-open connections to one SMTP server."""

    def __init__(
        self, settings: SmtpSettings, size: int, *, idle_timeout_s: float = IDLE_TIMEOUT_S
    ) -> None:
        self._settings = settings
        self._limiter = ResizableLimiter(size)
        self._idle: list[_Connection] = []  # most recently used last
        self._idle_timeout_s = idle_timeout_s
        self._tls: tuple[SmtpSettings, ssl.SSLContext] | None = None
        self._local_hostname: str | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._closed = False
        self.opened = 0  # connections opened so far (for tests and the benchmark)

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def start(self) -> None:
        """Learn our EHLO name once and start closing idle connections."""
        if self._local_hostname is None:
            self._local_hostname = await asyncio.to_thread(socket.getfqdn)
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap(), name="smtp-pool-reaper")

    async def aclose(self) -> None:
        """Stop the reaper and say QUIT on every idle connection; busy ones close on return."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        idle, self._idle = self._idle, []
        await asyncio.gather(*(_quit(conn) for conn in idle))

    def reconfigure(self, settings: SmtpSettings, size: int) -> None:
        """New settings apply to new connections; old ones are retired as they come back."""
        self._settings = settings
        self._limiter.resize(size)

    async def send(
        self, sender: str, recipients: Sequence[str], message: bytes
    ) -> RecipientReplies:
        """One transaction: MAIL FROM `sender`, RCPT TO each recipient, DATA `message`."""
        async with self._limiter:
            settings = self._settings
            conn = self._take_idle(settings)
            if conn is not None:
                try:
                    return await self._transact(conn, sender, recipients, message, redo=True)
                except _Stale:
                    log.debug("kept-open connection to %s was closed", settings.endpoint)
            conn = await self._connect(settings)
            return await self._transact(conn, sender, recipients, message, redo=False)

    # --- connections --------------------------------------------------------------------

    def _take_idle(self, settings: SmtpSettings) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if conn.settings == settings and conn.client.is_connected:
                return conn
            conn.client.close()
        return None

    def _give_back(self, conn: _Connection) -> None:
        conn.last_used = time.monotonic()
        retired = self._closed or conn.settings != self._settings
        if retired or not conn.client.is_connected or len(self._idle) >= self._limiter.limit:
            conn.client.close()
        else:
            self._idle.append(conn)

    async def _connect(self, settings: SmtpSettings) -> _Connection:
        security = settings.security
        client = aiosmtplib.SMTP(
            hostname=settings.host,
            port=settings.port,
            timeout=settings.timeout_s,
            local_hostname=self._local_hostname,
            use_tls=security == "tls",
            start_tls=security == "starttls",
            tls_context=await self._tls_context(settings) if security != "none" else None,
        )
        try:
            await client.connect()
            await _greet(client)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            client.close()
            status = getattr(exc, "code", None)
            raise SmtpError(
                f"cannot connect to {settings.endpoint}: {_describe(exc)}",
                status=status,
                transient=True,
            ) from None
        if settings.username:
            await _login(client, settings)
        self.opened += 1
        return _Connection(client, settings, time.monotonic())

    async def _tls_context(self, settings: SmtpSettings) -> ssl.SSLContext:
        """One verifying context per settings (building one reads the CA bundle)."""
        if self._tls is None or self._tls[0] != settings:
            context = await asyncio.to_thread(ssl.create_default_context)
            self._tls = (settings, context)
        return self._tls[1]

    async def _reap(self) -> None:
        interval = max(0.05, min(self._idle_timeout_s / 4, 15.0))
        while True:
            await asyncio.sleep(interval)
            cutoff = time.monotonic() - self._idle_timeout_s
            expired = [conn for conn in self._idle if conn.last_used < cutoff]
            if expired:
                self._idle = [conn for conn in self._idle if conn.last_used >= cutoff]
                log.debug("closing %d idle SMTP connections", len(expired))
                await asyncio.gather(*(_quit(conn) for conn in expired))

    # --- one transaction ----------------------------------------------------------------

    async def _transact(
        self,
        conn: _Connection,
        sender: str,
        recipients: Sequence[str],
        message: bytes,
        *,
        redo: bool,
    ) -> RecipientReplies:
        stage = "mail"
        client = conn.client
        try:
            # RFC 1870: the size on the wire, where every line ends in CRLF.
            size = len(message) + message.count(b"\n")
            options = [f"SIZE={size}"] if client.supports_extension("size") else []
            await _mail(client, sender, options)
            stage = "rcpt"
            replies = await _recipients(client, recipients)
            if replies.accepted:
                stage = "data"
                await _data(client, message)
            else:
                await _reset(client)
        except _TRANSPORT_ERRORS as exc:
            client.close()
            if redo and stage in _BEFORE_DATA:
                raise _Stale from None
            raise SmtpError(
                f"{conn.settings.endpoint}: connection lost during {stage.upper()}: "
                f"{_describe(exc)}",
                transient=True,
            ) from None
        except SmtpError as exc:
            if redo and stage == "mail" and exc.status == 421:  # e.g. the server's idle timeout
                client.close()
                raise _Stale from None
            await _reset(client)
            self._give_back(conn)
            raise
        except BaseException:  # cancelled mid-transaction: the session state is unknown
            client.close()
            raise
        conn.transactions += 1
        self._give_back(conn)
        return replies


async def _greet(client: aiosmtplib.SMTP) -> None:
    """EHLO (HELO if refused) unless STARTTLS already did it: MAIL relies on it."""
    if not client.is_ehlo_or_helo_needed:
        return
    try:
        await client.ehlo()
    except aiosmtplib.SMTPHeloError:
        await client.helo()


async def _login(client: aiosmtplib.SMTP, settings: SmtpSettings) -> None:
    """AUTH; a refusal is an :class:`SmtpError` with `auth` set (never retried)."""
    try:
        await client.login(settings.username, settings.password)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
        client.close()
        raise SmtpError(
            f"{settings.endpoint}: connection lost during AUTH: {_describe(exc)}", transient=True
        ) from None
    except aiosmtplib.SMTPException as exc:
        client.close()
        raise SmtpError(
            f"{settings.endpoint} refused the credentials of {settings.username!r}: "
            f"{_describe(exc)}",
            status=getattr(exc, "code", None),
            transient=False,
            auth=True,
        ) from None


# MAIL and RCPT go through `execute_command` rather than `mail()` / `rcpt()`: the
# addresses are already validated ASCII addr-specs (formcraftd.mime), and those
# methods re-parse every address with `email.utils`, a sizeable share of the
# client's time per message. The session greeted the server when it connected.


async def _mail(client: aiosmtplib.SMTP, sender: str, options: list[str]) -> None:
    args = [b"FROM:<" + sender.encode("ascii") + b">", *(o.encode("ascii") for o in options)]
    response = await client.execute_command(b"MAIL", *args)
    if response.code != _OK:
        raise SmtpError(
            f"MAIL FROM refused: {_reply(response.code, response.message)}",
            status=response.code,
            transient=response.code < 500,
        )


async def _recipients(client: aiosmtplib.SMTP, recipients: Sequence[str]) -> RecipientReplies:
    accepted: list[str] = []
    refused: dict[str, tuple[int, str]] = {}
    for recipient in recipients:
        response = await client.execute_command(b"RCPT", b"TO:<" + recipient.encode("ascii") + b">")
        if response.code in _RCPT_OK:
            accepted.append(recipient)
            continue
        refused[recipient] = (response.code, _one_line(response.message))
        if not client.is_connected:  # a 421 closes the connection
            raise aiosmtplib.SMTPServerDisconnected(_reply(response.code, response.message))
    return RecipientReplies(tuple(accepted), refused)


async def _data(client: aiosmtplib.SMTP, message: bytes) -> None:
    try:
        await client.data(message)
    except aiosmtplib.SMTPDataError as exc:
        raise SmtpError(
            f"message refused at DATA: {_reply(exc.code, exc.message)}",
            status=exc.code,
            transient=exc.code < 500,
        ) from None


async def _reset(client: aiosmtplib.SMTP) -> None:
    """RSET after a refused transaction, so the connection can be reused (or is closed)."""
    if not client.is_connected:
        return
    try:
        await client.rset()
    except (aiosmtplib.SMTPException, OSError):
        client.close()


async def _quit(conn: _Connection) -> None:
    try:
        async with asyncio.timeout(_QUIT_TIMEOUT_S):
            await conn.client.quit()
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        pass
    finally:
        conn.client.close()


def _reply(code: int, message: str) -> str:
    return f"{code} {_one_line(message)}"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return _reply(exc.code, exc.message)
    text = _one_line(getattr(exc, "message", None) or exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _one_line(value: object) -> str:
    return " ".join(str(value).split())[:200]
