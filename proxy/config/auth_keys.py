"""The `auth` section: the client keys this proxy accepts, and the explicit open door."""

from __future__ import annotations

from yaml.nodes import Node

from proxy.config.reader import Block, Reader, line_of
from proxy.config.specs import AuthSpec, KeySpec

AUTH_KEYS: tuple[str, ...] = ("keys", "allow_unauthenticated")
KEY_KEYS: tuple[str, ...] = ("key", "models", "name")


def read_auth(reader: Reader, node: Node) -> AuthSpec:
    block = reader.block(node, "auth", keys=AUTH_KEYS)
    if not block:
        return AuthSpec()
    keys: list[KeySpec] = []
    if "keys" in block:
        keys = _keys(reader, block.node("keys"), block.at("keys"))
    allow = False
    if "allow_unauthenticated" in block:
        allow = bool(reader.boolean(block.node("allow_unauthenticated"),
                                    block.at("allow_unauthenticated")))
    return AuthSpec(keys=tuple(keys), allow_unauthenticated=allow)


def _keys(reader: Reader, node: Node, path: str) -> list[KeySpec]:
    specs: list[KeySpec] = []
    first_path: dict[str, str] = {}
    for item, item_path in reader.items(node, path, "keys"):
        block = reader.block(item, item_path, keys=KEY_KEYS)
        found = _key(reader, block) if block is not None else None
        if found is None:
            continue
        spec, key_node = found
        key_path = f"{item_path}.key"
        if spec.key in first_path:
            # Names the earlier entry, never the key itself: messages end up in logs.
            reader.error(key_node, key_path, f"same key as {first_path[spec.key]}")
            continue
        first_path[spec.key] = key_path
        specs.append(spec)
    return specs


def _key(reader: Reader, block: Block) -> tuple[KeySpec, Node] | None:
    models: tuple[str, ...] = ("*",)
    if "models" in block:
        models = _patterns(reader, block.node("models"), block.at("models"))
    name = None
    if "name" in block:
        name = reader.string(block.node("name"), block.at("name"))
    if not reader.require(block, "key"):
        return None
    key_node, key_path = block.node("key"), block.at("key")
    key = reader.secret(key_node, key_path)
    if key == "":
        reader.error(key_node, key_path, "empty API key")
    elif key is not None and any(c.isspace() for c in key):
        # Clients send the key as `Bearer <key>`, which cannot carry whitespace.
        reader.error(key_node, key_path, "an API key cannot contain whitespace")
        return None
    if not key:
        return None
    return KeySpec(key=key, line=line_of(block.anchor), models=models, name=name), key_node


def _patterns(reader: Reader, node: Node, path: str) -> tuple[str, ...]:
    items = reader.sequence(node, path, "model patterns")
    if items is None:
        return ()
    if not items:
        reader.error(node, path, "the list is empty, so this key would grant no model")
    patterns = []
    for i, item in enumerate(items):
        pattern = reader.nonempty_string(item, f"{path}[{i}]")
        if pattern is not None:
            patterns.append(pattern)
    return tuple(patterns)
