"""A YAML reader that knows where every value is, and reports every problem instead of stopping.

It knows nothing of routes: the schema (schema.py and the modules it calls) and each upstream
kind's declaration (proxy/upstreams/<kind>_options.py) read their keys with it. Every problem
names `file:line path`; unknown keys get a did-you-mean; strings get `${VAR}` and
`${VAR:-default}` from the environment; secrets written inline earn a warning, and credentials
with control characters are refused. docs/configuration.md is the user's side of these rules.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.reader import ReaderError

from proxy.config.nodes import (
    BOOL,
    FLOAT,
    INT,
    MAX_NUMBER_LENGTH,
    MERGE,
    STR,
    Block,
    Entries,
    alternatives,
    compose,
    describe,
    is_null,
    join,
    line_of,
    locate,
    unknown,
)
from proxy.config.plain import PlainValues
from proxy.config.problems import FILE, Problem

# What a kind's module needs comes from here, whichever module defines it.
__all__ = [
    "INLINE_SECRET", "Block", "Entries", "Reader", "alternatives", "describe", "has_reference",
    "is_null", "join", "line_of", "locate", "unknown",
]

INLINE_SECRET = "secret written inline; use ${VAR} so it comes from the environment"

# `$${` escapes; a `${` that fails the NAME / NAME:-default form is reported, not kept silently.
_REFERENCE = re.compile(
    r"\$\$\{|\$\{(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\})?"
)
# C0 controls and DEL: never part of a credential, and CR/LF would split an HTTP header.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_BUT_TAB = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_CONTROL_NAMES = {"\n": "a line break", "\r": "a carriage return", "\t": "a tab", "\0": "a NUL"}
_SCALARS = SafeConstructor()
# A YAML `"\ud800"` escape, or an environment variable's undecodable bytes (Python decodes
# them as surrogates): not text, and fatal only later, when encoded for a client or a header.
_SURROGATE = re.compile("[\ud800-\udfff]")


def has_reference(raw: str) -> bool:
    return any(m.group("name") for m in _REFERENCE.finditer(raw))


def _control_name(char: str) -> str:
    return _CONTROL_NAMES.get(char, f"the control character U+{ord(char):04X}")


class Reader:
    """Reads YAML nodes into Python values, recording problems and warnings as it goes.

    Every getter returns None (or an empty value) for a value it reported, so a caller reads
    on and the user sees every problem of the file at once.
    """

    def __init__(self, filename: str, environ: Mapping[str, str]) -> None:
        self.file = filename
        self.environ = environ
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []
        self._plain = PlainValues(self)

    def error(self, node: Node, path: str, message: str) -> None:
        self.problems.append(Problem(self.file, line_of(node), path or FILE, message))

    def warn(self, node: Node, path: str, message: str) -> None:
        self.warnings.append(Problem(self.file, line_of(node), path or FILE, message))

    def compose(self, text: str) -> Node | None:
        """The document's root node; None (reported) when the text is not YAML or is empty."""
        try:
            root = compose(text)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark is not None else 1
            problem = exc.problem or exc.context or "cannot be parsed"
            self.problems.append(Problem(self.file, line, FILE, f"invalid YAML: {problem}"))
            return None
        except ReaderError as exc:
            line = text[: exc.position].count("\n") + 1
            message = f"invalid YAML: character {exc.character!r} is not allowed"
            self.problems.append(Problem(self.file, line, FILE, message))
            return None
        if root is None:
            self.problems.append(Problem(self.file, 1, FILE, "the file is empty"))
        return root

    # -- mappings and lists ----------------------------------------------------------------

    def mapping(self, node: MappingNode, path: str, duplicate: str = "duplicate key") -> Entries:
        entries: Entries = {}
        for key, value in node.value:
            if isinstance(key, ScalarNode) and key.tag == MERGE:
                self.error(key, path, "merge keys ('<<') are not supported; write the keys out")
            elif not isinstance(key, ScalarNode):
                self.error(key, path, f"a key must be a plain name, got {describe(key)}")
            elif key.value in entries:
                first = line_of(entries[key.value][0])
                self.error(key, join(path, key.value),
                           f"{duplicate} '{key.value}' (first on line {first})")
            elif self.is_text(key, path, key.value):
                entries[key.value] = (key, value)
        return entries

    def mapping_of(self, node: Node, path: str, duplicate: str = "duplicate key") -> Entries | None:
        """The entries of `node`, or None (reported) when it is not a mapping."""
        if isinstance(node, MappingNode):
            return self.mapping(node, path, duplicate)
        self.error(node, path, f"expected a mapping, got {describe(node)}")
        return None

    def optional_mapping(
        self, node: Node, path: str, duplicate: str = "duplicate key"
    ) -> Entries | None:
        """Like mapping_of, but `key:` with nothing after it counts as an empty mapping."""
        return {} if is_null(node) else self.mapping_of(node, path, duplicate)

    def block(
        self,
        node: Node,
        path: str,
        *,
        keys: Iterable[str] | None = None,
        anchor: Node | None = None,
        empty_ok: bool = True,
        duplicate: str = "duplicate key",
    ) -> Block | None:
        """The mapping at `node` as a Block, or None (reported) when it is not a mapping.

        `keys`: the keys allowed, each other one reported with a did-you-mean. `anchor`: where
        a missing key is reported (default: the mapping itself). `empty_ok`: `key:` with
        nothing after it reads as an empty mapping rather than a problem.
        """
        if empty_ok and is_null(node):
            entries: Entries | None = {}
        else:
            entries = self.mapping_of(node, path, duplicate)
        if entries is None:
            return None
        if keys is not None:
            self.known_keys(entries, tuple(keys), path)
        return Block(entries, path, anchor if anchor is not None else node)

    def known_keys(self, entries: Entries | Block, allowed: Sequence[str], path: str) -> None:
        items = entries.entries if isinstance(entries, Block) else entries
        for name, (key, _) in items.items():
            if name not in allowed:
                self.error(key, join(path, name), unknown("key", name, allowed))

    def require(self, block: Block, key: str, hint: str = "") -> bool:
        """True if `key` is in `block`; otherwise reports it missing, on the block's anchor."""
        if key in block:
            return True
        self.error(block.anchor, block.path, f"missing required key '{key}'{hint}")
        return False

    def sequence(self, node: Node, path: str, what: str) -> list[Node] | None:
        if isinstance(node, SequenceNode):
            return list(node.value)
        self.error(node, path, f"expected a list of {what}, got {describe(node)}")
        return None

    def optional_sequence(self, node: Node, path: str, what: str) -> list[Node]:
        """The items of a list; nothing for `key:` left empty or a value reported as wrong."""
        return [] if is_null(node) else self.sequence(node, path, what) or []

    def items(self, node: Node, path: str, what: str) -> list[tuple[Node, str]]:
        """A list's items with their paths (`path[0]`, `path[1]`...), as optional_sequence."""
        return [(item, f"{path}[{i}]") for i, item in
                enumerate(self.optional_sequence(node, path, what))]

    def one_or_many(self, node: Node, path: str, what: str) -> list[tuple[Node, str]] | None:
        """`x` or `[x, y]`: the items with their paths. A string counts as one item; anything
        else but a list is reported as `expected {what}`, and gives None."""
        if isinstance(node, SequenceNode):
            return [(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        if isinstance(node, ScalarNode) and node.tag == STR:
            return [(node, path)]
        self.error(node, path, f"expected {what}, got {describe(node)}")
        return None

    # -- scalars ---------------------------------------------------------------------------

    def string(self, node: Node, path: str) -> str | None:
        """A string, with `${VAR}` references replaced."""
        if isinstance(node, ScalarNode) and node.tag == STR:
            return self.interpolate(node, path)
        self.error(node, path, f"expected a string, got {describe(node)}")
        return None

    def nonempty_string(self, node: Node, path: str) -> str | None:
        value = self.string(node, path)
        if value == "":
            self.error(node, path, "must not be empty")
            return None
        return value

    def choice(self, node: Node, path: str, choices: Sequence[str]) -> str | None:
        """One of `choices`: `expected drop or prepend, got 'keep'`."""
        value = self.string(node, path)
        if value is None or value in choices:
            return value
        self.error(node, path, f"expected {alternatives(choices)}, got '{value}'")
        return None

    def interpolate(self, node: ScalarNode, path: str) -> str | None:
        ok = True

        def substitute(match: re.Match[str]) -> str:
            nonlocal ok
            name, default = match.group("name"), match.group("default")
            if match.group(0) == "$${":
                return "${"
            if name is None:
                self.error(node, path, "malformed ${...}: expected ${VAR} or ${VAR:-default} "
                           "(write $${ for a literal ${)")
                ok = False
                return ""
            value = self.environ.get(name)
            # As in the shell, `:-` also replaces a variable that is set but empty.
            if default is not None and not value:
                return default
            if value is None:
                self.error(node, path, f"environment variable {name} is not set")
                ok = False
                return ""
            return value

        raw = str(node.value)
        if not self.is_text(node, path, raw):
            return None
        result = _REFERENCE.sub(substitute, raw)
        if not ok or (result is not raw and not self.is_text(node, path, result)):
            return None
        return result

    def is_text(self, node: Node, path: str, value: str) -> bool:
        """False (reported) if `value` holds a surrogate; names the variable that brought it,
        and never quotes the value (it may be a credential)."""
        if value.isascii() or _SURROGATE.search(value) is None:
            return True
        for match in _REFERENCE.finditer(str(node.value)):
            name = match.group("name")
            from_env = self.environ.get(name) if name else None
            if from_env and _SURROGATE.search(from_env):
                self.error(node, path, f"environment variable {name} is not valid UTF-8 text")
                return False
        self.error(node, path, "is not valid UTF-8 text (it holds a lone surrogate, such as "
                   "the escape \\ud800)")
        return False

    def not_too_long(self, node: Node, path: str) -> bool:
        """False (reported) for a number written with over MAX_NUMBER_LENGTH characters."""
        if len(str(node.value)) <= MAX_NUMBER_LENGTH:
            return True
        self.error(node, path, f"a number cannot be longer than {MAX_NUMBER_LENGTH} characters")
        return False

    def number(self, node: Node, path: str, what: str = "a number") -> float | None:
        if isinstance(node, ScalarNode) and node.tag in (INT, FLOAT):
            if not self.not_too_long(node, path):
                return None
            if node.tag == INT:
                return float(_SCALARS.construct_yaml_int(node))
            return _SCALARS.construct_yaml_float(node)
        self.error(node, path, f"expected {what}, got {describe(node)}")
        return None

    def integer(self, node: Node, path: str, zero: str | None = None) -> int | None:
        """A positive whole number; 0 too when `zero` says what it means."""
        if not (isinstance(node, ScalarNode) and node.tag == INT):
            self.error(node, path, f"expected a whole number, got {describe(node)}")
            return None
        if not self.not_too_long(node, path):
            return None
        value = int(_SCALARS.construct_yaml_int(node))
        if value < 0 or (value == 0 and zero is None):
            hint = f", or 0 for {zero}" if zero else ""
            self.error(node, path, f"must be a positive whole number{hint}")
            return None
        return value

    def seconds(self, node: Node, path: str, unlimited_ok: bool = False) -> float | None:
        """A positive, finite number of seconds; with `unlimited_ok`, 0 or null give None."""
        if unlimited_ok and is_null(node):
            return None
        value = self.number(node, path, "a number of seconds")
        if value is None:
            return None
        if unlimited_ok and value == 0:
            return None
        if not math.isfinite(value):
            self.error(node, path, "must be a finite number of seconds")
            return None
        if value <= 0:
            hint = ", or 0 or null for no limit" if unlimited_ok else ""
            self.error(node, path, f"must be a positive number of seconds{hint}")
            return None
        return value

    def boolean(self, node: Node, path: str) -> bool | None:
        if isinstance(node, ScalarNode) and node.tag == BOOL:
            return _SCALARS.construct_yaml_bool(node)
        self.error(node, path, f"expected true or false, got {describe(node)}")
        return None

    def plain(self, node: Node, path: str) -> Any:
        """Any YAML value as plain Python (dict, list, str, int, float, bool, None), strings
        interpolated; for values passed on as data, such as a request body template. A part
        that is reported comes back as None (proxy/config/plain.py has the limits)."""
        return self._plain.value(node, path, 0)

    # -- secrets ---------------------------------------------------------------------------

    def secret(self, node: Node, path: str) -> str | None:
        """A credential: a string that warns when written inline (no `${VAR}` in it) and is
        refused when it holds a control character, a trailing newline from a secret file
        being the usual one. Messages never quote the value."""
        value = self.string(node, path)
        if not value or not isinstance(node, ScalarNode):
            return value
        if not self.no_control(node, path, value, "a credential"):
            return None
        if not has_reference(str(node.value)):
            self.warn(node, path, INLINE_SECRET)
        return value

    def no_control(
        self, node: ScalarNode, path: str, value: str, what: str, *, tab_ok: bool = False
    ) -> bool:
        """False (reported) if `value`, the interpolated text of `node`, has a control
        character; the message names the environment variable that brought it, if one did."""
        pattern = _CONTROL_BUT_TAB if tab_ok else _CONTROL
        found = pattern.search(value)
        if found is None:
            return True
        rule = f"{what} cannot contain control characters"
        for match in _REFERENCE.finditer(str(node.value)):
            name = match.group("name")
            from_env = self.environ.get(name) if name else None
            bad = pattern.search(from_env) if from_env else None
            if from_env is not None and bad is not None:
                where = "ends with" if bad.end() == len(from_env) else "contains"
                self.error(node, path, f"environment variable {name} {where} "
                           f"{_control_name(bad.group())}; {rule}")
                return False
        self.error(node, path, f"{rule} (found {_control_name(found.group())})")
        return False
