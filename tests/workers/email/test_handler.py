"""The email handler against real aiosmtpd servers on loopback (no broker involved)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest

from formcraftd.core.errors import ConfigError, RetryLater
from formcraftd.core.jobs import EmailJob
from formcraftd.workers.email.handler import EmailHandler
from formcraftd.workers.email.smtp_pool import SmtpPool, SmtpSettings
from tests.support import Names, make_config
from tests.support.smtp import (
    PASSWORD,
    SAMPLE_DATA,
    USERNAME,
    Certificate,
    HandlerFactory,
    SmtpFactory,
    SmtpServer,
    email_job,
    fails_with,
    job_context,
    make_certificate,
)

pytestmark = [pytest.mark.email]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """A self-signed certificate for 127.0.0.1."""
    return make_certificate(tmp_path_factory.mktemp("tls"))


# --- headers --------------------------------------------------------------------------------------


async def test_headers_carry_the_job_id_and_the_configured_sender(
    smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """From, Message-ID (from the job id), X-FormCraft-Job-Id, and an envelope sender."""
    handler = await make_handler(smtp_server, from_address="FormCraft <no-reply@forms.example>")
    await handler.handle(email_job(), job_context("3f2a9c"))
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
    await handler.handle(email_job(), job_context("job-42"))
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
    await handler.handle(email_job(attachments=files), job_context())
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


async def test_attachments_over_the_total_for_one_job_are_refused(
    attachments_dir: Path, smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """Files each under the per-file cap but together over the job's total: ATTACHMENT_ERROR."""
    for n in range(3):
        (attachments_dir / f"part{n}.bin").write_bytes(b"x" * 900)
    handler = await make_handler(
        smtp_server,
        attachments_dir=str(attachments_dir),
        max_attachment_bytes=1000,
        max_attachments_total_bytes=2000,
    )
    files = [{"filename": f"part{n}.bin", "path": f"part{n}.bin"} for n in range(3)]
    failure = await fails_with(handler, email_job(attachments=files), "ATTACHMENT_ERROR")
    assert "max_attachments_total_bytes" in failure.reason
    assert smtp_server.connections == 0
    within = await make_handler(
        smtp_server,
        attachments_dir=str(attachments_dir),
        max_attachment_bytes=1000,
        max_attachments_total_bytes=1800,
    )
    await within.handle(email_job(attachments=files[:2]), job_context())
    assert len(smtp_server.received) == 1


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
    job = email_job(attachments=[{"filename": "a.txt", "path": path}])
    await handler.handle(job, job_context())
    [part] = list(smtp_server.received[0].message.iter_attachments())
    assert part.get_payload(decode=True) == b"hello"


# --- per-recipient outcomes -----------------------------------------------------------------------


async def test_a_550_recipient_is_suppressed_while_the_others_get_the_mail(
    smtp_server: SmtpServer, make_handler: HandlerFactory, alerts: list[logging.LogRecord]
) -> None:
    """Accepted plus 5xx, no 4xx: success, and the refused address is suppressed."""
    smtp_server.script.rcpt["gone@example.com"] = ["550 5.1.1 no such user"]
    handler = await make_handler(smtp_server)
    await handler.handle(email_job("ok@example.com", "Gone@Example.com"), job_context())
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
        await handler.handle(job, job_context())
    assert caught.value.status == 452
    assert caught.value.code == "SMTP_TEMPORARY"
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
        await handler.handle(email_job(), job_context())
    assert caught.value.status == 451
    assert caught.value.code == "SMTP_TEMPORARY"
    smtp_server.script.data = ["554 5.7.1 looks like spam"]
    failure = await fails_with(handler, email_job(), "RECIPIENT_REJECTED")
    assert failure.status == 554
    assert handler.suppression.suppressed(["owner@example.com"]) == set()


async def test_an_unreachable_server_is_retryable(make_handler: HandlerFactory) -> None:
    """Connection refused: RetryLater, never a dead letter on the first try."""
    handler = await make_handler(None)
    with pytest.raises(RetryLater, match="cannot connect") as caught:
        await handler.handle(email_job(), job_context())
    assert caught.value.code == "SMTP_CONNECTION"


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
    await handler.handle(email_job(), job_context())
    assert server.received[0].tls


async def test_starttls_refuses_an_untrusted_certificate(
    certificate: Certificate, smtp_factory: SmtpFactory, make_handler: HandlerFactory
) -> None:
    """A certificate the system does not trust is a retryable connection failure."""
    server = await smtp_factory(tls_context=certificate.server_context(), require_starttls=True)
    handler = await make_handler(server, smtp_security="starttls")
    with pytest.raises(RetryLater, match="cannot connect"):
        await handler.handle(email_job(), job_context())
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
        await handler.handle(email_job(), job_context(f"job-{i}"))
    assert len(smtp_server.received) == 10
    assert smtp_server.connections == 1


async def test_the_pool_never_opens_more_connections_than_its_size(
    smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """Twenty concurrent jobs with concurrency 3 share at most three connections."""
    handler = await make_handler(smtp_server, concurrency=3)
    await asyncio.gather(*(handler.handle(email_job(), job_context(f"j{i}")) for i in range(20)))
    assert len(smtp_server.received) == 20
    assert smtp_server.peak <= 3
    assert smtp_server.connections <= 3


async def test_idle_connections_are_closed_after_the_idle_timeout(
    smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """A connection unused for idle_timeout_s is closed (politely, with QUIT)."""
    handler = await make_handler(smtp_server, idle_timeout_s=0.2)
    await handler.handle(email_job(), job_context())
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
    await handler.handle(email_job(), job_context("a"))
    smtp_server.drop_connections()
    await asyncio.sleep(0.05)
    await handler.handle(email_job(), job_context("b"))
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
        await handler.handle(email_job(), job_context())
    await handler.handle(email_job(), job_context())
    assert len(smtp_server.received) == 1


async def test_reconfigure_moves_new_mail_to_the_new_relay(
    tmp_path: Path, smtp_factory: SmtpFactory, make_handler: HandlerFactory
) -> None:
    """After a reload names another relay, the next job goes there on a new connection."""
    first, second = await smtp_factory(), await smtp_factory()
    handler = await make_handler(first)
    await handler.handle(email_job(), job_context("a"))
    section = {"smtp_host": "127.0.0.1", "smtp_port": second.port, "state_dir": str(tmp_path)}
    handler.reconfigure(make_config(Names(), email=section).workers.email)
    await handler.handle(email_job(), job_context("b"))
    assert (len(first.received), len(second.received)) == (1, 1)
    assert handler.breaker_key(email_job()) == f"smtp:127.0.0.1:{second.port}"


def test_the_breaker_key_names_the_relay(tmp_path: Path) -> None:
    """Breaker key: `smtp:<host>:<port>`, host lowercased."""
    cfg = make_config(
        Names(), email={"smtp_host": "Relay.Example", "smtp_port": 587, "state_dir": str(tmp_path)}
    ).workers.email
    handler = EmailHandler(cfg, user_agent="formcraftd/test")
    assert handler.breaker_key(email_job()) == "smtp:relay.example:587"
