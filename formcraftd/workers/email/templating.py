"""Email templates: files in Jinja2's immutable sandbox, subjects in a restricted syntax.

Template files (`<name>.html`, optional `<name>.txt`) are the operator's own
or the shipped ones. They render in an ``ImmutableSandboxedEnvironment``
(no Python internals, no mutation of the job's data) with ``StrictUndefined``
(an unknown variable is an error, not an empty string) and HTML autoescape
for ``.html``; what bounds their cost is the render timeout and the size cap
on each body. The subject comes with the job, so it is the one piece of
template *source* a publisher controls: it must keep to the syntax of
:mod:`formcraftd.workers.email.subjects`, checked on the parsed template
before anything renders.

:meth:`TemplateRenderer.render` is blocking: the worker calls it in a render
thread (:mod:`formcraftd.workers.email.render_threads`). Compiled templates
are cached for the renderer's lifetime; a reload builds a new renderer, which
is how the cache is invalidated.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from cachetools import LRUCache
from jinja2.sandbox import ImmutableSandboxedEnvironment

from formcraftd.core.errors import FormcraftError
from formcraftd.workers.email import subjects
from formcraftd.workers.email.plaintext import html_to_text

__all__ = [
    "MAX_RENDERED_CHARS",
    "MAX_SUBJECT_CHARS",
    "PACKAGE_TEMPLATES",
    "RENDER_TIMEOUT_S",
    "RESERVED_NAMES",
    "Rendered",
    "TemplateFailure",
    "TemplateRenderer",
]

PACKAGE_TEMPLATES = Path(__file__).parent / "templates"
MAX_RENDERED_CHARS = 1_000_000  # per rendered body
MAX_SUBJECT_CHARS = 998  # RFC 5322's line limit: a longer subject is an error
RENDER_TIMEOUT_S = 2.0  # subject + HTML + text of one job
_SUBJECT_CACHE_SIZE = 256
_TEMPLATE_CACHE_SIZE = 128  # names are checked by the job schema, but spellings can vary
# What templates see besides the keys of `payload.data`; these win over a data key.
RESERVED_NAMES = frozenset({"data", "form_id", "submission_id", "subject"})


class TemplateFailure(FormcraftError):
    """A template could not be rendered: missing, invalid, refused, undefined name, limits."""


@dataclass(frozen=True, slots=True)
class Rendered:
    subject: str
    html: str
    text: str


@dataclass(frozen=True, slots=True)
class _Compiled:
    html: jinja2.Template
    text: jinja2.Template | None  # None: derive the text part from the HTML


class TemplateRenderer:
    """Renders a job's subject, HTML and text from one template folder (thread-safe)."""

    def __init__(
        self,
        templates_dir: str | Path = "",
        *,
        max_chars: int = MAX_RENDERED_CHARS,
        timeout_s: float = RENDER_TIMEOUT_S,
    ) -> None:
        folder = Path(templates_dir) if templates_dir else PACKAGE_TEMPLATES
        self.folder = folder
        self.max_chars = max_chars
        self.timeout_s = timeout_s
        self._env = ImmutableSandboxedEnvironment(
            loader=jinja2.FileSystemLoader(folder),
            undefined=jinja2.StrictUndefined,
            autoescape=jinja2.select_autoescape(
                enabled_extensions=("html", "htm"), default_for_string=False
            ),
            auto_reload=False,  # compiled templates live until the next reload (SIGHUP)
            keep_trailing_newline=True,
        )
        self._hidden = frozenset(self._env.globals) | RESERVED_NAMES
        self._lock = threading.Lock()  # the caches are shared by the render threads
        self._templates: LRUCache[str, _Compiled] = LRUCache(maxsize=_TEMPLATE_CACHE_SIZE)
        self._subjects: LRUCache[str, jinja2.Template] = LRUCache(maxsize=_SUBJECT_CACHE_SIZE)

    def render(
        self,
        template: str,
        subject: str,
        data: Mapping[str, Any],
        *,
        form_id: str = "",
        submission_id: str = "",
    ) -> Rendered:
        """Render the subject, then the HTML and text (blocking); raises :class:`TemplateFailure`.

        A body that keeps producing output past the timeout stops there, which
        frees its thread; one that loops without output runs on, abandoned.
        """
        deadline = time.monotonic() + self.timeout_s
        context = self._context(data, form_id=form_id, submission_id=submission_id)
        rendered_subject = self._render_subject(subject, context, template)
        context = {**context, "subject": rendered_subject}
        try:
            compiled = self._compiled(template)
        except Exception as exc:  # not found, a syntax error, an unreadable file
            raise TemplateFailure(_describe(template, exc)) from None
        html = self._generate(compiled.html, context, deadline)
        if compiled.text is None:
            text = html_to_text(html)
        else:
            text = self._generate(compiled.text, context, deadline)
        return Rendered(subject=rendered_subject.strip(), html=html, text=text)

    def _context(
        self, data: Mapping[str, Any], *, form_id: str, submission_id: str
    ) -> dict[str, Any]:
        """The keys of `data`, then `data`, `form_id` and `submission_id` (`subject` comes later).

        A data key named like one of those four, or like a Jinja2 global
        (`range`, `dict`, `lipsum`, `cycler`, `joiner`, `namespace`), is left
        out at the top level, so a job cannot shadow the names templates rely on.
        """
        context = {key: value for key, value in data.items() if key not in self._hidden}
        context.update(data=data, form_id=form_id, submission_id=submission_id)
        return context

    def _render_subject(self, source: str, context: dict[str, Any], template: str) -> str:
        """The rendered subject; a failure names the subject, not the template file.

        The subject is the job's, not the file's, so its errors say so:
        `subject of template "<template>": ...`.
        """
        where = f'subject of template "{template}"'
        try:
            parsed = self._subject(source)
            if isinstance(parsed, str):
                raise TemplateFailure(f"{where}: {parsed}")
            rendered = parsed.render(context)
        except TemplateFailure:
            raise
        except Exception as exc:
            raise TemplateFailure(_describe(where, exc)) from None
        if len(rendered) > MAX_SUBJECT_CHARS:
            raise TemplateFailure(
                f"{where}: the rendered subject is over {MAX_SUBJECT_CHARS} characters"
            )
        return rendered

    def _subject(self, source: str) -> jinja2.Template | str:
        """The compiled subject, or why the subject syntax refuses it (checked first)."""
        with self._lock:
            compiled = self._subjects.get(source)
        if compiled is not None:
            return compiled
        parsed = self._env.parse(source)
        refused = subjects.refusal(parsed)
        if refused is not None:
            return refused
        compiled = self._env.from_string(parsed)
        with self._lock:
            self._subjects[source] = compiled
        return compiled

    def _compiled(self, name: str) -> _Compiled:
        with self._lock:
            compiled = self._templates.get(name)
        if compiled is not None:
            return compiled
        html = self._env.get_template(f"{name}.html")
        try:
            text: jinja2.Template | None = self._env.get_template(f"{name}.txt")
        except jinja2.TemplateNotFound:
            text = None
        compiled = _Compiled(html, text)
        with self._lock:
            self._templates[name] = compiled
        return compiled

    def _generate(self, template: jinja2.Template, context: dict[str, Any], deadline: float) -> str:
        """Render piece by piece, stopping past `max_chars` characters or the deadline."""
        name = template.name or "template"
        parts: list[str] = []
        size = 0
        try:
            for part in template.generate(context):
                size += len(part)
                if size > self.max_chars:
                    raise TemplateFailure(
                        f"{name}: rendered output is over {self.max_chars} characters"
                    )
                if time.monotonic() > deadline:
                    raise TemplateFailure(
                        f"{name}: rendering took longer than {self.timeout_s:g} s"
                    )
                parts.append(part)
        except TemplateFailure:
            raise
        except Exception as exc:  # template code can raise anything; all of it is TEMPLATE_ERROR
            raise TemplateFailure(_describe(name, exc)) from None
        return "".join(parts)


def _describe(where: str, exc: Exception) -> str:
    """The one-line TEMPLATE_ERROR reason for whatever parsing or rendering raised."""
    if isinstance(exc, jinja2.TemplateNotFound):
        return f"template {exc.name!r} not found"
    if isinstance(exc, jinja2.TemplateSyntaxError):
        if exc.name:
            where = exc.name
        return f"{where}: syntax error on line {exc.lineno}: {_one_line(exc.message)}"
    if isinstance(exc, RecursionError):
        return f"{where}: recursion too deep"
    if isinstance(exc, MemoryError):
        return f"{where}: out of memory while rendering"
    return f"{where}: {type(exc).__name__}: {_one_line(exc)}"


def _one_line(value: object) -> str:
    return " ".join(str(value).split())[:300]
