"""The email worker: `email.send` jobs rendered, built and sent over pooled SMTP.

One job is one message to its recipients:

1. recipients are parsed and de-duplicated; one on the suppression list is
   skipped, and a job with nobody left is ``SUPPRESSED``;
2. the subject and template are rendered in a render thread, under the
   render timeout (:mod:`.templating`, :mod:`.render_threads`;
   ``TEMPLATE_ERROR``), attachments are read from inside `attachments_dir`
   (``ATTACHMENT_ERROR``) and the MIME message is built (:mod:`.mime`; header
   injection is ``VALIDATION_ERROR``) — on the event loop without attachments,
   in a worker thread with them (see :meth:`EmailHandler._message`);
3. one SMTP transaction on a kept-open connection (:mod:`.smtp_pool`),
   with an answer per recipient: 2xx accepted; 5xx refused for good (the
   address goes on the suppression list); 4xx deferred. Deferred recipients
   are retried *alone* — the retried job carries only them — so nobody gets
   the mail twice. Every recipient refused with 5xx is ``RECIPIENT_REJECTED``.

With `unsubscribe_url` set, every message carries RFC 8058's `List-Unsubscribe`
and `List-Unsubscribe-Post`; when the URL names the `{recipient}`, each
recipient gets a copy of their own (:mod:`.copies`).

Connection problems and 4xx replies to MAIL or DATA are retryable; refused
credentials are permanent (``AUTH_REVOKED``) and logged as an alert.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.headerregistry import Address
from typing import TYPE_CHECKING

from formcraftd.core.bounces import BounceIntake
from formcraftd.core.config import BouncesConfig, EmailWorkerConfig
from formcraftd.core.errors import ConfigError, PermanentFailure, RetryLater
from formcraftd.core.events import Emit
from formcraftd.core.handler import JobContext
from formcraftd.core.jobs import EmailJob
from formcraftd.workers.email import mime
from formcraftd.workers.email.bounces import BounceLedger, BouncePolicy
from formcraftd.workers.email.bounces.mailbox import BounceMailbox
from formcraftd.workers.email.copies import (
    Copy,
    SentCopies,
    copy_per_recipient,
    send_copies,
    unsubscribe_link,
)
from formcraftd.workers.email.render_threads import RenderThreads, RenderThreadsBusy
from formcraftd.workers.email.replies import Recipient, judge, parse_recipients, smtp_failure
from formcraftd.workers.email.smtp_pool import (
    IDLE_TIMEOUT_S,
    SmtpPool,
    SmtpSettings,
)
from formcraftd.workers.email.suppression import SuppressionError, SuppressionList
from formcraftd.workers.email.templating import (
    RENDER_TIMEOUT_S,
    Rendered,
    TemplateFailure,
    TemplateRenderer,
)

if TYPE_CHECKING:
    from formcraftd.core.handler import Handler

__all__ = ["EmailHandler", "breaker_key"]

log = logging.getLogger("formcraftd.email")


def breaker_key(config: EmailWorkerConfig | SmtpSettings) -> str:
    """`smtp:<host>:<port>` of the relay (host lowercased, IPv6 in brackets)."""
    settings = config if isinstance(config, SmtpSettings) else SmtpSettings.from_config(config)
    return f"smtp:{settings.endpoint}"


@dataclass(frozen=True, slots=True)
class _Settings:
    """What a reload may change, swapped in one assignment."""

    smtp: SmtpSettings
    concurrency: int
    sender: Address
    return_path: str  # with {job_id}; "" = the sender's address
    attachments_dir: str
    max_attachment_bytes: int
    max_attachments_total_bytes: int
    templates_dir: str
    state_dir: str
    unsubscribe_url: str  # the URL template; "" = no List-Unsubscribe

    @classmethod
    def from_config(cls, config: EmailWorkerConfig) -> _Settings:
        """Validate the addresses too; raises :class:`ConfigError` if one is unusable."""
        try:
            sender = mime.parse_address(config.from_address, "from_address")
            if config.return_path:
                mime.parse_address(mime.return_path(config.return_path, "0" * 40), "return_path")
        except mime.HeaderRefused as exc:
            raise ConfigError(f"workers.email: {exc}") from None
        return cls(
            SmtpSettings.from_config(config),
            config.concurrency,
            sender,
            config.return_path,
            config.attachments_dir,
            config.max_attachment_bytes,
            config.max_attachments_total_bytes,
            config.templates_dir,
            config.state_dir,
            config.unsubscribe_url,
        )

    def envelope_sender(self, job_id: str) -> str:
        if self.return_path:
            return mime.return_path(self.return_path, job_id)
        return self.sender.addr_spec


class EmailHandler:
    """Delivers email jobs through a pool of kept-open SMTP connections."""

    kind = "email"
    job_type = EmailJob
    batching = False
    rate_limits = None  # one relay: its concurrency is the limit

    def __init__(
        self,
        config: EmailWorkerConfig,
        *,
        user_agent: str,
        emit: Emit | None = None,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        render_timeout_s: float = RENDER_TIMEOUT_S,
    ) -> None:
        self._settings = _Settings.from_config(config)
        self._user_agent = user_agent
        self._render_timeout_s = render_timeout_s
        self._renderer = TemplateRenderer(config.templates_dir, timeout_s=render_timeout_s)
        # One render thread per job the consumer may run at once: see render_threads.
        self.render_threads = RenderThreads(config.concurrency)
        self.pool = SmtpPool(self._settings.smtp, config.concurrency, idle_timeout_s=idle_timeout_s)
        self.suppression = SuppressionList(config.state_dir)
        # Bounces and complaints: on when a mailbox or a provider webhook is configured.
        self.bounces: BouncePolicy | None = None
        self.bounce_intake: BounceIntake | None = None
        if config.bounces.enabled:
            self.bounces = policy = BouncePolicy(
                config.bounces,
                return_path=config.return_path,
                suppression=self.suppression,
                ledger=BounceLedger(config.state_dir),
                emit=emit,
            )
            mailbox = None
            if config.bounces.mailbox_enabled:
                mailbox = BounceMailbox(config.bounces, policy, policy.counts)
            self.bounce_intake = BounceIntake(config.bounces, policy, policy.counts, mailbox)

    async def start(self) -> None:
        """Open the suppression list (and the bounce ledger), start the connection pool."""
        await self.suppression.open()
        if self.bounces is not None:
            await self.bounces.ledger.open()
        await self.pool.start()

    async def aclose(self) -> None:
        """Close the pool, the suppression list, the render threads; log and go on on errors."""
        closers = [("SMTP pool", self.pool.aclose), ("suppression list", self.suppression.aclose)]
        if self.bounces is not None:
            closers.append(("bounce ledger", self.bounces.ledger.aclose))
        for name, close in closers:
            try:
                await close()
            except Exception:
                log.exception("closing the %s failed", name)
        self.render_threads.close()

    def prefetch(self, concurrency: int) -> int:
        """A second round of jobs ready while one runs."""
        return concurrency * 2

    @staticmethod
    def check(config: EmailWorkerConfig) -> None:
        """Raise :class:`ConfigError` if `config` cannot be used (check-config, start, reload)."""
        _Settings.from_config(config)

    def prepare(self, config: EmailWorkerConfig) -> Callable[[], None]:
        """Validate and build a reload's settings and template cache; the returned call
        applies them, with the pool's and render threads' new sizes."""
        settings = _Settings.from_config(config)
        renderer = TemplateRenderer(config.templates_dir, timeout_s=self._render_timeout_s)

        bounces = config.bounces

        def apply() -> None:
            if settings.state_dir != self._settings.state_dir:
                log.warning("workers.email.state_dir changed; a restart moves the suppression list")
            if self.bounces is None or not bounces.enabled:
                if self.bounces is not None or bounces.enabled:
                    log.warning("workers.email.bounces turned on or off; a restart applies it")
            else:
                if _mailbox_settings(bounces) != _mailbox_settings(self.bounces.config):
                    log.warning("workers.email.bounces.imap_* changed; a restart applies them")
                self.bounces.reconfigure(bounces, config.return_path)
            self.pool.reconfigure(settings.smtp, settings.concurrency)
            self.render_threads.resize(settings.concurrency)
            self._settings, self._renderer = settings, renderer

        return apply

    def reconfigure(self, config: EmailWorkerConfig) -> None:
        """Apply a reload at once (see :meth:`prepare`)."""
        self.prepare(config)()

    def breaker_key(self, job: EmailJob) -> str:
        """`smtp:<host>:<port>`: every email job goes to the one relay."""
        return breaker_key(self._settings.smtp)

    async def handle(self, job: EmailJob, ctx: JobContext) -> None:
        """Send once: return when every recipient is settled, else raise the job's fate."""
        settings, renderer = self._settings, self._renderer  # one read per job
        recipients = self._unsuppressed(parse_recipients(job), ctx)
        copies = await self._messages(job, ctx, recipients, settings, renderer)
        started = time.monotonic()
        with ctx.trace.client(
            "smtp send",
            lambda: _span_attributes(
                settings, len(recipients), sum(len(copy.message) for copy in copies)
            ),
        ) as span:
            sent = await send_copies(
                self.pool,
                settings.envelope_sender(ctx.job_id),
                copies,
                functools.partial(smtp_failure, endpoint=settings.smtp.endpoint),
            )
            span.set_attribute("formcraftd.smtp.refused", len(sent.refused) + len(sent.undelivered))
        log.debug(
            "job %s: %d accepted, %d refused by %s in %.0f ms (attempt %d)",
            ctx.job_id,
            len(sent.accepted),
            len(sent.refused) + len(sent.undelivered),
            settings.smtp.endpoint,
            (time.monotonic() - started) * 1000,
            ctx.attempt,
            extra={"queue": ctx.queue, "job_id": ctx.job_id},
        )
        await self._remember(job, ctx, sent)
        await self._judge(job, ctx, recipients, sent)

    def _unsuppressed(self, recipients: list[Recipient], ctx: JobContext) -> list[Recipient]:
        """The recipients not on the suppression list; SUPPRESSED when none is left."""
        suppressed = self.suppression.suppressed(r.key for r in recipients)
        remaining = [r for r in recipients if r.key not in suppressed]
        if not remaining:
            raise PermanentFailure(
                "SUPPRESSED",
                f"all {len(recipients)} recipients are on the suppression list",
                reached_service=False,
            )
        if suppressed:
            log.info(
                "job %s: skipping %d suppressed recipients",
                ctx.job_id,
                len(suppressed),
                extra={"queue": ctx.queue, "job_id": ctx.job_id},
            )
        return remaining

    async def _messages(
        self,
        job: EmailJob,
        ctx: JobContext,
        recipients: Sequence[Recipient],
        settings: _Settings,
        renderer: TemplateRenderer,
    ) -> list[Copy]:
        """Render once and build the message, or each recipient's copy (see
        :mod:`.copies`); raises the job's fate if it cannot be.

        Rendering always happens in a render thread. Building the message
        costs less than a trip to a thread, except with attachments (file
        reads, base64), which go to a worker thread too.
        """
        payload = job.payload
        if copy_per_recipient(settings.unsubscribe_url, len(recipients)):
            groups: list[Sequence[Recipient]] = [[recipient] for recipient in recipients]
        else:
            groups = [recipients]
        try:
            mime.check_header_text(payload.subject, "subject")
            rendered = await self._render(job, renderer)
            if payload.attachments:
                return await asyncio.to_thread(self._build, job, ctx, groups, settings, rendered)
            return self._build(job, ctx, groups, settings, rendered)
        except mime.HeaderRefused as exc:
            raise PermanentFailure("VALIDATION_ERROR", str(exc), reached_service=False) from None
        except TemplateFailure as exc:
            raise PermanentFailure("TEMPLATE_ERROR", str(exc), reached_service=False) from None
        except mime.AttachmentRefused as exc:
            raise PermanentFailure("ATTACHMENT_ERROR", str(exc), reached_service=False) from None

    async def _render(self, job: EmailJob, renderer: TemplateRenderer) -> Rendered:
        """The rendered parts; TemplateFailure, or RetryLater when no render thread is free."""
        payload, metadata = job.payload, job.metadata
        render = functools.partial(
            renderer.render,
            payload.template,
            payload.subject,
            payload.data,
            form_id=metadata.form_id,
            submission_id=metadata.submission_id,
        )
        try:
            return await self.render_threads.run(render, renderer.timeout_s)
        except TimeoutError:
            log.warning(
                "rendering %r took longer than %g s; its thread stays taken until the render"
                " returns (%d of %d render threads held by abandoned renders)",
                payload.template,
                renderer.timeout_s,
                self.render_threads.abandoned,
                self.render_threads.size,
            )
            raise TemplateFailure(
                f"{payload.template}: rendering took longer than {renderer.timeout_s:g} s"
            ) from None
        except RenderThreadsBusy as exc:
            raise RetryLater("RENDER_BUSY", str(exc), counts_for_breaker=False) from None

    def _build(
        self,
        job: EmailJob,
        ctx: JobContext,
        groups: Sequence[Sequence[Recipient]],
        settings: _Settings,
        rendered: Rendered,
    ) -> list[Copy]:
        """Read the attachments (blocking) and build the MIME message of each group.

        Each file is read within what is left of the job's total allowance, so
        one job never holds more than `max_attachments_total_bytes` of them.
        """
        left = settings.max_attachments_total_bytes
        attachments: list[mime.Attachment] = []
        for item in job.payload.attachments:
            if left < settings.max_attachment_bytes:
                cap, name = left, "what is left of max_attachments_total_bytes"
            else:
                cap, name = settings.max_attachment_bytes, "max_attachment_bytes"
            attachment = mime.read_attachment(
                settings.attachments_dir, item.path, item.filename, cap, name
            )
            left -= len(attachment.data)
            attachments.append(attachment)
        content = mime.Content(rendered.subject, rendered.text, rendered.html, attachments)
        return [
            Copy(
                tuple(r.envelope for r in group),
                mime.build_message(
                    sender=settings.sender,
                    recipients=[r.address for r in group],
                    content=content,
                    job_id=ctx.job_id,
                    mailer=self._user_agent,
                    # the first of several when the URL does not name the recipient
                    unsubscribe=unsubscribe_link(
                        settings.unsubscribe_url, job, ctx, group[0].envelope
                    ),
                ),
            )
            for group in groups
        ]

    async def _judge(
        self, job: EmailJob, ctx: JobContext, recipients: list[Recipient], sent: SentCopies
    ) -> None:
        """Suppress the recipients refused for good, then settle the job's fate."""
        for rcpt, (code, text) in sent.refused.items():
            if code >= 500:
                await self._suppress(rcpt, code, text, ctx)
        judge(job, ctx, recipients, sent)

    async def _remember(self, job: EmailJob, ctx: JobContext, sent: SentCopies) -> None:
        """Note the job in the bounce ledger, so that a later bounce can name it."""
        if self.bounces is None or not sent.accepted:
            return
        metadata = job.metadata
        try:
            await self.bounces.record_sent(
                ctx.job_id, metadata.form_id, metadata.submission_id, list(sent.accepted)
            )
        except SuppressionError as exc:
            log.error("job %s: could not note it for bounces: %s", ctx.job_id, exc)

    async def _suppress(self, rcpt: str, code: int, text: str, ctx: JobContext) -> None:
        log.warning(
            "%s refused with %d (%s); adding it to the suppression list",
            rcpt,
            code,
            text,
            extra={"queue": ctx.queue, "job_id": ctx.job_id, "status": code},
        )
        try:
            await self.suppression.add(
                rcpt,
                reason=f"{code} {text}",
                status=code,
                source="smtp",
                kind="hard_bounce",
                job_id=ctx.job_id,
            )
        except (SuppressionError, ValueError) as exc:
            log.error("could not suppress %s: %s", rcpt, exc)


def _mailbox_settings(config: BouncesConfig) -> tuple[object, ...]:
    """The bounce mailbox's settings: its reader is built at start."""
    return tuple(getattr(config, f) for f in config.__struct_fields__ if f.startswith("imap_"))


def _span_attributes(settings: _Settings, recipients: int, size: int) -> dict[str, str | int]:
    """The SMTP client span's attributes: the relay and counts, never an address."""
    return {
        "server.address": settings.smtp.host,
        "server.port": settings.smtp.port,
        "formcraftd.smtp.recipients": recipients,
        "formcraftd.smtp.message.size": size,
    }


if TYPE_CHECKING:

    def _conforms(handler: EmailHandler) -> Handler[EmailJob]:
        return handler
