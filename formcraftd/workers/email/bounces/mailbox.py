"""The bounce mailbox: reads DSNs and complaints over IMAP (aioimaplib) and applies them.

The daemon runs :meth:`BounceMailbox.run` as a supervised background task
while `workers.email.bounces.imap_host` is set. It logs in, selects
`imap_folder` and reads every message there it has not seen yet: a DSN or an
ARF report that matches a job this host sent (see :mod:`.policy`) is applied,
then flagged (``\\Seen`` and ``\\Flagged``) and moved to
`imap_processed_folder`. Anything else — a reply from a person, an
auto-reply, a report it cannot parse or match — is left exactly as it was (it
is read with ``BODY.PEEK``, so not even ``\\Seen`` changes) and counted once.

It waits for new mail with IDLE when the server offers it, else searches
every `imap_poll_interval_s`. A failure (connection refused, login refused,
the connection dropping) is logged and retried with exponential backoff; it
never touches the queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable

import aioimaplib

from formcraftd.core.bounces import BounceCounts, BounceReport, BounceSink
from formcraftd.core.config import BouncesConfig
from formcraftd.core.errors import FormcraftError
from formcraftd.workers.email.bounces.arf import parse_arf
from formcraftd.workers.email.bounces.dsn import parse_dsn
from formcraftd.workers.email.bounces.reports import NotAReport, ParsedReport, parse_message

__all__ = ["BounceMailbox", "MailboxError", "read_report"]

log = logging.getLogger("formcraftd.email.bounces")

PROCESSED_FLAGS = "(\\Seen \\Flagged)"  # system flags: every server keeps them
BACKOFF_INITIAL_S = 1.0
BACKOFF_MAX_S = 300.0
_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY (\d+)\]")
_SEEN_MAX = 100_000  # unprocessable messages remembered, so each is read and counted once


class MailboxError(FormcraftError):
    """The IMAP server refused a command (login, select, fetch, move)."""


def read_report(raw: bytes) -> ParsedReport:
    """A DSN or an ARF report; :class:`NotAReport` for anything else."""
    message = parse_message(raw)
    try:
        return parse_dsn(message)
    except NotAReport:
        return parse_arf(message)


def _quoted(mailbox: str) -> str:
    # The config refuses quotes, backslashes and control characters in folder names.
    return f'"{mailbox}"'


def _check(response: aioimaplib.Response, what: str) -> aioimaplib.Response:
    if response.result != "OK":
        said = b" ".join(line for line in response.lines if isinstance(line, bytes))
        text = said.decode("utf-8", "replace")[:200]
        raise MailboxError(f"{what} refused: {response.result} {text}".strip())
    return response


class BounceMailbox:
    """Reads the bounce mailbox until cancelled, reconnecting with backoff."""

    def __init__(
        self,
        config: BouncesConfig,
        sink: BounceSink,
        counts: BounceCounts,
        *,
        ssl_context: ssl.SSLContext | None = None,
        backoff_s: tuple[float, float] = (BACKOFF_INITIAL_S, BACKOFF_MAX_S),
    ) -> None:
        self.config = config
        self._backoff_s = backoff_s
        self._sink = sink
        self._counts = counts
        self._ssl_context = ssl_context
        self.connected = False
        self.last_error: str | None = None
        self.scans = 0  # completed searches of the folder
        self._seen: set[tuple[int, int]] = set()  # (UIDVALIDITY, UID) left alone
        self._applied: set[tuple[int, int]] = set()  # applied, not yet moved: not twice
        self._scanned = asyncio.Condition()

    @property
    def where(self) -> str:
        config = self.config
        return f"{config.imap_username}@{config.imap_host}:{config.imap_port}/{config.imap_folder}"

    async def run(self) -> None:
        """Read the mailbox forever; a broken connection is retried with backoff."""
        initial, ceiling = self._backoff_s
        delay = initial
        while True:
            started = time.monotonic()
            try:
                await self._session()
            except (OSError, TimeoutError, MailboxError, aioimaplib.AioImapException) as exc:
                self.last_error = f"{type(exc).__name__}: {str(exc) or 'timed out'}"[:300]
                log.warning(
                    "bounce mailbox %s: %s; retrying in %g s", self.where, self.last_error, delay
                )
            finally:
                self.connected = False
            if time.monotonic() - started > ceiling:
                delay = initial  # it worked for a while: start the backoff afresh
            await asyncio.sleep(delay)
            delay = min(delay * 2, ceiling)

    async def wait_scans(self, count: int) -> None:
        """Wait until the folder was searched `count` times in all (for tests and status)."""
        async with self._scanned:
            await self._scanned.wait_for(lambda: self.scans >= count)

    async def _session(self) -> None:
        config = self.config
        lost = asyncio.Event()
        client = self._client(lambda _exc: lost.set())
        try:
            await client.wait_hello_from_server()
            _check(await client.login(config.imap_username, config.imap_password), "LOGIN")
            # CREATE answers NO when the folder exists already: that is fine.
            await client.create(_quoted(config.imap_processed_folder))
            selected = _check(await client.select(_quoted(config.imap_folder)), "SELECT")
            uidvalidity = self._uidvalidity(selected)
            self.connected, self.last_error = True, None
            idle = client.has_capability("IDLE")
            log.info(
                "bounce mailbox %s: connected; %s",
                self.where,
                "waiting with IDLE"
                if idle
                else f"searching every {config.imap_poll_interval_s:g} s",
            )
            while not lost.is_set():
                await self._scan(client, uidvalidity)
                if idle:
                    await self._idle(client, lost)
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), config.imap_poll_interval_s)
            raise MailboxError("the server closed the connection")
        finally:
            if not lost.is_set():  # also when cancelled: end IDLE, say goodbye
                with contextlib.suppress(Exception):
                    if client.has_pending_idle():
                        client.idle_done()
                    await client.logout()

    def _client(self, on_lost: Callable[[Exception | None], None]) -> aioimaplib.IMAP4:
        """A client connecting now; `on_lost` is called when the connection goes."""
        config = self.config
        host, port, timeout = config.imap_host, config.imap_port, config.imap_timeout_s
        if config.imap_security == "none":
            return aioimaplib.IMAP4(host, port, timeout=timeout, conn_lost_cb=on_lost)
        context = self._ssl_context or ssl.create_default_context()  # IMAPS: TLS from the start
        return aioimaplib.IMAP4(
            host, port, timeout=timeout, conn_lost_cb=on_lost, ssl_context=context
        )

    @staticmethod
    def _uidvalidity(selected: aioimaplib.Response) -> int:
        for line in selected.lines:
            if isinstance(line, bytes | bytearray):
                match = _UIDVALIDITY.search(bytes(line))
                if match:
                    return int(match.group(1))
        return 0

    async def _idle(self, client: aioimaplib.IMAP4, lost: asyncio.Event) -> None:
        """Wait for the server to announce a change (at most `imap_idle_s`) or to go away."""
        timeout = self.config.imap_idle_s
        idle = await asyncio.wait_for(
            client.idle_start(timeout=timeout), self.config.imap_timeout_s
        )
        push = asyncio.ensure_future(client.wait_server_push(timeout=timeout + 5))
        gone = asyncio.ensure_future(lost.wait())
        try:
            await asyncio.wait((push, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (push, gone):
                waiter.cancel()
            await asyncio.gather(push, gone, return_exceptions=True)
        if lost.is_set():
            idle.cancel()
            await asyncio.gather(idle, return_exceptions=True)
            return
        client.idle_done()
        await asyncio.wait_for(idle, self.config.imap_timeout_s)

    async def _scan(self, client: aioimaplib.IMAP4, uidvalidity: int) -> None:
        """Read and handle every message not seen yet."""
        found = await self._command(client.uid_search("UNDELETED", charset=None), "SEARCH")
        uids = [
            int(word)
            for line in found.lines[:-1]
            if isinstance(line, bytes)
            for word in line.split()
            if word.isdigit()
        ]
        for uid in uids:
            if (uidvalidity, uid) not in self._seen:
                await self._handle(client, uidvalidity, uid)
        async with self._scanned:
            self.scans += 1
            self._scanned.notify_all()

    async def _handle(self, client: aioimaplib.IMAP4, uidvalidity: int, uid: int) -> None:
        limit = self.config.imap_max_message_bytes
        if (uidvalidity, uid) in self._applied:  # applied before the connection broke
            await self._file(client, uid)
            self._applied.discard((uidvalidity, uid))
            return
        fetch = client.uid("fetch", str(uid), f"(BODY.PEEK[]<0.{limit}>)")
        fetched = await self._command(fetch, "FETCH")
        raw = next((bytes(x) for x in fetched.lines if isinstance(x, bytearray)), None)
        if raw is None:  # expunged meanwhile by someone else
            return
        try:
            parsed = read_report(raw)
        except NotAReport as exc:
            self._leave(uidvalidity, uid, "unparsed", str(exc))
            return
        applied = 0
        for result in parsed.results:
            report = BounceReport(
                result.type,
                result.recipient,
                "imap",
                result.status,
                result.diagnostic,
                tuple(parsed.message_ids),
                tuple(parsed.job_ids),
                tuple(parsed.envelope_to),
            )
            outcome = await self._sink.take(report, require_match=True)
            applied += outcome.ignored is None
        if not applied:
            self._leave(uidvalidity, uid, "unmatched", "no job sent by this host matches it")
            return
        self._applied.add((uidvalidity, uid))
        await self._file(client, uid)
        self._applied.discard((uidvalidity, uid))

    def _leave(self, uidvalidity: int, uid: int, reason: str, why: str) -> None:
        self._counts.skip(reason)
        if len(self._seen) >= _SEEN_MAX:
            self._seen.clear()  # they will be read (and counted) once more; memory stays bounded
        self._seen.add((uidvalidity, uid))
        log.info(
            "bounce mailbox %s: message UID %d left alone (%s): %s", self.where, uid, reason, why
        )

    async def _file(self, client: aioimaplib.IMAP4, uid: int) -> None:
        """Flag a processed message and move it to the processed folder."""
        await self._command(client.uid("store", str(uid), "+FLAGS", PROCESSED_FLAGS), "STORE")
        target = _quoted(self.config.imap_processed_folder)
        if client.has_capability("MOVE"):
            await self._command(client.uid("move", str(uid), target), "MOVE")
            return
        await self._command(client.uid("copy", str(uid), target), "COPY")
        await self._command(client.uid("store", str(uid), "+FLAGS", "(\\Deleted)"), "STORE")
        if client.has_capability("UIDPLUS"):  # never a plain EXPUNGE: it would take others' mail
            await self._command(client.uid("expunge", str(uid)), "EXPUNGE")

    async def _command(
        self, call: Awaitable[aioimaplib.Response], what: str
    ) -> aioimaplib.Response:
        """Run an IMAP command under `imap_timeout_s` (not every command has its own)."""
        timeout = self.config.imap_timeout_s
        try:
            response = await asyncio.wait_for(call, timeout)
        except TimeoutError:
            raise MailboxError(f"{what}: no answer within {timeout:g} s") from None
        return _check(response, what)
