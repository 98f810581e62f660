"""An OpenAI `messages` list -> the turn placeholders of a `custom` request (sans-IO).

Clients resend the whole chat every turn; an agent that keeps its own memory needs only the
new turn (the user messages after the last assistant message, the same rule as the `letta`
kind), while a stateless API needs the history or the whole list. Tool and function messages
belong to the client's own tools and are never sent. Content is flattened to text: custom
upstreams take text only (images and files are left out).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from proxy.errors import InvalidRequest

# `refuse_unserved` is the custom kind's check of the chat parameters it cannot honour too.
from proxy.upstreams.letta_request import new_turn_start, refuse_unserved

__all__ = [
    "CLIENT_SYSTEM",
    "DEFAULT_ROLES",
    "TURN_PLACEHOLDERS",
    "ClientSystem",
    "MessageFormat",
    "flatten_content",
    "refuse_unserved",
    "turn_values",
]

ClientSystem = Literal["drop", "prepend", "keep"]
CLIENT_SYSTEM: Final[tuple[str, ...]] = ("drop", "prepend", "keep")

TURN_PLACEHOLDERS: Final[frozenset[str]] = frozenset(
    {"input", "messages", "history", "new_messages", "system", "transcript"}
)

DEFAULT_ROLES: Final[Mapping[str, str | None]] = {
    "system": "system",
    "user": "user",
    "assistant": "assistant",
}

_SKIPPED: Final = frozenset({"tool", "function"})
_SYSTEM: Final = frozenset({"system", "developer"})
_LABELS: Final = {"system": "System", "user": "User", "assistant": "Assistant"}
_PART_SEPARATOR: Final = "\n\n"


@dataclass(frozen=True, slots=True)
class MessageFormat:
    """How `{{ messages }}`, `{{ history }}` and `{{ new_messages }}` render each message.

    `roles` maps system/user/assistant to the upstream's names; None drops that role.
    """

    role_key: str = "role"
    content_key: str = "content"
    roles: Mapping[str, str | None] = field(default_factory=lambda: dict(DEFAULT_ROLES))


DEFAULT_FORMAT: Final = MessageFormat()


def flatten_content(content: Any) -> str:
    """A message's text: the string, or its text parts joined by a blank line."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            part["text"]
            for part in content
            if isinstance(part, dict)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
            and part["text"]
        ]
        return _PART_SEPARATOR.join(texts)
    return ""


def _role(message: Mapping[str, Any]) -> str | None:
    role = message.get("role")
    if not isinstance(role, str) or role in _SKIPPED:
        return None
    return "system" if role in _SYSTEM else role


def turn_values(
    messages: list[dict[str, Any]],
    needed: Collection[str],
    *,
    client_system: ClientSystem = "drop",
    message_format: MessageFormat = DEFAULT_FORMAT,
) -> dict[str, Any]:
    """The values of the turn placeholders in `needed` (others are not computed).

    Raises InvalidRequest when the chat does not end with a user turn that has text.
    `client_system`: `drop` leaves the client's system prompt out everywhere (`system` is
    null); `keep` sends it where the template asks (`system`, the message lists, the
    transcript); `prepend` also puts the new turn's system text before `input`.
    """
    start = new_turn_start(messages)
    keep_system = client_system != "drop"
    new_turn = messages[start:]
    texts: list[str] = []
    system_texts: list[str] = []
    for message in new_turn:
        role = _role(message)
        if role == "user":
            text = flatten_content(message.get("content"))
            if text:
                texts.append(text)
        elif role == "system" and client_system == "prepend":
            text = flatten_content(message.get("content"))
            if text:
                system_texts.append(text)
    if not texts:
        has_user = any(_role(m) == "user" for m in new_turn)
        raise InvalidRequest(
            "The new turn has no text to send to the agent (custom upstreams take text only)."
            if has_user
            else "There is no new user message to send to the agent: the conversation must "
            "end with a user message.",
            param="messages",
        )
    values: dict[str, Any] = {}
    if "input" in needed:
        values["input"] = _PART_SEPARATOR.join(system_texts + texts)
    if "messages" in needed:
        values["messages"] = _format(messages, message_format, keep_system)
    if "history" in needed:
        values["history"] = _format(messages[:start], message_format, keep_system)
    if "new_messages" in needed:
        values["new_messages"] = _format(new_turn, message_format, keep_system)
    if "system" in needed:
        values["system"] = _system(messages) if keep_system else None
    if "transcript" in needed:
        values["transcript"] = _transcript(messages, keep_system)
    return values


def _format(
    messages: list[dict[str, Any]], fmt: MessageFormat, keep_system: bool
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for message in messages:
        role = _role(message)
        if role is None or (role == "system" and not keep_system):
            continue
        name = fmt.roles.get(role)
        if name is None:
            continue
        text = flatten_content(message.get("content"))
        if text:
            out.append({fmt.role_key: name, fmt.content_key: text})
    return out


def _system(messages: list[dict[str, Any]]) -> str | None:
    texts = [
        text
        for message in messages
        if _role(message) == "system" and (text := flatten_content(message.get("content")))
    ]
    return _PART_SEPARATOR.join(texts) if texts else None


def _transcript(messages: list[dict[str, Any]], keep_system: bool) -> str:
    lines: list[str] = []
    for message in messages:
        role = _role(message)
        label = _LABELS.get(role) if role is not None else None
        if label is None or (role == "system" and not keep_system):
            continue
        text = flatten_content(message.get("content"))
        if text:
            lines.append(f"{label}: {text}")
    return "\n".join(lines)
