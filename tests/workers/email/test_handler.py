"""The email handler against real aiosmtpd servers on loopback (no broker involved)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from formcraftd.core import jobs
from formcraftd.core.errors import ConfigError, PermanentFailure, RetryLater
from formcraftd.core.handler import JobContext
from formcraftd.core.jobs import EmailJob
from formcraftd.workers.email import suppression
from formcraftd.workers.email.handler import EmailHandler
from formcraftd.workers.email.plaintext import html_to_text
from formcraftd.workers.email.smtp_pool import SmtpPool, SmtpSettings
from formcraftd.workers.email.suppression import SuppressionStore
from formcraftd.workers.email.templating import RenderDeferred, TemplateRenderer
from tests.support import Names, make_config
from tests.support.smtp import (
    PASSWORD,
    SAMPLE_DATA,
    USERNAME,
    Certificate,
    SmtpFactory,
    SmtpServer,
    email_payload,
    make_certificate,
    running_servers,
)

pytestmark = [pytest.mark.email]

HandlerFactory = Callable[..., Awaitable[EmailHandler]]


def email_job(*to: str, **kwargs: Any) -> EmailJob:
    """A validated `email.send` job (default: one recipient, the shipped notification)."""
    job = jobs.decode(msgspec.json.encode(email_payload(to or ("owner@example.com",), **kwargs)))
    assert isinstance(job, EmailJob)
    return job


def context(job_id: str = "job-1", attempt: int = 1) -> JobContext:
    return JobContext(job_id=job_id, attempt=attempt, queue="email_tasks")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """A self-signed certificate for 127.0.0.1."""
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
async def smtp_factory() -> AsyncIterator[SmtpFactory]:
    """Starts aiosmtpd servers on loopback; all are stopped afterwards."""
    async with running_servers() as start:
        yield start


@pytest.fixture
async def smtp_server(smtp_factory: SmtpFactory) -> SmtpServer:
    """A plain SMTP server that accepts everything."""
    return await smtp_factory()


@pytest.fixture
async def make_handler(tmp_path: Path) -> AsyncIterator[HandlerFactory]:
    """Started EmailHandlers pointed at a test server; closed afterwards."""
    handlers: list[EmailHandler] = []

    async def make(server: SmtpServer | None, /, **settings: Any) -> EmailHandler:
        options = {
            k: settings.pop(k) for k in ("idle_timeout_s", "render_timeout_s") if k in settings
        }
        section = {
            "enabled": True,
            "smtp_host": "127.0.0.1",
            "smtp_port": server.port if server else 1,
            "smtp_timeout_s": 5,
            "state_dir": str(tmp_path / "var"),
            **settings,
        }
        cfg = make_config(Names(), email=section).workers.email
        handler = EmailHandler(cfg, user_agent="formcraftd/test", **options)
        await handler.start()
        handlers.append(handler)
        return handler

    yield make
    for handler in handlers:
        await handler.aclose()


@pytest.fixture
def alerts() -> Iterator[list[logging.LogRecord]]:
    """Records logged by the email worker."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("formcraftd.email")
    collector = Collect(logging.DEBUG)
    logger.addHandler(collector)
    yield records
    logger.removeHandler(collector)


async def fails_with(handler: EmailHandler, job: EmailJob, code: str) -> PermanentFailure:
    with pytest.raises(PermanentFailure) as caught:
        await handler.handle(job, context())
    assert caught.value.code == code, caught.value.reason
    assert "\n" not in caught.value.reason
    return caught.value


# --- rendering ------------------------------------------------------------------------------------


