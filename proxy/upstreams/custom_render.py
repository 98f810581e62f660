"""Compiled request templates of the `custom` kind and their rendering (sans-IO).

custom_template.py compiles YAML values into these nodes once, at load; a request renders
them with its placeholder values (custom-apis.md §6.3):
1. a string that is exactly one placeholder becomes the value with its JSON type;
2. `{{ x? }}` removes the enclosing key or list item when the value is null or "";
3. any other string is interpolated with the values stringified (`stringify`). In a path
   every value is percent-encoded as one segment, so `../../admin` or a `/?#` can never
   change where the request goes; in a query every value is encoded whole.

Rendering builds new containers only where a placeholder sits: static parts of a body are
shared between requests, so a rendered value must be treated as read-only.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeAlias
from urllib.parse import quote

import orjson

from proxy.errors import InvalidRequest, ProxyError, UpstreamFailed

__all__ = [
    "DROP",
    "Const",
    "Interp",
    "ListNode",
    "MapNode",
    "Node",
    "PathTemplate",
    "QueryTemplate",
    "Ref",
    "Template",
    "Whole",
    "nested_too_deeply",
    "stringify",
]


class _Drop:
    """Marks a value that `?` removed: its key or list item is left out."""

    __slots__ = ()


DROP: Final = _Drop()


def stringify(value: Any) -> str:
    """A value as interpolated text: null is "", JSON spelling for booleans and containers."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int | float):
        return repr(value)
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        raise nested_too_deeply() from None


def nested_too_deeply() -> UpstreamFailed:
    """The failure for a value past orjson's 254 levels (it reads 1,024) in a request: only a
    value captured from an upstream can be, since a client's are bounded (json_body.py)."""
    return UpstreamFailed("A value the upstream sent is nested too deeply to send back to it.")


# -- nodes -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ref:
    name: str
    optional: bool


@dataclass(frozen=True, slots=True)
class Const:
    value: Any

    def render(self, values: Mapping[str, Any]) -> Any:
        return self.value


@dataclass(frozen=True, slots=True)
class Whole:
    ref: Ref

    def render(self, values: Mapping[str, Any]) -> Any:
        value = values.get(self.ref.name)
        if self.ref.optional and (value is None or value == ""):
            return DROP
        return value


@dataclass(frozen=True, slots=True)
class Interp:
    parts: tuple[str | Ref, ...]

    def render(self, values: Mapping[str, Any]) -> Any:
        out: list[str] = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            value = values.get(part.name)
            if part.optional and (value is None or value == ""):
                return DROP
            out.append(stringify(value))
        return "".join(out)


@dataclass(frozen=True, slots=True)
class MapNode:
    items: tuple[tuple[str, Node], ...]

    def render(self, values: Mapping[str, Any]) -> Any:
        out: dict[str, Any] = {}
        for key, node in self.items:
            value = node.render(values)
            if value is not DROP:
                out[key] = value
        return out


@dataclass(frozen=True, slots=True)
class ListNode:
    items: tuple[Node, ...]

    def render(self, values: Mapping[str, Any]) -> Any:
        out: list[Any] = []
        for node in self.items:
            value = node.render(values)
            if value is not DROP:
                out.append(value)
        return out


Node: TypeAlias = Const | Whole | Interp | MapNode | ListNode


@dataclass(frozen=True, slots=True)
class Template:
    """A compiled body (any JSON value). `render(values)` gives the value to send."""

    root: Node
    names: frozenset[str]

    def render(self, values: Mapping[str, Any]) -> Any:
        return self.root.render(values)


@dataclass(frozen=True, slots=True)
class PathTemplate:
    """A compiled path: literal text kept as written, every value encoded as one segment."""

    parts: tuple[str | Ref, ...]
    names: frozenset[str]

    def render(self, values: Mapping[str, Any]) -> str:
        out: list[str] = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            text = stringify(values.get(part.name))
            if text in ("", ".", ".."):
                # Empty, `.` and `..` segments are the ones a URL library or a server
                # normalises away: refuse rather than send the request somewhere else.
                raise _bad_path_value(part.name, text)
            out.append(quote(text, safe="", errors="replace"))
        return "".join(out)


# The request field a placeholder comes from, for the refusal's `param`.
_CLIENT_FIELDS: Final = {
    "model": "model",
    "user": "user",
    **{name: "messages" for name in (
        "input", "messages", "history", "new_messages", "system", "transcript")},
}
# Values the proxy took from an upstream's earlier answer (a captured task id, an issued
# session id; a derived `session.id` is the session key's hash unless the block's `id`
# template says otherwise, and one made from client fields is refused before the session
# lock, `derived_path_value`): a bad one is that upstream's fault, counted by its circuit.
_FROM_UPSTREAM: Final = ("captured.", "session.id")


def derived_path_value(names: Collection[str], text: str) -> InvalidRequest | None:
    """The refusal of a derived `session.id` that cannot be a path segment, when the block's
    `id` template makes it from the client's request (`names`, the template's placeholders):
    the client's fault, naming its field. None when the template reads nothing of the
    client's: the path's own check then blames the upstream."""
    fields = sorted({_CLIENT_FIELDS[name] for name in names if name in _CLIENT_FIELDS})
    if not fields:
        return None
    shown = "empty" if not text else f"{text!r}"
    what = " and ".join(f"`{field}`" for field in fields)
    return InvalidRequest(
        f"This model's upstream makes its session id from {what}, which gives {shown} here, "
        "and puts it in its URL path as one segment, which cannot be empty, '.' or '..'.",
        param=fields[0],
        code="upstream_path_value",
    )


def _bad_path_value(name: str, text: str) -> ProxyError:
    shown = "empty" if not text else f"{text!r}"
    if name.startswith(_FROM_UPSTREAM):
        return UpstreamFailed(
            f"The custom upstream's path needs `{{{{ {name} }}}}`, which is {shown} for "
            "this request.",
            code="upstream_path_value",
        )
    # Everything else comes from the client's request: its fault, never the upstream's.
    field = _CLIENT_FIELDS.get(name)
    what = f"`{field}`" if field is not None else f"`{{{{ {name} }}}}`"
    problem = "is missing or empty" if not text else f"gives {shown}"
    return InvalidRequest(
        f"{what} {problem}, but this model's upstream puts it in its URL path as one "
        "segment, which cannot be empty, '.' or '..'.",
        param=field,
        code="upstream_path_value",
    )


@dataclass(frozen=True, slots=True)
class QueryTemplate:
    """Compiled query parameters; `render` gives the encoded query string ("" when empty)."""

    items: tuple[tuple[str, Node], ...]
    names: frozenset[str]

    def render(self, values: Mapping[str, Any]) -> str:
        pairs: list[str] = []
        for key, node in self.items:
            value = node.render(values)
            if value is DROP:
                continue
            pairs.append(
                quote(key, safe="", errors="replace")
                + "="
                + quote(stringify(value), safe="", errors="replace")
            )
        return "&".join(pairs)
