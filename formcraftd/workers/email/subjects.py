"""The subject syntax: what the template source in a job's `subject` may contain.

The subject is the one piece of template source a publisher controls, so it
is held to a syntax in which rendering costs no more than reading the values
it names: plain text and ``{{ path.to.value }}`` substitutions (a name, then
attributes and constant keys), each optionally piped through filters whose
output is about as large as their input, with constant arguments. Anything
else (statements, calls, operators, tests, conditional expressions, literals
other than filter arguments, names starting with ``_``) is refused on the
parsed template (:meth:`jinja2.Environment.parse`), before anything renders.
"""

from __future__ import annotations

from jinja2 import nodes

__all__ = ["SUBJECT_FILTERS", "refusal"]

#: Filters whose output size is bounded by their input (and their constant arguments).
SUBJECT_FILTERS = frozenset(
    {"default", "d", "upper", "lower", "title", "capitalize", "trim", "truncate"}
)
_CONSTANT_TYPES = (str, int, float, bool, type(None))

# The first match names what was refused; order matters only for readability.
_REFUSED: tuple[tuple[type[nodes.Node] | tuple[type[nodes.Node], ...], str], ...] = (
    (nodes.Stmt, "statements ({% ... %}) are not allowed"),
    (nodes.Call, "calls are not allowed"),
    (nodes.Test, "tests ('is ...') are not allowed"),
    (nodes.CondExpr, "conditional expressions are not allowed"),
    ((nodes.BinExpr, nodes.UnaryExpr, nodes.Concat, nodes.Compare), "operators are not allowed"),
    ((nodes.List, nodes.Tuple, nodes.Dict), "list, tuple and dict literals are not allowed"),
    (nodes.Const, "only values can be substituted ({{ data.name }}), not constants"),
    (nodes.Filter, "a filter can only come last in a substitution"),
)


class _Refused(Exception):
    """Carries the one-line reason out of the recursive check."""


def refusal(template: nodes.Template) -> str | None:
    """Why the parsed subject is refused, or None when it keeps to the subject syntax."""
    try:
        for node in template.body:
            if not isinstance(node, nodes.Output):
                raise _Refused(_reason(node))
            for child in node.nodes:
                if not isinstance(child, nodes.TemplateData):
                    _check_substitution(child)
    except _Refused as refused:
        return str(refused)
    return None


def _check_substitution(node: nodes.Node) -> None:
    """A path, optionally piped through whitelisted filters with constant arguments."""
    while isinstance(node, nodes.Filter):
        if node.name not in SUBJECT_FILTERS:
            raise _Refused(f"filter {node.name!r} is not allowed")
        arguments = [*node.args, *(keyword.value for keyword in node.kwargs)]
        if (
            node.dyn_args is not None
            or node.dyn_kwargs is not None
            or not all(
                isinstance(argument, nodes.Const) and type(argument.value) in _CONSTANT_TYPES
                for argument in arguments
            )
        ):
            raise _Refused("filter arguments must be constants (text, numbers, true/false, none)")
        if node.node is None:  # only a {% filter %} block has none
            raise _Refused(_reason(node))
        node = node.node
    _check_path(node)


def _check_path(node: nodes.Node) -> None:
    """`name`, then `.attribute` and `[constant key]` steps, none starting with `_`."""
    while True:
        if isinstance(node, nodes.Name):
            _check_name(node.name)
            return
        if isinstance(node, nodes.Getattr):
            _check_name(node.attr)
        elif isinstance(node, nodes.Getitem):
            key = node.arg
            if not (isinstance(key, nodes.Const) and type(key.value) in (str, int)):
                raise _Refused("keys must be constant text or whole numbers, as in data['name']")
            if isinstance(key.value, str):
                _check_name(key.value)
        else:
            raise _Refused(_reason(node))
        node = node.node


def _check_name(name: str) -> None:
    if name.startswith("_"):
        raise _Refused(f"{name!r}: names, attributes and keys starting with '_' are not allowed")


def _reason(node: nodes.Node) -> str:
    for kinds, reason in _REFUSED:
        if isinstance(node, kinds):
            return reason
    return f"{type(node).__name__} is not allowed"
