"""Templates: the shipped ones, operator files and the job's subject, in the sandbox."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from formcraftd.workers.email.plaintext import html_to_text
from formcraftd.workers.email.templating import RenderDeferred, TemplateRenderer
from tests.support import Names, make_config
from tests.support.smtp import (
    HandlerFactory,
    SmtpServer,
    email_job,
    fails_with,
    job_context,
)

pytestmark = [pytest.mark.email]


# --- rendering ------------------------------------------------------------------------------------


async def test_notification_is_multipart_with_escaped_html_text_part_and_rendered_subject(
    smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """The shipped notification: text + HTML alternatives, answers escaped in HTML only."""
    handler = await make_handler(smtp_server)
    await handler.handle(email_job(), job_context())
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
    await handler.handle(job, job_context())
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
    job = email_job(template="hello", subject="Hi", data={"name": "Ada"})
    await handler.handle(job, job_context())
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
    await handler.handle(email_job(template="t"), job_context())
    (folder / "t.html").write_text("<p>second</p>")
    await handler.handle(email_job(template="t"), job_context())
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
    await handler.handle(email_job(template="t"), job_context())
    bodies = [r.message.get_body(("html",)).get_content() for r in smtp_server.received]  # type: ignore[union-attr]
    assert ["first" in b for b in bodies] == [True, True, False]
    assert "second" in bodies[2]