async def test_notification_is_multipart_with_escaped_html_text_part_and_rendered_subject(
    smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """The shipped notification: text + HTML alternatives, answers escaped in HTML only."""
    handler = await make_handler(smtp_server)
    await handler.handle(email_job(), context())
    [received] = smtp_server.received
    message = received.message
    assert message.get_content_type() == "multipart/alternative"
    assert message["Subject"] == "New submission: Contact us"
    html = message.get_body(("html",)).get_content()  # type: ignore[union-attr]
    text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "&lt;script&gt;alert(&#39;hi&#39;)&lt;/script&gt; &amp; more" in html
    assert "<script>" not in html
    assert "<th" in html and "Ada Lovelace" in html and "engines, poetry" in html
    assert "<script>alert('hi')</script> & more" in text
    assert "https://app.formcraft.example/s/sub-1" in text


async def test_receipt_template_renders_for_the_respondent(
    smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """The shipped receipt thanks the respondent by name."""
    handler = await make_handler(smtp_server)
    data = {"form_name": "Survey", "respondent_name": "Ada", "message": "We'll be in touch."}
    job = email_job("ada@example.com", template="submission-receipt", subject="Thanks", data=data)
    await handler.handle(job, context())
    text = smtp_server.received[0].message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert text.startswith("Thank you, Ada!")
    assert "We'll be in touch." in text


async def test_a_template_without_txt_gets_a_text_part_derived_from_the_html(
    tmp_path: Path, smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """Without `<name>.txt`, the text part is a readable version of the HTML."""
    (tmp_path / "tpl").mkdir()
    (tmp_path / "tpl" / "hello.html").write_text(
        "<html><head><style>p {}</style></head><body><h1>Hi {{ data.name }}</h1>"
        "<p>See <a href='https://example.com/x'>your answers</a>.</p></body></html>"
    )
    handler = await make_handler(smtp_server, templates_dir=str(tmp_path / "tpl"))
    await handler.handle(email_job(template="hello", subject="Hi", data={"name": "Ada"}), context())
    text = smtp_server.received[0].message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert text == "Hi Ada\n\nSee your answers (https://example.com/x).\n"


def test_html_to_text_turns_table_rows_into_label_value_lines() -> None:
    """Cells of a row are joined as `label: value`; hidden preheaders are skipped."""
    html = (
        "<div style='display: none'>preheader</div><table><tr><th>Name</th><td>Ada</td></tr>"
        "<tr><th>Age</th><td>36</td></tr></table><ul><li>one</li></ul>"
    )
    assert html_to_text(html) == "Name: Ada\nAge: 36\n\n- one\n"


@pytest.mark.parametrize(
    ("template", "subject", "data", "why"),
    [
        ("no-such-template", "s", {}, "not found"),
        ("submission-notification", "{{ data.form_name }}", {"answers": []}, "form_name"),
        ("submission-notification", "{% if %}", {}, "syntax error"),
        ("submission-notification", "{{ unknown_variable }}", {}, "unknown_variable"),
    ],
)
async def test_template_problems_are_template_errors_and_send_nothing(
    template: str,
    subject: str,
    data: dict[str, Any],
    why: str,
    smtp_server: SmtpServer,
    make_handler: HandlerFactory,
) -> None:
    """Missing template, undefined variable or bad syntax: TEMPLATE_ERROR, no SMTP at all."""
    handler = await make_handler(smtp_server)
    failure = await fails_with(
        handler, email_job(template=template, subject=subject, data=data), "TEMPLATE_ERROR"
    )
    assert why in failure.reason
    assert not failure.reached_service
    assert smtp_server.connections == 0


@pytest.mark.parametrize(
    "subject",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ data.__class__.__init__.__globals__ }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{{ namespace.__init__.__globals__ }}",
        "{{ self.__init__.__globals__ }}",
        "{{ '{0.__class__}'.format(data) }}",
        "{{ data.answers.append(1) }}",
        "{{ 'x' * 100000000 }}",
        "{{ 9 ** (9 ** 9) }}",
        "{{ 'x'.center(1000000000) }}",
        "{{ '%999999999d' % 1 }}",
        "{{ ('x' * 1000).join(range(99999)|map('string')) }}",
        "{{ lipsum(99999) }}",
        "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    ],
)
async def test_sandbox_escapes_and_resource_bombs_are_template_errors(
    subject: str, smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """Attribute escapes, mutation and size bombs in a job's subject fail fast, unsent."""
    handler = await make_handler(smtp_server)
    started = time.monotonic()
    await fails_with(handler, email_job(subject=subject), "TEMPLATE_ERROR")
    assert time.monotonic() - started < 1.5
    assert smtp_server.received == []


async def test_an_endless_loop_stops_at_the_render_timeout(
    smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """Nested loops that would run for hours end as TEMPLATE_ERROR at the render deadline."""
    handler = await make_handler(smtp_server, render_timeout_s=0.3)
    subject = (
        "{% set l = range(99999)|list %}"
        "{% for a in l %}{% for b in l %}{% for c in l %}{% endfor %}{% endfor %}{% endfor %}"
    )
    started = time.monotonic()
    failure = await fails_with(handler, email_job(subject=subject), "TEMPLATE_ERROR")
    assert "longer than 0.3 s" in failure.reason
    assert time.monotonic() - started < 2


def test_a_render_that_outlasts_the_inline_slice_is_deferred_to_a_thread(tmp_path: Path) -> None:
    """Inline, only compiled quick renders run; a slow one is redone with the full budget."""
    (tmp_path / "slow.html").write_text("{% for i in range(99999) %}{{ i }}{% endfor %}")
    renderer = TemplateRenderer(tmp_path)
    with pytest.raises(RenderDeferred):  # not compiled yet
        renderer.render("slow", "s", {}, inline=True)
    assert renderer.render("slow", "s", {}).html.startswith("0123")
    with pytest.raises(RenderDeferred):  # over the inline slice
        renderer.render("slow", "s", {}, inline=True)


async def test_oversized_output_is_a_template_error(
    tmp_path: Path, smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """A template whose output passes the size cap stops as TEMPLATE_ERROR."""
    (tmp_path / "tpl").mkdir()
    (tmp_path / "tpl" / "big.html").write_text(
        "{% for i in range(99999) %}{{ 'x' * 99999 }}{% endfor %}"
    )
    handler = await make_handler(smtp_server, templates_dir=str(tmp_path / "tpl"))
    failure = await fails_with(handler, email_job(template="big"), "TEMPLATE_ERROR")
    assert "over 1000000 characters" in failure.reason


async def test_reconfigure_invalidates_the_template_cache(
    tmp_path: Path, smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """An edited template is used only after reconfigure() (SIGHUP), not before."""
    folder = tmp_path / "tpl"
    folder.mkdir()
    (folder / "t.html").write_text("<p>first</p>")
    handler = await make_handler(smtp_server, templates_dir=str(folder))
    await handler.handle(email_job(template="t"), context())
    (folder / "t.html").write_text("<p>second</p>")
    await handler.handle(email_job(template="t"), context())
    cfg = make_config(
        Names(),
        email={
            "smtp_host": "127.0.0.1",
            "smtp_port": smtp_server.port,
            "templates_dir": str(folder),
            "state_dir": str(tmp_path / "var"),
        },
    ).workers.email
    handler.reconfigure(cfg)
    await handler.handle(email_job(template="t"), context())
    bodies = [r.message.get_body(("html",)).get_content() for r in smtp_server.received]  # type: ignore[union-attr]
    assert ["first" in b for b in bodies] == [True, True, False]
    assert "second" in bodies[2]


# --- headers --------------------------------------------------------------------------------------


async def test_headers_carry_the_job_id_and_the_configured_sender(
    smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """From, Message-ID (from the job id), X-FormCraft-Job-Id, and an envelope sender."""
    handler = await make_handler(smtp_server, from_address="FormCraft <no-reply@forms.example>")
    await handler.handle(email_job(), context("3f2a9c"))
    [received] = smtp_server.received
    message = received.message
    assert message["From"] == "FormCraft <no-reply@forms.example>"
    assert message["Message-ID"] == "<3f2a9c@forms.example>"
    assert message["X-FormCraft-Job-Id"] == "3f2a9c"
    assert message["Auto-Submitted"] == "auto-generated"
    assert received.mail_from == "no-reply@forms.example"


async def test_return_path_is_the_envelope_sender_with_the_job_id_expanded(
    smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """VERP: `bounces+{job_id}@...` becomes the MAIL FROM of this job."""
    handler = await make_handler(smtp_server, return_path="bounces+{job_id}@forms.example")
    await handler.handle(email_job(), context("job-42"))
    assert smtp_server.received[0].mail_from == "bounces+job-42@forms.example"


async def test_an_unusable_from_address_is_a_config_error(tmp_path: Path) -> None:
    """A from_address that is not an address is refused when the config is applied."""
    cfg = make_config(
        Names(), email={"from_address": "nobody", "state_dir": str(tmp_path)}
    ).workers.email
    with pytest.raises(ConfigError, match="from_address"):
        EmailHandler(cfg, user_agent="formcraftd/test")


@pytest.mark.parametrize(
    ("to", "kwargs"),
    [
        (("owner@example.com",), {"subject": "Hello\r\nBcc: victim@example.com"}),
        (("owner@example.com\r\nBcc: victim@example.com",), {}),
        (
            ("owner@example.com",),
            {"subject": "{{ data.s }}", "data": {**SAMPLE_DATA, "s": "a\nBcc: x@y.z"}},
        ),
        (("not an address",), {}),
        (("a@example.com, b@example.com",), {}),
    ],
)
async def test_header_injection_and_bad_addresses_are_validation_errors(
    to: tuple[str, ...],
    kwargs: dict[str, Any],
    smtp_server: SmtpServer,
    make_handler: HandlerFactory,
) -> None:
    """CR/LF in a subject or address, or a non-address: VALIDATION_ERROR, nothing sent."""
    handler = await make_handler(smtp_server)
    await fails_with(handler, email_job(*to, **kwargs), "VALIDATION_ERROR")
    assert smtp_server.received == []


# --- attachments ----------------------------------------------------------------------------------


@pytest.fixture
def attachments_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "uploads"
    (folder / "sub").mkdir(parents=True)
    (tmp_path / "secret.txt").write_text("not for you")
    (folder / "link").symlink_to(tmp_path / "secret.txt")
    return folder


async def test_attachment_bytes_arrive_intact(
    attachments_dir: Path, smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """A binary attachment inside attachments_dir is delivered byte for byte."""
    blob = os.urandom(300_000) + b"\r\n.\r\n\x00"
    (attachments_dir / "sub" / "report.pdf").write_bytes(blob)
    handler = await make_handler(smtp_server, attachments_dir=str(attachments_dir))
    files = [{"filename": "Rapport été.pdf", "path": "sub/report.pdf"}]
    await handler.handle(email_job(attachments=files), context())
    message = smtp_server.received[0].message
    assert message.get_content_type() == "multipart/mixed"
    [part] = list(message.iter_attachments())
    assert part.get_filename() == "Rapport été.pdf"
    assert part.get_content_type() == "application/pdf"
    assert part.get_payload(decode=True) == blob


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("../secret.txt", "outside attachments_dir"),
        ("sub/../../secret.txt", "outside attachments_dir"),
        ("link", "outside attachments_dir"),
        ("/etc/passwd", "outside attachments_dir"),
        ("missing.pdf", "does not exist"),
        ("sub", "not a regular file"),
    ],
)
async def test_attachments_outside_the_folder_or_missing_are_refused(
    path: str,
    why: str,
    attachments_dir: Path,
    smtp_server: SmtpServer,
    make_handler: HandlerFactory,
) -> None:
    """Traversal, symlinks out, absolute paths elsewhere and missing files: ATTACHMENT_ERROR."""
    handler = await make_handler(smtp_server, attachments_dir=str(attachments_dir))
    job = email_job(attachments=[{"filename": "x.txt", "path": path}])
    failure = await fails_with(handler, job, "ATTACHMENT_ERROR")
    assert why in failure.reason
    assert "not for you" not in failure.reason
    assert smtp_server.connections == 0


async def test_an_attachment_over_the_size_limit_is_refused(
    attachments_dir: Path, smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """A file larger than max_attachment_bytes is ATTACHMENT_ERROR."""
    (attachments_dir / "big.bin").write_bytes(b"x" * 1001)
    handler = await make_handler(
        smtp_server, attachments_dir=str(attachments_dir), max_attachment_bytes=1000
    )
    job = email_job(attachments=[{"filename": "big.bin", "path": "big.bin"}])
    failure = await fails_with(handler, job, "ATTACHMENT_ERROR")
    assert "1001 bytes" in failure.reason


async def test_attachments_are_refused_when_no_folder_is_configured(
    smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """With attachments_dir empty, any attachment is ATTACHMENT_ERROR."""
    handler = await make_handler(smtp_server)
    job = email_job(attachments=[{"filename": "a.txt", "path": "/etc/hostname"}])
    await fails_with(handler, job, "ATTACHMENT_ERROR")


async def test_an_absolute_path_inside_the_folder_is_accepted(
    attachments_dir: Path, smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """An absolute attachment path is fine when it lies inside attachments_dir."""
    (attachments_dir / "a.txt").write_text("hello")
    handler = await make_handler(smtp_server, attachments_dir=str(attachments_dir))
    path = str(attachments_dir / "a.txt")
    await handler.handle(email_job(attachments=[{"filename": "a.txt", "path": path}]), context())
    [part] = list(smtp_server.received[0].message.iter_attachments())
    assert part.get_payload(decode=True) == b"hello"


# --- per-recipient outcomes -----------------------------------------------------------------------


async def test_a_550_recipient_is_suppressed_while_the_others_get_the_mail(
    smtp_server: SmtpServer, make_handler: HandlerFactory, alerts: list[logging.LogRecord]
) -> None:
    """Accepted plus 5xx, no 4xx: success, and the refused address is suppressed."""
    smtp_server.script.rcpt["gone@example.com"] = ["550 5.1.1 no such user"]
    handler = await make_handler(smtp_server)
    await handler.handle(email_job("ok@example.com", "Gone@Example.com"), context())
    assert smtp_server.received[0].rcpt_tos == ["ok@example.com"]
    assert handler.suppression.suppressed(["gone@example.com"]) == {"gone@example.com"}
    assert any("gone@example.com" in r.getMessage().lower() for r in alerts)


async def test_all_recipients_refused_with_5xx_is_recipient_rejected(
    smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """Every recipient 5xx: RECIPIENT_REJECTED with the SMTP code, no DATA."""
    smtp_server.script.rcpt["a@example.com"] = ["550 5.1.1 no such user"]
    smtp_server.script.rcpt["b@example.com"] = ["553 5.7.1 refused"]
    handler = await make_handler(smtp_server)
    failure = await fails_with(
        handler, email_job("a@example.com", "b@example.com"), "RECIPIENT_REJECTED"
    )
    assert failure.status == 550
    assert smtp_server.received == []
    assert handler.suppression.suppressed(["a@example.com", "b@example.com"]) == {
        "a@example.com",
        "b@example.com",
    }


async def test_a_452_recipient_is_retried_alone(
    smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """Accepted + 4xx: RetryLater whose replacement job carries only the deferred recipient."""
    smtp_server.script.rcpt["busy@example.com"] = ["452 4.2.2 mailbox full"]
    handler = await make_handler(smtp_server)
    job = email_job("ok@example.com", "Busy <busy@example.com>")
    with pytest.raises(RetryLater) as caught:
        await handler.handle(job, context())
    assert caught.value.status == 452
    replacement = caught.value.replacement
    assert isinstance(replacement, EmailJob)
    assert replacement.payload.to == ["Busy <busy@example.com>"]
    assert replacement.payload.subject == job.payload.subject
    assert smtp_server.received[0].rcpt_tos == ["ok@example.com"]


async def test_4xx_on_mail_is_retryable_and_5xx_on_data_is_permanent(
    smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """A 451 to MAIL FROM retries the job; a 554 to DATA dead-letters it."""
    handler = await make_handler(smtp_server)
    smtp_server.script.mail = ["451 4.3.0 try later", "250 OK"]
    with pytest.raises(RetryLater) as caught:
        await handler.handle(email_job(), context())
    assert caught.value.status == 451
    smtp_server.script.data = ["554 5.7.1 looks like spam"]
    failure = await fails_with(handler, email_job(), "RECIPIENT_REJECTED")
    assert failure.status == 554
    assert handler.suppression.suppressed(["owner@example.com"]) == set()


async def test_an_unreachable_server_is_retryable(make_handler: HandlerFactory) -> None:
    """Connection refused: RetryLater, never a dead letter on the first try."""
    handler = await make_handler(None)
    with pytest.raises(RetryLater, match="cannot connect"):
        await handler.handle(email_job(), context())


# --- suppression ----------------------------------------------------------------------------------


async def test_suppressed_recipients_are_skipped(
    smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """A suppressed address gets no RCPT; the others still get the mail."""
    handler = await make_handler(smtp_server)
    await handler.suppression.add("muted@example.com", reason="test", status=None, source="cli")
    await handler.handle(email_job("MUTED@example.com", "ok@example.com"), context())
    assert smtp_server.rcpt_commands == ["ok@example.com"]


async def test_a_job_with_only_suppressed_recipients_is_suppressed_without_smtp(
    smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """Nobody left to send to: SUPPRESSED, and the SMTP server is never contacted."""
    handler = await make_handler(smtp_server)
    await handler.suppression.add("muted@example.com", reason="test", status=None, source="cli")
    failure = await fails_with(handler, email_job("muted@example.com"), "SUPPRESSED")
    assert not failure.reached_service
    assert smtp_server.connections == 0


async def test_an_address_added_from_outside_is_honoured_within_the_refresh_interval(
    tmp_path: Path, smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """`suppression add` while the daemon runs: its next job to that address is skipped."""
    handler = await make_handler(smtp_server)
    outside = SuppressionStore.in_dir(tmp_path / "var")
    outside.add("late@example.com", reason="operator", source="cli")
    outside.close()
    deadline = time.monotonic() + 3
    while not handler.suppression.suppressed(["late@example.com"]):
        assert time.monotonic() < deadline, "the change was never picked up"
        await asyncio.sleep(0.05)
    await fails_with(handler, email_job("late@example.com"), "SUPPRESSED")


def test_the_suppression_store_survives_reopening(tmp_path: Path) -> None:
    """Entries are on disk: a new store on the same folder still has them."""
    store = SuppressionStore.in_dir(tmp_path)
    assert store.add("Ada@Example.com", reason="550 gone", status=550, source="smtp")
    store.close()
    again = SuppressionStore.in_dir(tmp_path)
    [entry] = again.entries()
    assert (entry.address, entry.status, entry.source) == ("ada@example.com", 550, "smtp")
    assert again.remove("ada@example.com")
    assert not again.remove("ada@example.com")
    again.close()


# --- SMTP security and authentication -------------------------------------------------------------


async def test_starttls_with_a_self_signed_certificate(
    certificate: Certificate,
    smtp_factory: SmtpFactory,
    make_handler: HandlerFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """STARTTLS upgrades, verifies the certificate (trusted via SSL_CERT_FILE) and logs in."""
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate.cert))
    server = await smtp_factory(
        tls_context=certificate.server_context(), require_starttls=True, auth=True
    )
    handler = await make_handler(
        server, smtp_security="starttls", smtp_username=USERNAME, smtp_password=PASSWORD
    )
    await handler.handle(email_job(), context())
    assert server.received[0].tls


async def test_starttls_refuses_an_untrusted_certificate(
    certificate: Certificate, smtp_factory: SmtpFactory, make_handler: HandlerFactory
) -> None:
    """A certificate the system does not trust is a retryable connection failure."""
    server = await smtp_factory(tls_context=certificate.server_context(), require_starttls=True)
    handler = await make_handler(server, smtp_security="starttls")
    with pytest.raises(RetryLater, match="cannot connect"):
        await handler.handle(email_job(), context())
    assert server.received == []


async def test_refused_credentials_are_permanent_and_raise_an_alert(
    certificate: Certificate,
    smtp_factory: SmtpFactory,
    make_handler: HandlerFactory,
    monkeypatch: pytest.MonkeyPatch,
    alerts: list[logging.LogRecord],
) -> None:
    """AUTH refused: AUTH_REVOKED with the 535, an alert log line, and no password anywhere."""
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate.cert))
    server = await smtp_factory(
        tls_context=certificate.server_context(), require_starttls=True, auth=True
    )
    wrong = "wrong-password-xyz"
    handler = await make_handler(
        server, smtp_security="starttls", smtp_username=USERNAME, smtp_password=wrong
    )
    failure = await fails_with(handler, email_job(), "AUTH_REVOKED")
    assert failure.status == 535
    [alert] = [r for r in alerts if getattr(r, "alert", None) == "smtp_auth_failed"]
    assert alert.levelno == logging.ERROR
    logged = " ".join(r.getMessage() for r in alerts) + failure.reason
    assert wrong not in logged


# --- the connection pool --------------------------------------------------------------------------


async def test_connections_are_kept_open_and_reused(
    smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """Ten jobs one after another use a single SMTP connection."""
    handler = await make_handler(smtp_server)
    for i in range(10):
        await handler.handle(email_job(), context(f"job-{i}"))
    assert len(smtp_server.received) == 10
    assert smtp_server.connections == 1


async def test_the_pool_never_opens_more_connections_than_its_size(
    smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """Twenty concurrent jobs with concurrency 3 share at most three connections."""
    handler = await make_handler(smtp_server, concurrency=3)
    await asyncio.gather(*(handler.handle(email_job(), context(f"j{i}")) for i in range(20)))
    assert len(smtp_server.received) == 20
    assert smtp_server.peak <= 3
    assert smtp_server.connections <= 3


async def test_idle_connections_are_closed_after_the_idle_timeout(
    smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """A connection unused for idle_timeout_s is closed (politely, with QUIT)."""
    handler = await make_handler(smtp_server, idle_timeout_s=0.2)
    await handler.handle(email_job(), context())
    assert len(smtp_server.open) == 1
    deadline = time.monotonic() + 3
    while smtp_server.open:
        assert time.monotonic() < deadline, "the idle connection was never closed"
        await asyncio.sleep(0.05)
    assert handler.pool.idle == 0


async def test_a_connection_dropped_by_the_server_is_replaced_transparently(
    smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """After the server drops idle connections, the next job reconnects and succeeds."""
    handler = await make_handler(smtp_server)
    await handler.handle(email_job(), context("a"))
    smtp_server.drop_connections()
    await asyncio.sleep(0.05)
    await handler.handle(email_job(), context("b"))
    assert len(smtp_server.received) == 2
    assert smtp_server.connections == 2


async def test_a_421_to_mail_on_a_kept_open_connection_is_redone_on_a_fresh_one(
    smtp_server: SmtpServer,
) -> None:
    """A server that timed the session out answers 421: the pool reconnects once, no failure."""
    pool = SmtpPool(SmtpSettings("127.0.0.1", smtp_server.port, "none", "", "", 5.0), 2)
    await pool.start()
    try:
        await pool.send("a@example.com", ["b@example.com"], b"Subject: 1\r\n\r\none\r\n")
        smtp_server.script.mail = ["421 4.4.2 idle timeout", "250 OK"]
        replies = await pool.send("a@example.com", ["b@example.com"], b"Subject: 2\r\n\r\n2\r\n")
    finally:
        await pool.aclose()
    assert replies.accepted == ("b@example.com",)
    assert pool.opened == 2
    assert len(smtp_server.received) == 2


async def test_a_connection_lost_during_data_is_retryable(
    smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """A drop after DATA may or may not have delivered: RetryLater, never a silent success."""
    smtp_server.script.drop_at_data = 1
    handler = await make_handler(smtp_server)
    with pytest.raises(RetryLater, match="DATA"):
        await handler.handle(email_job(), context())
    await handler.handle(email_job(), context())
    assert len(smtp_server.received) == 1


async def test_reconfigure_moves_new_mail_to_the_new_relay(
    tmp_path: Path, smtp_factory: SmtpFactory, make_handler: HandlerFactory
) -> None:
    """After a reload names another relay, the next job goes there on a new connection."""
    first, second = await smtp_factory(), await smtp_factory()
    handler = await make_handler(first)
    await handler.handle(email_job(), context("a"))
    section = {"smtp_host": "127.0.0.1", "smtp_port": second.port, "state_dir": str(tmp_path)}
    handler.reconfigure(make_config(Names(), email=section).workers.email)
    await handler.handle(email_job(), context("b"))
    assert (len(first.received), len(second.received)) == (1, 1)
    assert handler.breaker_key(email_job()) == f"smtp:127.0.0.1:{second.port}"


def test_the_breaker_key_names_the_relay(tmp_path: Path) -> None:
    """Breaker key: `smtp:<host>:<port>`, host lowercased."""
    cfg = make_config(
        Names(), email={"smtp_host": "Relay.Example", "smtp_port": 587, "state_dir": str(tmp_path)}
    ).workers.email
    handler = EmailHandler(cfg, user_agent="formcraftd/test")
    assert handler.breaker_key(email_job()) == "smtp:relay.example:587"


# --- the suppression command line ---------------------------------------------------------------


def run_suppression_cli(tmp_path: Path, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="formcraftd")
    suppression.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["suppression", *argv])
    cfg = make_config(Names(), email={"state_dir": str(tmp_path)})
    return suppression.run_cli(args, cfg)


def test_the_command_line_adds_lists_and_removes_addresses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`suppression add`, `list` and `remove` work on the list in state_dir, exit 0."""
    assert run_suppression_cli(tmp_path, "add", "Ada@Example.com", "--reason", "asked") == 0
    assert run_suppression_cli(tmp_path, "list") == 0
    listed = capsys.readouterr().out.splitlines()[-1].split("\t")
    assert (listed[0], listed[3], listed[4]) == ("ada@example.com", "cli", "asked")
    assert run_suppression_cli(tmp_path, "remove", "ada@example.com") == 0
    assert run_suppression_cli(tmp_path, "list", "--json") == 0
    assert capsys.readouterr().out.strip().endswith("removed")


@pytest.mark.parametrize(
    "argv", [("add", "not-an-address"), ("remove", "nobody@example.com"), ("add", "a@b\nc")]
)
def test_the_command_line_refuses_bad_input_with_exit_1(
    argv: tuple[str, ...], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An invalid address, or removing one that is not listed: one line on stderr, exit 1."""
    assert run_suppression_cli(tmp_path, *argv) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("formcraftd: ")
