"""YAML nodes as the config reader sees them: how they are composed from the text (nesting
bounded; libyaml's parser where it is installed), where a node is, what it is, and the mapping
being read (Block). No problems are recorded here; reader.py does that."""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import yaml
from yaml.composer import Composer, ComposerError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

STR = "tag:yaml.org,2002:str"
INT = "tag:yaml.org,2002:int"
FLOAT = "tag:yaml.org,2002:float"
BOOL = "tag:yaml.org,2002:bool"
NULL = "tag:yaml.org,2002:null"
MERGE = "tag:yaml.org,2002:merge"
_TYPE_NAMES = {STR: "a string", INT: "a number", FLOAT: "a number", BOOL: "a boolean",
               NULL: "null"}

Entries = dict[str, tuple[ScalarNode, Node]]
# PyYAML composes by recursion, and Python's recursion limit (~490 levels of YAML) would end
# it in a RecursionError; a route table is a few levels deep, plus a custom body's template.
MAX_NESTING = 100
# Python refuses to convert integers of over 4,300 digits, and a longer float is inf; a number
# in a routes file is a count or some seconds.
MAX_NUMBER_LENGTH = 100


class _Nesting(Composer):
    """Refuses nesting past MAX_NESTING levels, where the node starts."""

    _depth = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_NESTING:
                raise ComposerError(None, None, f"nested more than {MAX_NESTING} levels deep",
                                    self.peek_event().start_mark)  # type: ignore[attr-defined]
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class NestingLoader(_Nesting, yaml.SafeLoader):
    """PyYAML's own parser, whose messages are the ones users see."""


_FastLoader: type | None = None
if yaml.__with_libyaml__:
    from yaml._yaml import CParser

    class _LibyamlLoader(_Nesting, CParser, Resolver):
        """libyaml's parser, with the composer and resolver of NestingLoader: the same nodes."""

        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            Composer.__init__(self)
            Resolver.__init__(self)

    _FastLoader = _LibyamlLoader


def compose(text: str) -> Node | None:
    """The document's root node, as NestingLoader composes it. libyaml, where it is installed,
    parses a big table several times faster; on any problem PyYAML parses it again, and its
    messages (and marks) are the ones reported."""
    # libyaml takes a tab for a space between tokens (`key:\tvalue`, in a plain scalar, in
    # flow) and skips a BOM that starts any line, where PyYAML refuses the tab or keeps the
    # BOM in the key: such a file would be valid only where libyaml is installed, and read
    # otherwise than `check` without it reads it. PyYAML alone reads those.
    if _FastLoader is not None and "\t" not in text and text.find("\ufeff", 1) < 0:
        # Not only YAMLError: libyaml refuses to encode a str holding a lone surrogate.
        with contextlib.suppress(Exception):
            node: Node | None = yaml.compose(text, Loader=_FastLoader)
            return node
    return yaml.compose(text, Loader=NestingLoader)


def line_of(node: Node) -> int:
    return int(node.start_mark.line) + 1


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def describe(node: Node) -> str:
    """What a node is, for `expected X, got Y` messages; never its value."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return _TYPE_NAMES.get(node.tag, f"a value tagged {node.tag}")


def is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == NULL


def unknown(what: str, name: str, choices: Iterable[str]) -> str:
    """`unknown key 'urll'; did you mean 'url'?`, or the list of choices when none is close."""
    options = list(choices)
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    if close:
        return f"unknown {what} '{name}'; did you mean '{close[0]}'?"
    return f"unknown {what} '{name}'; expected one of: {', '.join(options)}"


def alternatives(choices: Sequence[str]) -> str:
    """`a or b`, `a, b or c`."""
    if len(choices) < 2:
        return "".join(choices)
    return f"{', '.join(choices[:-1])} or {choices[-1]}"


def locate(node: Node, where: Sequence[str | int]) -> Node:
    """The node at key path `where` under `node` (`("stream", "rules", 2, "text")`), or the
    deepest one that exists: for code that checks plain values (Reader.plain) and reports
    back by path, to put the problem on the right line. A key's problem may point at the
    key: where a mapping lacks the last key, the mapping itself is returned."""
    for part in where:
        if isinstance(node, MappingNode) and isinstance(part, str):
            found = next((v for k, v in node.value
                          if isinstance(k, ScalarNode) and k.value == part), None)
        elif isinstance(node, SequenceNode) and isinstance(part, int) and \
                -len(node.value) <= part < len(node.value):
            found = node.value[part]
        else:
            found = None
        if found is None:
            return node
        node = found
    return node


@dataclass(frozen=True, slots=True)
class Block:
    """One YAML mapping as read: its entries in file order, where it is, and the node that
    names it (a missing key is reported on that node's line)."""

    entries: Entries
    path: str
    anchor: Node

    def __contains__(self, key: object) -> bool:
        return key in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def node(self, key: str) -> Node:
        """The value of `key` (which must be present)."""
        return self.entries[key][1]

    def key_node(self, key: str) -> ScalarNode:
        """The key itself: where a problem with the key, not its value, is reported."""
        return self.entries[key][0]

    def at(self, key: str) -> str:
        """The path of `key`'s value: `upstreams.vllm.timeouts` + `connect`."""
        return join(self.path, key)

    def locate(self, where: Sequence[str | int]) -> Node:
        """The node at key path `where` inside this mapping, as `locate` finds it; the anchor
        when its first key is absent."""
        if not where or not isinstance(where[0], str) or where[0] not in self.entries:
            return self.anchor
        return locate(self.node(where[0]), where[1:])
