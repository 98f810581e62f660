"""Any YAML value as plain Python data, for values the schema passes on as data (a custom
upstream's request body template), within limits a file cannot talk its way past."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, SequenceNode

from proxy.config.nodes import BOOL, FLOAT, INT, NULL, STR, describe, join

if TYPE_CHECKING:
    from proxy.config.reader import Reader

# Aliases are expanded, so a few hundred bytes of anchors can name billions of values; the
# budget is per file, not per value, so that many small aliases cannot add up either.
MAX_PLAIN_VALUES = 100_000
MAX_PLAIN_DEPTH = 64
# orjson's range for whole numbers: a larger one would pass `check` and fail every request.
_SMALLEST = -(1 << 63)
_LARGEST = (1 << 64) - 1
_SCALARS = SafeConstructor()


class PlainValues:
    """One file's plain values, reported through its Reader, with one budget for the file."""

    __slots__ = ("_left", "_reader")

    def __init__(self, reader: Reader) -> None:
        self._reader = reader
        self._left = MAX_PLAIN_VALUES

    def value(self, node: Node, path: str, depth: int) -> Any:
        reader = self._reader
        if self._left < 0:
            return None
        self._left -= 1
        if self._left < 0:
            reader.error(node, path, f"more than {MAX_PLAIN_VALUES} values once YAML aliases "
                         "are expanded (the limit for a file)")
            return None
        if depth > MAX_PLAIN_DEPTH and isinstance(node, (MappingNode, SequenceNode)):
            reader.error(node, path, f"nested more than {MAX_PLAIN_DEPTH} levels deep (a YAML "
                         "alias inside what it names?)")
            return None
        if isinstance(node, MappingNode):
            return {name: self.value(value, join(path, name), depth + 1)
                    for name, (_, value) in reader.mapping(node, path).items()}
        if isinstance(node, SequenceNode):
            return [self.value(item, f"{path}[{i}]", depth + 1)
                    for i, item in enumerate(node.value)]
        if node.tag == STR:
            return reader.string(node, path)
        if node.tag in (INT, FLOAT) and not reader.not_too_long(node, path):
            return None
        if node.tag in (INT, FLOAT, BOOL, NULL):
            value = _SCALARS.construct_object(node)
            if type(value) is int and not _SMALLEST <= value <= _LARGEST:
                reader.error(node, path, f"a whole number must fit in 64 bits ({_SMALLEST} to "
                             f"{_LARGEST}) to be sent as JSON")
                return None
            return value
        reader.error(node, path, f"expected plain data, got {describe(node)}")
        return None
