"""The render budget: a deadline and size caps that template code spends as it runs.

The Jinja sandbox stops templates from reaching Python internals, but not from
looping for hours or building a gigabyte string. The guarded environment in
:mod:`formcraftd.templating` calls into this module on every call, filter,
intercepted operator, concatenation and loop iteration:

- :meth:`RenderBudget.tick` raises once the deadline has passed, so nested
  loops and recursive macros stop within the render timeout;
- :meth:`RenderBudget.value` refuses any value it sees built that is over the
  caps (strings over ``max_chars``, collections over :data:`MAX_ITEMS` items,
  integers over :data:`MAX_INT_BITS` bits);
- the prechecks refuse, *before* allocating, the operations whose result can be
  much larger than their inputs: ``str * n``, ``a ** b``, printf widths,
  ``replace``, ``join``, ``indent``, ``wordwrap``, ``center`` and friends.

The active budget travels in a context variable set by the renderer for the
duration of one render (the render runs in a worker thread).
"""

from __future__ import annotations

import contextvars
import functools
import re
import time
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NoReturn

from jinja2.exceptions import SecurityError
from jinja2.filters import make_attrgetter

from formcraftd.core.errors import FormcraftError

MAX_ITEMS = 100_000  # the sandbox's own MAX_RANGE
MAX_INT_BITS = 4096
MAX_FORMAT_WIDTH = 1000
_WIDTH_METHODS = frozenset({"center", "ljust", "rjust", "zfill"})
_SEQUENCES = (str, list, tuple)
_COLLECTIONS = (list, tuple, dict, set, frozenset)
_PRINTF = re.compile(r"%(?:\([^)]*\))?[#0 +-]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?([a-zA-Z%])")

Args = tuple[Any, ...]


class RenderLimitExceeded(FormcraftError):
    """A render ran past its deadline or tried to build something too large."""


class RenderTimeout(RenderLimitExceeded):
    """The render's deadline has passed."""


class RenderBudget:
    """What one render may spend: time until `deadline`, and the size caps."""

    __slots__ = ("deadline", "max_chars", "timeout_s")

    def __init__(self, timeout_s: float, max_chars: int) -> None:
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.max_chars = max_chars

    def tick(self) -> None:
        """Raise once the deadline has passed."""
        if time.monotonic() > self.deadline:
            raise RenderTimeout(f"rendering took longer than {self.timeout_s:g} s")

    def check_chars(self, size: int, what: str) -> None:
        if size > self.max_chars:
            raise RenderLimitExceeded(f"{what} would be over {self.max_chars} characters")

    def value(self, value: Any) -> Any:
        """`value` unchanged, if it is within the caps."""
        if isinstance(value, str):
            self.check_chars(len(value), "a string")
        elif isinstance(value, _COLLECTIONS):
            _check_items(len(value))
        elif isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
            raise RenderLimitExceeded(f"a number would be over {MAX_INT_BITS} bits")
        return value


_CURRENT: contextvars.ContextVar[RenderBudget | None] = contextvars.ContextVar(
    "formcraftd_render_budget", default=None
)


def current() -> RenderBudget | None:
    """The budget of the render running in this context, if any."""
    return _CURRENT.get()


def activate(budget: RenderBudget) -> contextvars.Token[RenderBudget | None]:
    return _CURRENT.set(budget)


def deactivate(token: contextvars.Token[RenderBudget | None]) -> None:
    _CURRENT.reset(token)


def ticking(iterable: Iterable[Any], budget: RenderBudget) -> Iterator[Any]:
    """`iterable`, spending one tick per item."""
    for item in iterable:
        budget.tick()
        yield item


def refuse_str_format(*_args: Any, **_kwargs: Any) -> NoReturn:
    raise SecurityError("str.format is not available in templates; use the format filter")


