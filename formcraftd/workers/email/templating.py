"""Email templates: a guarded Jinja2 sandbox, with caps on time and size.

Templates live in a folder (`<name>.html`, optional `<name>.txt`); the subject
comes with the job and is a template too, so it is the one piece of template
*source* a publisher controls. Everything renders in an
``ImmutableSandboxedEnvironment`` with ``StrictUndefined`` (an unknown
variable is an error, not an empty string) and HTML autoescape for ``.html``.

The sandbox stops attribute escapes, not resource exhaustion, so
:class:`GuardedEnvironment` adds a *budget* per render (a deadline and size
caps, :mod:`formcraftd.render_guard`): it is checked on every call, filter,
intercepted operator, concatenation, loop iteration and output chunk, and
operations that multiply sizes (``*``, ``**``, ``%``, ``replace``, ``join``,
``indent``, ...) are checked *before* they allocate. A render that runs out
of budget raises :class:`TemplateFailure` like any other template problem.

Rendering is blocking CPU work: the worker calls :meth:`TemplateRenderer.render`
in a thread. Compiled templates are cached for the renderer's lifetime; a
reload builds a new renderer, which is how the cache is invalidated.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.sandbox import ImmutableSandboxedEnvironment

from formcraftd.core.errors import FormcraftError
from formcraftd.workers.email import render_guard
from formcraftd.workers.email.plaintext import html_to_text
from formcraftd.workers.email.render_guard import RenderBudget, RenderLimitExceeded, RenderTimeout

__all__ = [
    "GuardedEnvironment",
    "RenderDeferred",
    "RenderLimitExceeded",
    "Rendered",
    "TemplateFailure",
    "TemplateRenderer",
]

PACKAGE_TEMPLATES = Path(__file__).parent / "templates"
MAX_RENDERED_CHARS = 1_000_000  # per rendered body, and per value built while rendering
MAX_SUBJECT_CHARS = 998  # RFC 5322's line limit: a subject longer than this is an error
RENDER_TIMEOUT_S = 2.0  # subject + HTML + text of one job
INLINE_RENDER_S = 0.02  # on the event loop; a render needing longer moves to a thread
_SUBJECT_CACHE_SIZE = 256
_SLOW_MEMORY = 1024
_INLINE_DERIVE_CHARS = 100_000
# Filters whose output grows with an argument in ways the budget cannot bound cheaply.
_REMOVED_FILTERS = ("urlize", "pprint")


class TemplateFailure(FormcraftError):
    """A template could not be rendered: missing, invalid, undefined name, sandbox, limits."""


@dataclass(frozen=True, slots=True)
class Rendered:
    subject: str
    html: str
    text: str


class _GuardedCodeGenerator(CodeGenerator):
    """Compiles loops and concatenations so that they spend the render budget."""

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        if not getattr(node, "_fc_guarded", False):
            node.iter = nodes.Call(
                nodes.EnvironmentAttribute("guard_iterable", lineno=node.lineno),
                [node.iter],
                [],
                None,
                None,
                lineno=node.lineno,
            )
            node._fc_guarded = True  # type: ignore[attr-defined]
        super().visit_For(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.guard_value(")
        super().visit_Concat(node, frame)
        self.write(")")


class GuardedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox, spending a :class:`RenderBudget` on everything it does."""

    code_generator_class = _GuardedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name in _REMOVED_FILTERS:
            self.filters.pop(name, None)
        self.filters = {
            name: render_guard.guard_filter(name, func) for name, func in self.filters.items()
        }
        self.globals.pop("lipsum", None)

    def call(
        __self,  # the sandbox's own convention, so any keyword argument passes through
        __context: jinja2.runtime.Context,
        __obj: Any,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        """Every call from template code: spend budget, check sizes before and after."""
        budget = render_guard.current()
        if budget is None:
            return super().call(__context, __obj, *args, **kwargs)
        budget.tick()
        args = render_guard.precheck_call(budget, __obj, args)
        return budget.value(super().call(__context, __obj, *args, **kwargs))

    def call_binop(
        self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any
    ) -> Any:
        """`*`, `**`, `%` and `+`, refused when the result would be too large."""
        budget = render_guard.current()
        if budget is None:
            return super().call_binop(context, operator, left, right)
        budget.tick()
        render_guard.precheck_binop(budget, operator, left, right)
        return budget.value(super().call_binop(context, operator, left, right))

    def wrap_str_format(self, value: Any) -> Any:
        """`str.format` is refused (widths it could pad by); templates use `|format`."""
        if super().wrap_str_format(value) is None:
            return None
        return render_guard.refuse_str_format

    def guard_iterable(self, iterable: Any) -> Any:
        """Loops: one tick per item, so nested loops end at the deadline."""
        budget = render_guard.current()
        return iterable if budget is None else render_guard.ticking(iterable, budget)

    def guard_value(self, value: Any) -> Any:
        """Concatenations (`~`): the result must fit the size cap."""
        budget = render_guard.current()
        return value if budget is None else budget.value(value)


class RenderDeferred(Exception):
    """An inline render gave up: a template needs compiling, or the time slice ran out."""


@dataclass(slots=True)
class _Compiled:
    html: jinja2.Template
    text: jinja2.Template | None  # None: derive the text part from the HTML


class TemplateRenderer:
    """Renders a job's subject, HTML and text from one template folder (thread-safe).

    :meth:`render` with ``inline=True`` is for the event loop: it renders only
    templates already compiled, within :data:`INLINE_RENDER_S`, and raises
    :class:`RenderDeferred` otherwise; the caller then renders again in a
    thread with the full budget (rendering has no side effects).
    """

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
        self._env = GuardedEnvironment(
            loader=jinja2.FileSystemLoader(folder),
            undefined=jinja2.StrictUndefined,
            autoescape=jinja2.select_autoescape(
                enabled_extensions=("html", "htm"), default_for_string=False
            ),
            auto_reload=False,  # compiled templates live until the next reload (SIGHUP)
            keep_trailing_newline=True,
        )
        self._lock = threading.Lock()
        self._templates: dict[str, _Compiled] = {}  # only templates that exist
        self._subjects: OrderedDict[str, jinja2.Template] = OrderedDict()
        self._slow: set[tuple[str, str]] = set()  # (template, subject) that outlast the slice

    def render(
        self, template: str, subject: str, context: dict[str, Any], *, inline: bool = False
    ) -> Rendered:
        """Render all three parts under one budget; raises :class:`TemplateFailure`."""
        with self._lock:
            compiled = self._templates.get(template)
            subject_template = self._subjects.get(subject)
            slow = (template, subject) in self._slow
        if inline and (compiled is None or subject_template is None or slow):
            raise RenderDeferred
        budget = RenderBudget(INLINE_RENDER_S if inline else self.timeout_s, self.max_chars)
        token = render_guard.activate(budget)
        try:
            compiled = compiled or self._compile(template)
            subject_template = subject_template or self._compile_subject(subject)
            return _render(
                compiled, subject_template, context, budget, self.max_chars, inline=inline
            )
        except RenderDeferred:
            raise
        except Exception as exc:
            if inline and isinstance(exc, RenderTimeout):
                self._remember_slow(template, subject)
                raise RenderDeferred from None
            raise _failure(template, exc) from None
        finally:
            render_guard.deactivate(token)

    def _remember_slow(self, template: str, subject: str) -> None:
        """Next time, go straight to a thread instead of spending the slice again."""
        with self._lock:
            if len(self._slow) >= _SLOW_MEMORY:
                self._slow.clear()
            self._slow.add((template, subject))

    def _compile(self, name: str) -> _Compiled:
        html = self._env.get_template(f"{name}.html")
        try:
            text: jinja2.Template | None = self._env.get_template(f"{name}.txt")
        except jinja2.TemplateNotFound:
            text = None
        compiled = _Compiled(html, text)
        with self._lock:
            self._templates[name] = compiled
        return compiled

    def _compile_subject(self, source: str) -> jinja2.Template:
        """Compile a subject into a small LRU cache keyed by its source."""
        compiled = self._env.from_string(source)
        with self._lock:
            self._subjects[source] = compiled
            while len(self._subjects) > _SUBJECT_CACHE_SIZE:
                self._subjects.popitem(last=False)
        return compiled


def _render(
    compiled: _Compiled,
    subject_template: jinja2.Template,
    context: dict[str, Any],
    budget: RenderBudget,
    max_chars: int,
    *,
    inline: bool,
) -> Rendered:
    subject = _stream(subject_template, context, budget, MAX_SUBJECT_CHARS)
    context = {**context, "subject": subject}
    html = _stream(compiled.html, context, budget, max_chars)
    if compiled.text is None:
        if inline and len(html) > _INLINE_DERIVE_CHARS:  # html_to_text spends no budget
            raise RenderDeferred
        text = html_to_text(html)
    else:
        text = _stream(compiled.text, context, budget, max_chars)
    return Rendered(subject=subject.strip(), html=html, text=text)


def _failure(template: str, exc: Exception) -> TemplateFailure:
    """The one-line TEMPLATE_ERROR reason for whatever a render raised."""
    if isinstance(exc, TemplateFailure):
        return exc
    if isinstance(exc, jinja2.TemplateNotFound):
        return TemplateFailure(f"template {exc.name!r} not found")
    if isinstance(exc, jinja2.TemplateSyntaxError):
        where = f"{exc.name or 'subject'}:{exc.lineno}"
        return TemplateFailure(f"syntax error in {where}: {_one_line(exc.message)}")
    if isinstance(exc, RenderLimitExceeded):
        return TemplateFailure(f"{template}: {exc}")
    if isinstance(exc, RecursionError):
        return TemplateFailure(f"{template}: recursion too deep")
    if isinstance(exc, MemoryError):
        return TemplateFailure(f"{template}: out of memory while rendering")
    # Template code can raise anything at all; all of it is the template's problem.
    return TemplateFailure(f"{template}: {type(exc).__name__}: {_one_line(exc)}")


def _stream(
    template: jinja2.Template, context: dict[str, Any], budget: RenderBudget, limit: int
) -> str:
    """Render chunk by chunk, stopping as soon as the output passes `limit` characters.

    Loops and calls spend the budget themselves; without them a template
    yields a bounded number of chunks, so the clock is read only now and then.
    """
    parts: list[str] = []
    size = 0
    # The root render function itself: `generate()` only adds traceback rewriting around it.
    for chunk in template.root_render_func(template.new_context(context)):
        size += len(chunk)
        if size > limit:
            raise RenderLimitExceeded(f"rendered output is over {limit} characters")
        parts.append(chunk)
        if not len(parts) % 256:
            budget.tick()
    budget.tick()
    return "".join(parts)


def _one_line(value: object) -> str:
    return " ".join(str(value).split())[:300]
