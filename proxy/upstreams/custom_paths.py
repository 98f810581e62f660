"""The path language of the `custom` kind: where a value sits in an upstream's JSON.

    path    := ('$' | '$event' | segment) segment*      (a bare `name` may start a path)
    segment := '.' name | '[' int ']' | '[*]' | '["' any-key '"]'

A path is compiled once, at load, to a getter that walks plain dicts and lists: no parser, no
regex and no expression language runs per streamed event (JMESPath costs 25-75x more per
extraction, custom-apis.md §4). Evaluation never raises: a missing key, an index out of range
or a value of the wrong type gives None. `[*]` maps over a list and flattens one level per
`[*]`, dropping elements the rest of the path finds nothing in. A list of paths means "the
first that is not None".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

__all__ = [
    "NOTHING",
    "Getter",
    "Path",
    "PathError",
    "compile_path",
    "compile_paths",
    "first_of",
]

Getter = Callable[[Any, str], Any]
"""`getter(payload, event_name) -> value or None`."""

_RESERVED_PREFIX: Final = "jmespath:"
# Characters that end a bare name: the next segment starts there, or the text is malformed.
_NAME_STOPS: Final = frozenset('.[]"\'')


class PathError(ValueError):
    """A path that does not compile; the message names the path and the column."""


def _nothing(payload: Any, event: str) -> Any:
    return None


NOTHING: Final[Getter] = _nothing
"""The getter of an absent mapping: always None."""


_KEY: Final = 0
_INDEX: Final = 1
_STAR: Final = 2

_Step = tuple[int, Any]


@dataclass(frozen=True, slots=True)
class Path:
    """One compiled path. `get(payload, event)` is the hot-path call."""

    text: str
    get: Getter
    # True when the path reads the SSE event name rather than the payload.
    reads_event: bool = False
    steps: tuple[_Step, ...] = ()

    @property
    def key(self) -> str | None:
        """The key when the path is one plain key of the payload (`event`), else None."""
        if len(self.steps) == 1 and self.steps[0][0] == _KEY:
            key: str = self.steps[0][1]
            return key
        return None

    def split_leaf(self) -> tuple[str, Getter, str] | None:
        """(parent's text, parent's getter, last key) when the path ends with a key and has
        no `[*]`: paths that share a parent can read it once (usage's three counts)."""
        if not self.steps or self.steps[-1][0] != _KEY or any(
            kind == _STAR for kind, _ in self.steps
        ):
            return None
        parent = self.steps[:-1]
        return repr(parent), _getter(parent), self.steps[-1][1]


def compile_path(text: str) -> Path:
    """Compiles one path; raises PathError with a message that says what is wrong and where."""
    if not isinstance(text, str):
        raise PathError(f"a path must be a string, not {_kind(text)}")
    if text.startswith(_RESERVED_PREFIX):
        raise PathError(
            f"{text!r}: `jmespath:` paths are not supported yet; use the dotted path syntax "
            "(name.name, [0], [-1], [*], [\"key\"])"
        )
    if not text:
        raise PathError("a path must not be empty; use `$` for the whole payload")
    if text == "$event":
        return Path(text, _event_name, reads_event=True)
    steps = _parse(text)
    return Path(text, _getter(steps), steps=steps)


def compile_paths(value: str | Sequence[str]) -> Getter:
    """A path or a non-empty list of paths ("first that is not None") as one getter."""
    if isinstance(value, str):
        return compile_path(value).get
    if not isinstance(value, list | tuple) or not value:
        raise PathError(f"expected a path or a non-empty list of paths, not {_kind(value)}")
    getters: list[Getter] = []
    for i, item in enumerate(value):
        try:
            getters.append(compile_path(item).get)
        except PathError as exc:
            raise PathError(f"[{i}]: {exc}") from None
    return first_of(getters)


def first_of(getters: Sequence[Getter]) -> Getter:
    """One getter for several: the first value that is not None."""
    if len(getters) == 1:
        return getters[0]
    chain = tuple(getters)

    def first(payload: Any, event: str) -> Any:
        for get in chain:
            value = get(payload, event)
            if value is not None:
                return value
        return None

    return first


# -- parsing ------------------------------------------------------------------------------------


def _parse(text: str) -> tuple[_Step, ...]:
    steps: list[_Step] = []
    i = 0
    n = len(text)
    if text[0] == "$":
        if n > 1 and text[1] not in ".[":
            if text.startswith("$event") and text[6] in ".[":
                raise PathError(
                    f"{text!r}: `$event` is the event name (a string); nothing can follow it"
                )
            raise PathError(
                f"{text!r}: a path may start with `$` (the payload) or `$event` (the event "
                f"name); quote a key that starts with `$` as [\"{_first_name(text)}\"]"
            )
        i = 1
    elif text[0] not in ".[":
        i = _name(text, 0, steps)
    while i < n:
        ch = text[i]
        if ch == ".":
            if i + 1 >= n:
                raise PathError(f"{text!r}: a name must follow `.` at column {i + 1}")
            i = _name(text, i + 1, steps)
        elif ch == "[":
            i = _bracket(text, i, steps)
        else:
            raise PathError(
                f"{text!r}: unexpected {ch!r} at column {i + 1}; expected `.name`, `[0]`, "
                "`[*]` or `[\"key\"]`"
            )
    return tuple(steps)


def _name(text: str, start: int, steps: list[_Step]) -> int:
    end = start
    n = len(text)
    while end < n and text[end] not in _NAME_STOPS:
        ch = text[end]
        if ch.isspace():
            raise PathError(
                f"{text!r}: a space at column {end + 1}; quote a key with spaces as "
                f"[\"{_rest_of_name(text, start)}\"]"
            )
        end += 1
    if end == start:
        found = repr(text[start]) if start < n else "the end"
        raise PathError(f"{text!r}: expected a name at column {start + 1}, found {found}")
    if end < n and text[end] in "\"'":
        raise PathError(
            f"{text!r}: a quote at column {end + 1} inside a name; quote whole keys as "
            "[\"key\"]"
        )
    steps.append((_KEY, text[start:end]))
    return end


def _bracket(text: str, start: int, steps: list[_Step]) -> int:
    n = len(text)
    i = start + 1
    if i < n and text[i] == '"':
        # A JSON string literal, so `\"` and `\\` escape as a reader expects.
        j = i + 1
        while j < n and text[j] != '"':
            j += 2 if text[j] == "\\" else 1
        if j >= n:
            raise PathError(f"{text!r}: the quoted key opened at column {i + 1} is not closed")
        try:
            key = orjson.loads(text[i : j + 1])
        except orjson.JSONDecodeError:
            raise PathError(
                f"{text!r}: the quoted key at column {i + 1} has a bad escape"
            ) from None
        if j + 1 >= n or text[j + 1] != "]":
            raise PathError(f"{text!r}: expected `]` after the quoted key at column {j + 2}")
        steps.append((_KEY, key))
        return j + 2
    close = text.find("]", i)
    if close < 0:
        raise PathError(f"{text!r}: the `[` at column {start + 1} is not closed")
    inner = text[i:close]
    if inner == "*":
        steps.append((_STAR, None))
    elif _is_int(inner):
        steps.append((_INDEX, int(inner)))
    else:
        hint = " (quote keys: [\"key\"])" if inner and not inner.startswith("'") else ""
        if inner.startswith("'"):
            hint = " (keys are quoted with double quotes: [\"key\"])"
        raise PathError(
            f"{text!r}: [{inner}] at column {start + 1} is not an index; expected an integer, "
            f"`*` or a quoted key{hint}"
        )
    return close + 1


def _is_int(text: str) -> bool:
    digits = text[1:] if text.startswith("-") else text
    return digits.isascii() and digits.isdigit()


def _first_name(text: str) -> str:
    end = 0
    while end < len(text) and text[end] not in ".[":
        end += 1
    return text[:end]


def _rest_of_name(text: str, start: int) -> str:
    end = start
    while end < len(text) and text[end] not in ".[":
        end += 1
    return text[start:end]


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list" if value else "an empty list"
    return type(value).__name__


# -- evaluation ---------------------------------------------------------------------------------
# A path without `[*]` becomes one straight-line function, generated at load from the steps
# (keys enter the source only through repr(), indexes only as ints): a streamed event costs a
# call and a few type checks and lookups, with no loop over steps and no step dispatch.


def _event_name(payload: Any, event: str) -> Any:
    return event


def _whole(payload: Any, event: str) -> Any:
    return payload


def _getter(steps: tuple[_Step, ...]) -> Getter:
    if not steps:
        return _whole
    if any(kind == _STAR for kind, _ in steps):
        return _projection(steps)
    return _straight(steps)


def _straight(steps: tuple[_Step, ...]) -> Getter:
    lines = ["def get(v, event):"]
    for kind, key in steps:
        if kind == _KEY:
            lines += [
                "    if type(v) is not dict: return None",
                f"    v = v.get({key!r})",
            ]
        else:
            lines += [
                "    if type(v) is not list: return None",
                "    try:",
                f"        v = v[{int(key)}]",
                "    except IndexError:",
                "        return None",
            ]
    lines.append("    return v")
    namespace: dict[str, Any] = {}
    exec(compile("\n".join(lines), "<custom path>", "exec"), namespace)
    get: Getter = namespace["get"]
    return get


def _step_all(values: list[Any], kind: int, key: Any) -> list[Any]:
    out: list[Any] = []
    for value in values:
        if kind == _KEY:
            if type(value) is dict:
                found = value.get(key)
                if found is not None:
                    out.append(found)
        elif kind == _INDEX:
            if type(value) is list and -len(value) <= key < len(value):
                found = value[key]
                if found is not None:
                    out.append(found)
        elif type(value) is list:
            out.extend(v for v in value if v is not None)
    return out


def _projection(steps: tuple[_Step, ...]) -> Getter:
    star = next(i for i, (kind, _) in enumerate(steps) if kind == _STAR)
    head = _getter(steps[:star]) if star else _whole
    tail = steps[star + 1 :]

    def get(payload: Any, event: str) -> Any:
        base = head(payload, event)
        if type(base) is not list:
            return None
        values = [v for v in base if v is not None]
        for kind, key in tail:
            values = _step_all(values, kind, key)
        return values

    return get
