"""Reading a `custom` block's plain YAML values and reporting what is wrong, by key path.

`Checker` collects every problem (and warning) with its key path inside the block
(`stream.rules[2].text: ...`), so the config reader can add `routes.yaml:LINE` to it; its
generic readers return None (or a default) for what they reported and never stop at the
first problem. The sections are compiled with it in custom_mappings.py,
custom_session_spec.py and custom_spec.py.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from proxy.upstreams.custom_paths import Getter, PathError, compile_paths
from proxy.upstreams.custom_requests import METHODS, RequestSpec, build_request
from proxy.upstreams.custom_template import (
    TemplateError,
    compile_body,
    compile_path_template,
    compile_query,
)

__all__ = [
    "Checker",
    "CustomSpecError",
    "SpecProblem",
    "Where",
    "kind_of",
    "render_where",
    "unknown_key",
]

Where: TypeAlias = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class SpecProblem:
    """One problem in a custom block. `where` is the key path inside the block."""

    where: Where
    message: str

    @property
    def path(self) -> str:
        return render_where(self.where)

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.where else self.message


def render_where(where: Where) -> str:
    out = ""
    for part in where:
        if isinstance(part, int):
            out += f"[{part}]"
        elif out:
            out += f".{part}"
        else:
            out = part
    return out


class CustomSpecError(ValueError):
    def __init__(self, problems: list[SpecProblem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


def kind_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__


def unknown_key(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    if close:
        return f"unknown key '{name}'; did you mean '{close[0]}'?"
    return f"unknown key '{name}'; expected one of: {', '.join(choices)}"


class Checker:
    """The problems and warnings found so far, and the generic readers that find them."""

    def __init__(self) -> None:
        self.problems: list[SpecProblem] = []
        self.warnings: list[SpecProblem] = []

    def error(self, where: Where, message: str) -> None:
        self.problems.append(SpecProblem(where, message))

    def warn(self, where: Where, message: str) -> None:
        self.warnings.append(SpecProblem(where, message))

    # -- generic readers -----------------------------------------------------------------

    def mapping(self, value: Any, where: Where) -> Mapping[str, Any] | None:
        """A mapping; `key:` left empty counts as an empty one; None (reported) otherwise."""
        if value is None:
            return {}
        if isinstance(value, Mapping):
            return value
        self.error(where, f"expected a mapping, got {kind_of(value)}")
        return None

    def keys(self, entries: Mapping[str, Any], allowed: Sequence[str], where: Where,
             skip: Collection[str] = ()) -> None:
        for name in entries:
            if name in skip:
                continue
            if not isinstance(name, str):
                self.error(where, f"a key must be a plain name, got {name!r}")
            elif name not in allowed:
                self.error((*where, name), unknown_key(name, [*allowed, *skip]))

    def string(self, value: Any, where: Where, *, empty: bool = True) -> str | None:
        if not isinstance(value, str):
            self.error(where, f"expected a string, got {kind_of(value)}")
            return None
        if not empty and not value:
            self.error(where, "must not be empty")
            return None
        return value

    def choice(self, value: Any, where: Where, choices: Sequence[str]) -> str | None:
        if not isinstance(value, str):
            self.error(where, f"expected one of {', '.join(choices)}, got {kind_of(value)}")
            return None
        if value not in choices:
            close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            self.error(where, f"'{value}' is not one of {', '.join(choices)}{hint}")
            return None
        return value

    def boolean(self, value: Any, where: Where) -> bool | None:
        if isinstance(value, bool):
            return value
        self.error(where, f"expected true or false, got {kind_of(value)}")
        return None

    def paths(self, value: Any, where: Where) -> Getter | None:
        try:
            return compile_paths(value)
        except PathError as exc:
            self.error(where, str(exc))
            return None

    def method(self, entries: Mapping[str, Any], where: Where, default: str) -> str:
        if "method" not in entries:
            return default
        value = entries["method"]
        if isinstance(value, str) and value.upper() in METHODS:
            return value.upper()
        self.choice(value, (*where, "method"), METHODS)
        return default

    def check_template(self, kind: str, value: Any, where: Where,
                       allowed: Collection[str], captured: Collection[str] | None) -> bool:
        """Compiles one raw piece on its own so a problem names the key it sits under."""
        try:
            if kind == "path":
                compile_path_template(value, allowed, captured)
            elif kind == "query":
                compile_query(value, allowed, captured)
            else:
                compile_body(value, allowed, captured)
        except TemplateError as exc:
            self.error((*where, kind, *exc.where), exc.message)
            return False
        return True

    def request(self, entries: Mapping[str, Any], where: Where, method: str,
                allowed: Collection[str], captured: Collection[str] | None
                ) -> RequestSpec | None:
        """A standalone call (lookup, create, cancel, models) from its own keys."""
        ok = True
        for kind in ("path", "query", "body"):
            if kind in entries and not (kind == "body" and entries[kind] is None):
                ok = self.check_template(kind, entries[kind], where, allowed, captured) and ok
        if method == "GET" and entries.get("body") is not None:
            self.error((*where, "body"), "a GET request sends no body")
            ok = False
        if not ok:
            return None
        return build_request(method, entries, allowed, captured)
