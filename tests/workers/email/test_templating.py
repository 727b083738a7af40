"""Templates: the shipped ones, operator files in the sandbox, and the subject's syntax."""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from pathlib import Path
from typing import Any

import pytest

from formcraftd.core.errors import RetryLater
from formcraftd.workers.email.handler import EmailHandler
from formcraftd.workers.email.plaintext import html_to_text
from formcraftd.workers.email.templating import TemplateFailure, TemplateRenderer
from tests.support import Names, make_config
from tests.support.smtp import (
    SAMPLE_DATA,
    HandlerFactory,
    SmtpServer,
    email_job,
    fails_with,
    job_context,
)

pytestmark = [pytest.mark.email]


def template_folder(tmp_path: Path, **files: str) -> str:
    """A templates_dir holding `files` (name without extension -> HTML source)."""
    folder = tmp_path / "tpl"
    folder.mkdir(exist_ok=True)
    for name, source in files.items():
        (folder / f"{name}.html").write_text(source)
    return str(folder)


def peak_rss_mb() -> float:
    """The most memory this process has held so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rendered_subject(subject: str, data: dict[str, Any] | None = None) -> str:
    """The subject as the shipped notification's renderer produces it."""
    renderer = TemplateRenderer()
    data = SAMPLE_DATA if data is None else data
    return renderer.render("submission-notification", subject, data, form_id="form-1").subject


# --- the shipped templates ------------------------------------------------------------------------


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
    folder = template_folder(
        tmp_path,
        hello="<html><head><style>p {}</style></head><body><h1>Hi {{ data.name }}</h1>"
        "<p>See <a href='https://example.com/x'>your answers</a>.</p></body></html>",
    )
    handler = await make_handler(smtp_server, templates_dir=folder)
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
        (
            "submission-notification",
            "{% if %}",
            {},
            'subject of template "submission-notification": syntax error on line 1',
        ),
        ("submission-notification", "{{ unknown_variable }}", {}, "unknown_variable"),
        ("broken", "s", {}, "broken.html: syntax error on line 2"),
    ],
)
async def test_template_problems_are_template_errors_and_send_nothing(
    template: str,
    subject: str,
    data: dict[str, Any],
    why: str,
    tmp_path: Path,
    smtp_server: SmtpServer,
    make_handler: HandlerFactory,
) -> None:
    """Missing template, undefined variable or bad syntax: TEMPLATE_ERROR, no SMTP at all."""
    folder = template_folder(tmp_path, broken="<p>\n{% for %}</p>")
    if template == "submission-notification":
        folder = ""  # the shipped templates
    handler = await make_handler(smtp_server, templates_dir=folder)
    job = email_job(template=template, subject=subject, data=data)
    failure = await fails_with(handler, job, "TEMPLATE_ERROR")
    assert why in failure.reason
    assert not failure.reached_service
    assert smtp_server.connections == 0


def test_an_error_in_the_subject_names_the_subject_not_the_template_file(
    tmp_path: Path,
) -> None:
    """An undefined name in the job's subject is reported against the subject of the template."""
    renderer = TemplateRenderer(template_folder(tmp_path, x="<p>{{ subject }}</p>"))
    with pytest.raises(TemplateFailure) as caught:
        renderer.render("x", "Hello {{ missing }}", {})
    assert str(caught.value) == (
        "subject of template \"x\": UndefinedError: 'missing' is undefined"
    )


# --- the subject's syntax -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("Plain text, {# a comment #}no substitution", "Plain text, no substitution"),
        ("New: {{ data.form_name }}", "New: Contact us"),
        ("{{ form_name }} / {{ data['form_name'] }}", "Contact us / Contact us"),
        ("{{ data.answers[0].value }} ({{ form_id }})", "Ada Lovelace (form-1)"),
        ("{{ form_name|upper }} {{ form_name|lower|title }}", "CONTACT US Contact Us"),
        ("{{ data.missing|default('none') }} {{ data.missing|d('-', true) }}", "none -"),
        ("{{ answers[1].value|truncate(12, true, '...', 0) }}", "<script>a..."),
        ("{{ form_name|capitalize|trim }}", "Contact us"),
    ],
)
def test_subjects_in_the_restricted_syntax_render(subject: str, expected: str) -> None:
    """Plain text, paths with attributes and constant keys, whitelisted filters with constants."""
    assert rendered_subject(subject) == expected


HOSTILE_SUBJECTS = [
    pytest.param(
        "{{ ('x'.encode() * 300000000)|length }}", "filter 'length'", id="bytes-times-3e8"
    ),
    pytest.param("{{ data.l|tojson(3000) }}", "filter 'tojson'", id="tojson-indent-3000"),
    pytest.param("{{ '{0.__class__}'.format(data) }}", "calls are not allowed", id="str-format"),
    pytest.param("{{ 9 ** (9 ** 9) }}", "operators are not allowed", id="power-tower"),
    pytest.param("{% for i in range(10**9) %}x{% endfor %}", "statements", id="loop"),
    pytest.param("{{ data.__class__ }}", "'__class__'", id="dunder-attribute"),
    pytest.param("{{ lipsum(1000) }}", "calls are not allowed", id="lipsum"),
]


