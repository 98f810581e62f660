"""Route keys that several kinds share: what to do with the client's system prompt, what of
the agent's work to show, and how callers map to conversations. A kind that takes them lists
them in its declaration's `route_keys` and calls these from its route reader."""

from __future__ import annotations

from typing import Literal

from yaml.nodes import Node

from proxy.config.reader import Reader, unknown
from proxy.config.specs import SessionSpec

SHOW_OPTIONS: tuple[str, ...] = ("reasoning", "tools")
SESSION_KEYS: tuple[str, ...] = ("without_hint", "from_user", "busy_timeout")


def read_client_system(reader: Reader, node: Node, path: str) -> Literal["drop", "prepend"]:
    value = reader.choice(node, path, ("drop", "prepend"))
    return "prepend" if value == "prepend" else "drop"


def read_show(reader: Reader, node: Node, path: str) -> tuple[str, ...]:
    shown: list[str] = []
    for item, item_path in reader.items(node, path, "a list"):
        value = reader.string(item, item_path)
        if value is None:
            continue
        if value not in SHOW_OPTIONS:
            reader.error(item, item_path, unknown("value", value, SHOW_OPTIONS))
        elif value not in shown:
            shown.append(value)
    return tuple(shown)


def read_session(
    reader: Reader, node: Node, path: str, keys: tuple[str, ...] = SESSION_KEYS
) -> SessionSpec:
    """`keys`: the session keys the kind's routes take (a subset of SESSION_KEYS)."""
    block = reader.block(node, path, keys=keys, empty_ok=False)
    if block is None:
        return SessionSpec()
    present = [key for key in keys if key in block]
    without_hint: Literal["agent", "per_key"] = "agent"
    if "without_hint" in present:
        value = reader.choice(block.node("without_hint"), block.at("without_hint"),
                              ("agent", "per_key"))
        if value == "per_key":
            without_hint = "per_key"
    from_user = False
    if "from_user" in present:
        from_user = bool(reader.boolean(block.node("from_user"), block.at("from_user")))
    busy = SessionSpec().busy_timeout
    if "busy_timeout" in present:
        busy = reader.seconds(block.node("busy_timeout"), block.at("busy_timeout")) or busy
    return SessionSpec(without_hint=without_hint, from_user=from_user, busy_timeout=busy)