def _check_items(count: int) -> None:
    if count > MAX_ITEMS:
        raise RenderLimitExceeded(f"a collection would be over {MAX_ITEMS} items")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_width(width: object) -> None:
    if _is_int(width) and abs(width) > MAX_ITEMS:  # type: ignore[arg-type]
        raise RenderLimitExceeded(f"a width of {width} is over {MAX_ITEMS}")


def check_printf(budget: RenderBudget, fmt: str) -> None:
    """printf-style widths and precisions are bounded; `*` widths are refused."""
    for match in _PRINTF.finditer(fmt):
        for number in match.group(1, 2):
            if number == "*" or (number and int(number) > MAX_FORMAT_WIDTH):
                raise RenderLimitExceeded(f"format width {number} is not allowed")
    budget.check_chars(len(fmt), "a format string")


# --- operators -----------------------------------------------------------------


def precheck_binop(budget: RenderBudget, operator: str, left: Any, right: Any) -> None:
    """Refuse `*`, `**`, `%`, `+` whose result would be over the caps."""
    if operator == "*":
        _precheck_multiply(budget, left, right)
    elif operator == "**":
        if _is_int(left) and _is_int(right) and right > 0 and abs(left) > 1:  # noqa: SIM102
            if right * abs(left).bit_length() > MAX_INT_BITS:  # checked apart: ints only
                raise RenderLimitExceeded(f"a number would be over {MAX_INT_BITS} bits")
    elif operator == "%":
        if isinstance(left, str):
            check_printf(budget, left)
    elif operator == "+":
        if isinstance(left, str) and isinstance(right, str):
            budget.check_chars(len(left) + len(right), "a string")
        elif isinstance(left, list | tuple) and isinstance(right, list | tuple):
            _check_items(len(left) + len(right))


def _precheck_multiply(budget: RenderBudget, left: Any, right: Any) -> None:
    if _is_int(left) and _is_int(right):
        if left.bit_length() + right.bit_length() > MAX_INT_BITS + 1:
            raise RenderLimitExceeded(f"a number would be over {MAX_INT_BITS} bits")
        return
    sequence, times = (left, right) if _is_int(right) else (right, left)
    if isinstance(sequence, _SEQUENCES) and _is_int(times) and times > 0:
        size = len(sequence) * times
        if isinstance(sequence, str):
            budget.check_chars(size, "a repeated string")
        else:
            _check_items(size)


# --- calls to str methods --------------------------------------------------------


def precheck_call(budget: RenderBudget, obj: Any, args: Args) -> Args:
    """Check a call to a `str` method whose result can outgrow its inputs.

    Returns the arguments to call with (an iterable given to `join` is read
    into a list first, so it can be measured).
    """
    owner = getattr(obj, "__self__", None)
    if not isinstance(owner, str) or not isinstance(
        obj, types.BuiltinMethodType | types.MethodType
    ):
        return args
    name = obj.__name__
    if name in _WIDTH_METHODS and args:
        _check_width(args[0])
    elif name == "expandtabs" and args and _is_int(args[0]):
        budget.check_chars(len(owner) + owner.count("\t") * max(0, args[0]), "expandtabs")
    elif name == "replace" and len(args) >= 2:
        _check_replace(budget, owner, args[0], args[1])
    elif name == "join" and args:
        items = list(args[0])
        _check_join(budget, owner, [len(item) if isinstance(item, str) else 0 for item in items])
        return (items, *args[1:])
    elif name == "translate" and args and isinstance(args[0], Mapping):
        longest = max((len(v) for v in args[0].values() if isinstance(v, str)), default=1)
        budget.check_chars(len(owner) * longest, "translate")
    return args


def _check_replace(budget: RenderBudget, text: object, old: object, new: object) -> None:
    text, old, new = str(text), str(old), str(new)
    count = text.count(old) if old else len(text) + 1
    budget.check_chars(len(text) + count * max(0, len(new) - len(old)), "replace")


