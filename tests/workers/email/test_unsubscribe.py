"""RFC 8058 one-click unsubscribe headers, as a real SMTP server receives them."""

from __future__ import annotations

import logging

import pytest

from formcraftd.core.config_checks import check_unsubscribe_url
from formcraftd.core.errors import ConfigError, RetryLater
from formcraftd.core.jobs import EmailJob
from formcraftd.workers.email import mime
from tests.support import Names, make_config
from tests.support.smtp import HandlerFactory, Received, SmtpServer, email_job, job_context

pytestmark = [pytest.mark.email]

PER_RECIPIENT = "https://app.example/forms/{form_id}/notifications/unsubscribe?email={recipient}"
PER_JOB = "https://app.example/u?form={form_id}&submission={submission_id}&job={job_id}"


def header_lines(received: Received) -> list[bytes]:
    """The header block as sent, one physical line each."""
    head = received.data.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]
    return head.split(b"\n")


def unsubscribe_of(received: Received) -> str:
    """The URL in List-Unsubscribe, the header unfolded, angle brackets checked and dropped.

    A folded header starts with the folding white space, which is not part of the value.
    """
    value = str(received.message["List-Unsubscribe"]).strip()
    assert value.startswith("<") and value.endswith(">"), value
    return value[1:-1]


async def test_every_mail_carries_list_unsubscribe_and_one_click_post(
    smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """The URL with the values percent-encoded, and List-Unsubscribe-Post as RFC 8058 spells it."""
    handler = await make_handler(smtp_server, unsubscribe_url=PER_RECIPIENT)
    await handler.handle(email_job("Ada <ada+forms@example.com>", form_id="f/1 2"), job_context())
    [received] = smtp_server.received
    assert unsubscribe_of(received) == (
        "https://app.example/forms/f%2F1%202/notifications/unsubscribe"
        "?email=ada%2Bforms%40example.com"
    )
    assert received.message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


async def test_without_a_template_no_unsubscribe_header_is_sent(
    smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    handler = await make_handler(smtp_server)
    await handler.handle(email_job(), job_context())
    [received] = smtp_server.received
    assert received.message["List-Unsubscribe"] is None
    assert received.message["List-Unsubscribe-Post"] is None


async def test_each_recipient_gets_a_copy_with_their_own_link(
    smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """With {recipient} in the URL, one message per recipient, each To: and link their own."""
    handler = await make_handler(smtp_server, unsubscribe_url=PER_RECIPIENT)
    recipients = ("a@example.com", "B <b@example.com>", "c@example.com")
    await handler.handle(email_job(*recipients), job_context("job-7"))
    by_recipient = {tuple(r.rcpt_tos): r for r in smtp_server.received}
    assert set(by_recipient) == {("a@example.com",), ("b@example.com",), ("c@example.com",)}
    for (address,), received in by_recipient.items():
        assert address in str(received.message["To"])
        assert unsubscribe_of(received).endswith("?email=" + address.replace("@", "%40"))
        assert received.message["Message-ID"] == "<job-7@localhost>"


async def test_a_url_without_the_recipient_keeps_one_message_for_all(
    smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    handler = await make_handler(smtp_server, unsubscribe_url=PER_JOB)
    await handler.handle(
        email_job("a@example.com", "b@example.com", submission_id="s 1"), job_context("j1")
    )
    [received] = smtp_server.received
    assert received.rcpt_tos == ["a@example.com", "b@example.com"]
    assert unsubscribe_of(received) == "https://app.example/u?form=form-1&submission=s%201&job=j1"


async def test_a_long_url_is_folded_onto_its_own_line_and_arrives_whole(
    smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """A header over 78 characters is folded after the colon, never inside the URL."""
    handler = await make_handler(smtp_server, unsubscribe_url=PER_RECIPIENT + "&sig={job_id}")
    job_id = "x" * 200
    await handler.handle(email_job(form_id="f" * 300), job_context(job_id))
    [received] = smtp_server.received
    lines = header_lines(received)
    assert all(len(line) <= 998 for line in lines)
    at = lines.index(b"List-Unsubscribe: ") if b"List-Unsubscribe: " in lines else -1
    assert at >= 0, lines
    assert lines[at + 1].startswith(b" <https://app.example/forms/fff")
    assert unsubscribe_of(received).endswith("&sig=" + job_id)
    assert "f" * 300 in unsubscribe_of(received)


async def test_a_url_too_long_for_a_header_line_is_left_out_with_a_warning(
    smtp_server: SmtpServer, make_handler: HandlerFactory, alerts: list[logging.LogRecord]
) -> None:
    """The mail still goes, without the headers, rather than with a broken line."""
    handler = await make_handler(smtp_server, unsubscribe_url=PER_RECIPIENT)
    await handler.handle(email_job(form_id="f" * 1000), job_context())
    [received] = smtp_server.received
    assert received.message["List-Unsubscribe"] is None
    assert all(len(line) <= 998 for line in header_lines(received))
    assert any("unsubscribe URL" in r.getMessage() for r in alerts)


async def test_a_copy_refused_at_data_does_not_stop_the_others(
    smtp_server: SmtpServer, make_handler: HandlerFactory, alerts: list[logging.LogRecord]
) -> None:
    """Per-recipient copies: a 554 to one copy's DATA is logged, the others are delivered."""
    smtp_server.script.data = ["554 5.7.1 looks like spam", "250 OK"]
    handler = await make_handler(smtp_server, unsubscribe_url=PER_RECIPIENT)
    await handler.handle(email_job("a@example.com", "b@example.com"), job_context())
    assert smtp_server.mail_commands == 2
    assert any("refused" in r.getMessage() for r in alerts)
    assert handler.suppression.suppressed(["a@example.com"]) == set()


async def test_a_connection_lost_after_some_copies_retries_only_the_others(
    smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """a got their copy; a 421 at b's RCPT: the retried job carries b and c, never a."""
    smtp_server.script.rcpt["b@example.com"] = ["421 4.3.2 closing"]
    handler = await make_handler(smtp_server, unsubscribe_url=PER_RECIPIENT)
    with pytest.raises(RetryLater) as caught:
        await handler.handle(
            email_job("a@example.com", "b@example.com", "c@example.com"), job_context()
        )
    replacement = caught.value.replacement
    assert isinstance(replacement, EmailJob)
    assert replacement.payload.to == ["b@example.com", "c@example.com"]
    assert [r.rcpt_tos for r in smtp_server.received] == [["a@example.com"]]
    assert "1 of 3 recipients have the mail" in caught.value.reason


def test_the_url_template_fills_in_percent_encoded_values() -> None:
    url = mime.unsubscribe_url(
        PER_JOB, form_id="a&b", submission_id="?", job_id="sha256:ab", recipient="x@y.z"
    )
    assert url == "https://app.example/u?form=a%26b&submission=%3F&job=sha256%3Aab"


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("http://app.example/u?e={recipient}", "https"),
        ("https://app.example/u?e={email}", "unknown placeholder {email}"),
        ("https://app.example/u?e={recipient!r}", "no conversion"),
        ("https://{form_id}.app.example/u", "path and query"),
        ("https://app.example/u?e={recipient", "not a template"),
        ("https://app.example/u e={recipient}", "URL characters"),
        ("https://app.example/<{recipient}>", "URL characters"),
        ("mailto:unsubscribe@app.example", "https"),
    ],
)
def test_a_bad_template_is_a_config_error_naming_the_key(template: str, problem: str) -> None:
    assert problem in check_unsubscribe_url(template)
    with pytest.raises(ConfigError) as caught:
        make_config(Names(), email={"unsubscribe_url": template})
    assert "key workers.email.unsubscribe_url" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_good_templates_are_accepted() -> None:
    for template in (PER_RECIPIENT, PER_JOB, "https://app.example:8443/u/{job_id}#x"):
        assert check_unsubscribe_url(template) == ""