@pytest.mark.parametrize(("subject", "why"), HOSTILE_SUBJECTS)
async def test_hostile_subjects_are_refused_before_rendering_without_allocating(
    subject: str, why: str, smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """Each bomb or escape is a TEMPLATE_ERROR naming the subject, with no memory spent on it."""
    handler = await make_handler(smtp_server)
    data = {**SAMPLE_DATA, "l": [[0] * 100] * 1000}  # tojson(3000) of this: ~600 MB
    job = email_job(subject=subject, data=data)
    before = peak_rss_mb()
    failure = await fails_with(handler, job, "TEMPLATE_ERROR")
    assert peak_rss_mb() - before < 20
    assert failure.reason.startswith('subject of template "submission-notification": ')
    assert why in failure.reason
    assert smtp_server.received == []


@pytest.mark.parametrize(
    ("subject", "why"),
    [
        ("{{ 'constant' }}", "not constants"),
        ("{{ form_name if data }}", "conditional expressions"),
        ("{{ form_name is defined }}", "tests"),
        ("{{ form_name ~ '!' }}", "operators"),
        ("{{ -data.count }}", "operators"),
        ("{{ form_name == 'x' }}", "operators"),
        ("{{ [form_name] }}", "literals"),
        ("{{ form_name|default(['x']) }}", "filter arguments must be constants"),
        ("{{ form_name|truncate(data.n) }}", "filter arguments must be constants"),
        ("{{ form_name|replace('a', 'b') }}", "filter 'replace'"),
        ("{{ data[form_name] }}", "keys must be constant"),
        ("{{ data.answers[0:2] }}", "keys must be constant"),
        ("{{ data['_private'] }}", "'_private'"),
        ("{{ _hidden }}", "'_hidden'"),
        ("{{ (form_name|lower).x }}", "a filter can only come last"),
        ("{% set x = 1 %}", "statements"),
    ],
)
def test_subjects_outside_the_syntax_are_refused_with_a_reason(subject: str, why: str) -> None:
    """Whatever the syntax does not allow is refused on the parsed subject, saying what."""
    with pytest.raises(TemplateFailure) as caught:
        rendered_subject(subject)
    assert str(caught.value).startswith('subject of template "submission-notification": ')
    assert why in str(caught.value)


def test_a_rendered_subject_over_998_characters_is_a_template_error() -> None:
    """A subject that renders longer than RFC 5322's line limit is refused."""
    data = {**SAMPLE_DATA, "long": "x" * 998}
    assert len(rendered_subject("{{ long }}", data)) == 998
    with pytest.raises(TemplateFailure, match=r"^subject of template .* over 998 characters$"):
        rendered_subject("{{ long }}!", data)


# --- what templates see ---------------------------------------------------------------------------


async def test_data_keys_are_seen_at_the_top_level_as_well_as_under_data(
    tmp_path: Path, smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """`{{ name }}` and `{{ data.name }}` both work, in the subject and in the files."""
    folder = template_folder(tmp_path, hi="<p>{{ name }}={{ data.name }} in {{ subject }}</p>")
    handler = await make_handler(smtp_server, templates_dir=folder)
    job = email_job(template="hi", subject="Hi {{ name }}", data={"name": "Ada"})
    await handler.handle(job, job_context())
    message = smtp_server.received[0].message
    assert message["Subject"] == "Hi Ada"
    html = message.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert html == "<p>Ada=Ada in Hi Ada</p>"


def test_the_job_fields_win_over_data_keys_of_the_same_name(tmp_path: Path) -> None:
    """`form_id`, `submission_id`, `subject` and `data` are the job's, whatever `data` holds."""
    source = (
        "{{ form_id }}|{{ submission_id }}|{{ subject }}|{{ data is mapping }}|{{ data.form_id }}"
    )
    renderer = TemplateRenderer(template_folder(tmp_path, fields=source))
    fields = ("form_id", "submission_id", "subject", "data")
    data = {name: f"from-data-{name}" for name in fields}
    subject = "{{ subject|default('no subject yet') }}"  # nor does the subject see data's
    rendered = renderer.render("fields", subject, data, form_id="form-9", submission_id="sub-9")
    assert rendered.subject == "no subject yet"
    assert rendered.html == "form-9|sub-9|no subject yet|True|from-data-form_id"


def test_jinja_globals_win_over_data_keys_of_the_same_name(tmp_path: Path) -> None:
    """A data key named `range`, `dict`, `namespace`, ... never hides the Jinja2 global."""
    source = (
        "{{ range(3)|join(',') }}|{{ dict(a=1)|list|join }}|{{ namespace(x=2).x }}"
        "|{{ cycler('c').next() }}|{{ joiner('j')() }}.|{{ lipsum(1, false, 1, 2) is string }}"
        "|{{ data.range }}"
    )
    renderer = TemplateRenderer(template_folder(tmp_path, globals=source))
    names = ("range", "dict", "namespace", "cycler", "joiner", "lipsum")
    rendered = renderer.render("globals", "{{ data.range }}", {name: "evil" for name in names})
    assert rendered.html == "0,1,2|a|2|c|.|True|evil"
    assert rendered.subject == "evil"


# --- template files: the sandbox, the timeout, the size cap ---------------------------------------


@pytest.mark.parametrize(
    ("source", "why"),
    [
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "SecurityError"),
        ("{{ data.__class__.__init__.__globals__ }}", "SecurityError"),
        ("{{ cycler.__init__.__globals__.os }}", "SecurityError"),
        ("{{ '{0.__class__}'.format(data) }}", "SecurityError"),
        ("{{ data.answers.append(1) }}", "SecurityError"),
        ("{% for i in range(10**9) %}x{% endfor %}", "OverflowError"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursion too deep"),
    ],
)
async def test_sandbox_violations_in_template_files_are_template_errors(
    source: str, why: str, tmp_path: Path, smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """Escapes, mutation of the job's data, huge ranges and recursion in a file: TEMPLATE_ERROR."""
    handler = await make_handler(smtp_server, templates_dir=template_folder(tmp_path, t=source))
    failure = await fails_with(handler, email_job(template="t"), "TEMPLATE_ERROR")
    assert failure.reason.startswith("t.html: ")
    assert why in failure.reason
    assert smtp_server.received == []


async def test_a_render_that_keeps_producing_output_stops_at_the_timeout_and_frees_its_thread(
    tmp_path: Path, smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """Loops that would run for hours end as TEMPLATE_ERROR at the deadline, thread released."""
    source = (
        "{% for a in range(99999) %}{% for b in range(99999) %}{{ '' }}{% endfor %}{% endfor %}"
    )
    folder = template_folder(tmp_path, endless=source)
    handler = await make_handler(smtp_server, templates_dir=folder, render_timeout_s=0.3)
    started = time.monotonic()
    failure = await fails_with(handler, email_job(template="endless"), "TEMPLATE_ERROR")
    assert "longer than 0.3 s" in failure.reason
    await until_render_threads_are_free(handler)
    assert time.monotonic() - started < 5


async def test_a_silent_overrunning_render_keeps_its_thread_and_later_jobs_are_retried(
    tmp_path: Path,
    smtp_server: SmtpServer,
    make_handler: HandlerFactory,
    alerts: list[logging.LogRecord],
) -> None:
    """A render looping without output cannot be stopped: jobs meanwhile retry, never fail."""
    silent = "{% for a in range(4000) %}{% for b in range(2500) %}{% set x = b %}{% endfor %}"
    folder = template_folder(tmp_path, silent=silent + "{% endfor %}", ok="<p>ok</p>")
    handler = await make_handler(
        smtp_server, templates_dir=folder, render_timeout_s=0.1, concurrency=1
    )
    failure = await fails_with(handler, email_job(template="silent"), "TEMPLATE_ERROR")
    assert "longer than 0.1 s" in failure.reason
    assert any("'silent'" in r.getMessage() for r in alerts if r.levelno == logging.WARNING)
    with pytest.raises(RetryLater, match="render threads"):
        await handler.handle(email_job(template="ok"), job_context())
    await until_render_threads_are_free(handler)
    await handler.handle(email_job(template="ok"), job_context())
    assert len(smtp_server.received) == 1


async def until_render_threads_are_free(handler: EmailHandler, timeout: float = 60) -> None:
    """Wait until no render thread is taken (an abandoned render has returned)."""
    deadline = time.monotonic() + timeout
    while handler.render_threads.busy > 0:
        assert time.monotonic() < deadline, "the render thread was never released"
        await asyncio.sleep(0.02)


async def test_oversized_output_is_a_template_error(
    tmp_path: Path, smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """A template whose output passes the size cap stops as TEMPLATE_ERROR."""
    folder = template_folder(tmp_path, big="{% for i in range(99999) %}{{ 'x' * 999 }}{% endfor %}")
    handler = await make_handler(smtp_server, templates_dir=folder)
    failure = await fails_with(handler, email_job(template="big"), "TEMPLATE_ERROR")
    assert "over 1000000 characters" in failure.reason


async def test_reconfigure_invalidates_the_template_cache(
    tmp_path: Path, smtp_server: SmtpServer, make_handler: HandlerFactory
) -> None:
    """An edited template is used only after reconfigure() (SIGHUP), not before."""
    folder = template_folder(tmp_path, t="<p>first</p>")
    handler = await make_handler(smtp_server, templates_dir=folder)
    await handler.handle(email_job(template="t"), job_context())
    template_folder(tmp_path, t="<p>second</p>")
    await handler.handle(email_job(template="t"), job_context())
    cfg = make_config(
        Names(),
        email={
            "smtp_host": "127.0.0.1",
            "smtp_port": smtp_server.port,
            "templates_dir": folder,
            "state_dir": str(tmp_path / "var"),
        },
    ).workers.email
    handler.reconfigure(cfg)
    await handler.handle(email_job(template="t"), job_context())
    bodies = [r.message.get_body(("html",)).get_content() for r in smtp_server.received]  # type: ignore[union-attr]
    assert ["first" in b for b in bodies] == [True, True, False]
    assert "second" in bodies[2]
