"""Request templates of the `custom` kind: YAML values with `{{ placeholder }}`s, compiled once.

Rules (custom-apis.md §6.3), with no expression language:
1. A string that is exactly one placeholder, `"{{ x }}"`, becomes the value with its JSON type.
2. `"{{ x? }}"` removes the enclosing key or list item when the value is null or "" (also when
   the `?` placeholder sits inside a longer string).
3. Any other string is interpolated with the values stringified: null as "", booleans as
   `true`/`false`, lists and objects as compact JSON. In a path every value is percent-encoded
   as one segment; in a query every value is encoded whole.

Templates are compiled at load (here) into the nodes of custom_render.py, which render them
per request; an unknown placeholder is a compile error that names it.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Collection, Mapping
from typing import Any, Final, TypeAlias

from proxy.upstreams.custom_render import (
    Const,
    Interp,
    ListNode,
    MapNode,
    Node,
    PathTemplate,
    QueryTemplate,
    Ref,
    Template,
    Whole,
    stringify,
)

__all__ = [
    "BODY_PLACEHOLDERS",
    "CAPTURED_PREFIX",
    "PathTemplate",
    "QueryTemplate",
    "Template",
    "TemplateError",
    "compile_body",
    "compile_path_template",
    "compile_query",
    "deep_merge",
    "stringify",
]


BODY_PLACEHOLDERS: Final[frozenset[str]] = frozenset(
    {
        "input",
        "messages",
        "history",
        "new_messages",
        "system",
        "transcript",
        "model",
        "session.id",
        "session.key",
        "session.uuid",
        "caller",
        "user",
        "stream",
        "request_id",
    }
)
"""Every placeholder of a chat request (custom-apis.md §6.2), `captured.NAME` aside."""

CAPTURED_PREFIX: Final = "captured."

Where: TypeAlias = tuple[str | int, ...]

_OPEN: Final = "{{"
_MAX_NESTING: Final = 128
_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**64 - 1
_CLOSE: Final = "}}"
# Only at load: what sits between `{{` and `}}`.
_INNER = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_-]*)*)(\?)?\s*")


class TemplateError(ValueError):
    """A template that does not compile. `where` is the key path inside the template."""

    def __init__(self, message: str, where: Where = ()) -> None:
        super().__init__(message)
        self.message = message
        self.where = where



# -- compiling ----------------------------------------------------------------------------------


class _Compiler:
    def __init__(self, allowed: Collection[str], captured: Collection[str] | None) -> None:
        self.allowed = allowed
        # None: `captured.NAME` is not allowed here at all.
        self.captured = captured
        self.names: set[str] = set()

    def ref(self, inner: str, where: Where) -> Ref:
        match = _INNER.fullmatch(inner)
        if match is None:
            raise TemplateError(
                f"`{{{{{inner}}}}}` is not a placeholder; write `{{{{ name }}}}` or "
                f"`{{{{ name? }}}}` with one of: {', '.join(sorted(self.allowed))}",
                where,
            )
        name, optional = match.group(1), match.group(2) is not None
        if name.startswith(CAPTURED_PREFIX):
            self.captured_ref(name, where)
        elif name not in self.allowed:
            raise TemplateError(_unknown(name, self.allowed, self.captured), where)
        self.names.add(name)
        return Ref(name, optional)

    def captured_ref(self, name: str, where: Where) -> None:
        if self.captured is None:
            raise TemplateError(
                f"`{{{{ {name} }}}}`: captured values exist only in `cancel` and `session` "
                "requests",
                where,
            )
        short = name[len(CAPTURED_PREFIX) :]
        if short not in self.captured:
            close = difflib.get_close_matches(short, list(self.captured), n=1, cutoff=0.6)
            if close:
                hint = f"; did you mean `captured.{close[0]}`?"
            elif self.captured:
                hint = "; captured names: " + ", ".join(sorted(self.captured))
            else:
                hint = ""
            raise TemplateError(
                f"`{{{{ {name} }}}}`: no stream rule captures `{short}` (add "
                f"`capture: {{{short}: <path>}}` to a rule){hint}",
                where,
            )

    def parts(self, text: str, where: Where) -> tuple[str | Ref, ...]:
        parts: list[str | Ref] = []
        pos = 0
        while True:
            start = text.find(_OPEN, pos)
            if start < 0:
                break
            end = text.find(_CLOSE, start + 2)
            if end < 0:
                raise TemplateError(
                    f"the `{{{{` at column {start + 1} is not closed with `}}}}`",
                    where,
                )
            if start > pos:
                parts.append(text[pos:start])
            parts.append(self.ref(text[start + 2 : end], where))
            pos = end + 2
        if pos < len(text):
            parts.append(text[pos:])
        return tuple(parts)

    def node(self, value: Any, where: Where, in_container: bool) -> Node:
        if isinstance(value, str):
            if _OPEN not in value:
                return Const(value)
            parts = self.parts(value, where)
            optional = any(isinstance(p, Ref) and p.optional for p in parts)
            if optional and not in_container:
                raise TemplateError(
                    "`?` removes the enclosing key or list item; here there is none", where
                )
            if len(parts) == 1 and isinstance(parts[0], Ref):
                return Whole(parts[0])
            return Interp(parts)
        if isinstance(value, Mapping | list | tuple) and len(where) >= _MAX_NESTING:
            # orjson writes 254 levels; the values put in (message lists) need some of them.
            raise TemplateError(f"nested more than {_MAX_NESTING} levels deep", where)
        if isinstance(value, Mapping):
            items: list[tuple[str, Node]] = []
            for key, item in value.items():
                if not isinstance(key, str):
                    raise TemplateError(f"keys must be strings, not {key!r}", where)
                if _OPEN in key:
                    raise TemplateError(
                        f"{key!r}: placeholders are allowed in values, not in keys", where
                    )
                items.append((key, self.node(item, (*where, key), True)))
            statics = {key: node.value for key, node in items if isinstance(node, Const)}
            if len(statics) == len(items):
                return Const(statics)
            return MapNode(tuple(items))
        if isinstance(value, list | tuple):
            nodes = [self.node(item, (*where, i), True) for i, item in enumerate(value)]
            consts = [node.value for node in nodes if isinstance(node, Const)]
            if len(consts) == len(nodes):
                return Const(consts)
            return ListNode(tuple(nodes))
        if value is None or isinstance(value, bool):
            return Const(value)
        # What orjson cannot write (or would write as null) would fail or change every
        # request; the file is the place to say so.
        if isinstance(value, int):
            if not _INT_MIN <= value <= _INT_MAX:
                raise TemplateError(f"{value} is beyond what JSON can carry exactly (64 "
                                    "bits); quote it to send text", where)
            return Const(value)
        if isinstance(value, float):
            if not math.isfinite(value):
                raise TemplateError(f"{value!r} is not a JSON number", where)
            return Const(value)
        raise TemplateError(
            f"{value!r} ({type(value).__name__}) is not a JSON value; quote it to send text",
            where,
        )


def _unknown(name: str, allowed: Collection[str], captured: Collection[str] | None) -> str:
    choices = sorted(allowed)
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if close:
        return f"unknown placeholder `{{{{ {name} }}}}`; did you mean `{{{{ {close[0]} }}}}`?"
    extra = ", captured.NAME" if captured is not None else ""
    return (
        f"unknown placeholder `{{{{ {name} }}}}`; placeholders are: "
        f"{', '.join(choices)}{extra}"
    )


def compile_body(
    value: Any,
    allowed: Collection[str] = BODY_PLACEHOLDERS,
    captured: Collection[str] | None = None,
) -> Template:
    """A body template from a YAML value. `captured` lists the names `captured.NAME` may use;
    None forbids `captured.` placeholders altogether."""
    compiler = _Compiler(allowed, captured)
    root = compiler.node(value, (), False)
    return Template(root, frozenset(compiler.names))


def compile_path_template(
    text: Any,
    allowed: Collection[str] = BODY_PLACEHOLDERS,
    captured: Collection[str] | None = None,
) -> PathTemplate:
    if not isinstance(text, str):
        raise TemplateError(f"a path must be a string, not {type(text).__name__}")
    if text and not text.startswith("/"):
        raise TemplateError("a path starts with `/` (it is appended to `url`)")
    compiler = _Compiler(allowed, captured)
    parts = compiler.parts(text, ())
    literal = "".join(p for p in parts if isinstance(p, str))
    if "#" in literal:
        raise TemplateError("a path cannot hold a fragment (`#`)")
    if any(ch.isspace() for ch in literal):
        raise TemplateError("a path cannot hold spaces; write them as %20")
    for part in parts:
        if isinstance(part, Ref) and part.optional:
            raise TemplateError(
                f"`{{{{ {part.name}? }}}}` cannot drop a part of a path; use "
                "`session.stateless` or a `sync`/`stream` override for another path"
            )
    for segment in literal.split("/"):
        if segment in (".", ".."):
            raise TemplateError("`.` and `..` segments are not allowed in a path")
    return PathTemplate(parts, frozenset(compiler.names))


def compile_query(
    value: Any,
    allowed: Collection[str] = BODY_PLACEHOLDERS,
    captured: Collection[str] | None = None,
) -> QueryTemplate:
    if not isinstance(value, Mapping):
        raise TemplateError(f"`query` maps parameter names to values, not {_kind(value)}")
    compiler = _Compiler(allowed, captured)
    items: list[tuple[str, Node]] = []
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise TemplateError(f"a query parameter name must be a non-empty string: {key!r}")
        if isinstance(item, Mapping | list | tuple):
            raise TemplateError(
                f"a query value is a string, number or boolean, not {_kind(item)}", (key,)
            )
        items.append((key, compiler.node(item, (key,), True)))
    return QueryTemplate(tuple(items), frozenset(compiler.names))


def _kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__


def deep_merge(base: Any, override: Any) -> Any:
    """`override` over `base`: mappings merge key by key, anything else (lists too) replaces."""
    if isinstance(base, Mapping) and isinstance(override, Mapping):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = deep_merge(base[key], value) if key in base else value
        return merged
    return override