def _check_join(budget: RenderBudget, separator: str, sizes: list[int]) -> None:
    _check_items(len(sizes))
    total = sum(sizes) + len(separator) * max(0, len(sizes) - 1)
    budget.check_chars(total, "join")


# --- filters -----------------------------------------------------------------------

FilterCheck = Callable[[RenderBudget, int, list[Any], dict[str, Any]], None]


def _arg(args: list[Any], kwargs: dict[str, Any], index: int, name: str, default: Any) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _filter_replace(budget: RenderBudget, at: int, args: list[Any], kw: dict[str, Any]) -> None:
    old, new = _arg(args, kw, at + 1, "old", ""), _arg(args, kw, at + 2, "new", "")
    _check_replace(budget, args[at], old, new)


def _filter_join(budget: RenderBudget, at: int, args: list[Any], kw: dict[str, Any]) -> None:
    items = list(args[at])
    args[at] = items  # measured and joined from the same list
    separator = str(_arg(args, kw, at + 1, "d", ""))
    attribute = _arg(args, kw, at + 2, "attribute", None)
    if attribute is not None and at:
        getter = make_attrgetter(args[0].environment, attribute)
        items = [getter(item) for item in items]
    _check_join(budget, separator, [len(str(item)) for item in items])


def _filter_indent(budget: RenderBudget, at: int, args: list[Any], kw: dict[str, Any]) -> None:
    text = str(args[at])
    width = _arg(args, kw, at + 1, "width", 4)
    step = len(width) if isinstance(width, str) else width if _is_int(width) else 0
    budget.check_chars(len(text) + (text.count("\n") + 1) * max(0, step), "indent")


def _filter_wordwrap(budget: RenderBudget, at: int, args: list[Any], kw: dict[str, Any]) -> None:
    text = str(args[at])
    width = _arg(args, kw, at + 1, "width", 79)
    wrap = _arg(args, kw, at + 3, "wrapstring", None)
    if _is_int(width) and isinstance(wrap, str):
        breaks = len(text) // max(1, width) + text.count("\n") + 1
        budget.check_chars(len(text) + breaks * len(wrap), "wordwrap")


def _filter_format(budget: RenderBudget, at: int, args: list[Any], _kw: dict[str, Any]) -> None:
    check_printf(budget, str(args[at]))


def _filter_sum(_budget: RenderBudget, at: int, args: list[Any], kw: dict[str, Any]) -> None:
    start = _arg(args, kw, at + 2, "start", 0)
    if not isinstance(start, int | float):  # summing lists or strings is quadratic
        raise SecurityError("the sum filter adds numbers only")


def _width_at(position: int, name: str) -> FilterCheck:
    def check(_budget: RenderBudget, at: int, args: list[Any], kw: dict[str, Any]) -> None:
        _check_width(_arg(args, kw, at + position, name, 0))

    return check


_FILTER_CHECKS: dict[str, FilterCheck] = {
    "replace": _filter_replace,
    "join": _filter_join,
    "indent": _filter_indent,
    "wordwrap": _filter_wordwrap,
    "format": _filter_format,
    "sum": _filter_sum,
    "center": _width_at(1, "width"),
    "truncate": _width_at(1, "length"),
    "batch": _width_at(1, "linecount"),
    "slice": _width_at(1, "slices"),
}


def guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """`func` spending the active budget: a tick, its precheck, a check of the result."""
    at = 1 if hasattr(func, "jinja_pass_arg") else 0  # context/eval_context/environment first
    check = _FILTER_CHECKS.get(name)

    @functools.wraps(func)  # keeps jinja_pass_arg, so Jinja passes the same arguments
    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = current()
        if budget is None:
            return func(*args, **kwargs)
        budget.tick()
        if check is not None and len(args) > at:
            arguments = list(args)
            check(budget, at, arguments, kwargs)
            args = tuple(arguments)
        return budget.value(func(*args, **kwargs))

    return guarded
