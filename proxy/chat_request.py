"""Parsing and checking a chat-completions request body. Sans-IO: bytes in, ChatRequest out."""

from __future__ import annotations

from typing import Any, NamedTuple

from proxy.errors import InvalidRequest, UnsupportedMediaType
from proxy.json_body import kind_of, load_object

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


class ChatRequest(NamedTuple):
    # A NamedTuple, not a frozen dataclass: every chat request makes one, and a frozen
    # dataclass sets each field through object.__setattr__.
    body: dict[str, Any]
    model: str | None
    stream: bool
    include_usage: bool


def check_content_type(content_type: str) -> None:
    """JSON, or nothing said: curl without -H and some SDKs send no type at all."""
    if content_type in ("application/json", "application/octet-stream", ""):
        return
    if content_type.endswith("+json"):
        return
    raise UnsupportedMediaType(
        f"Unsupported Content-Type {content_type!r}: send the body as application/json."
    )


def parse_chat_request(raw: bytes) -> ChatRequest:
    body = load_object(raw)

    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise InvalidRequest("'model' must be a non-empty string.", param="model")

    _check_messages(body.get("messages"))

    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest(
            f"Invalid type for 'stream': expected a boolean, got {kind_of(stream)}.",
            param="stream",
        )
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise InvalidRequest(
                "'stream_options' must be an object.", param="stream_options"
            )
        usage = options.get("include_usage")
        if usage is not None and not isinstance(usage, bool):
            raise InvalidRequest(
                "'stream_options.include_usage' must be a boolean.",
                param="stream_options.include_usage",
            )
        include_usage = bool(usage)
    return ChatRequest(body, model, bool(stream), include_usage)


def _check_messages(messages: Any) -> None:
    if messages is None:
        raise InvalidRequest("Missing required parameter: 'messages'.", param="messages")
    if not isinstance(messages, list):
        raise InvalidRequest(
            f"Invalid type for 'messages': expected an array, got {kind_of(messages)}.",
            param="messages",
        )
    if not messages:
        raise InvalidRequest(
            "'messages' must contain at least one message.", param="messages"
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(
                f"Invalid type for 'messages[{i}]': expected an object, "
                f"got {kind_of(message)}.",
                param=f"messages[{i}]",
            )
        role = message.get("role")
        # A list or object `role` is unhashable: test the type before the set lookup.
        if not isinstance(role, str) or role not in ROLES:
            what = "Missing required parameter" if role is None else "Invalid value"
            raise InvalidRequest(
                f"{what}: 'messages[{i}].role'. Supported values are: "
                "'system', 'developer', 'user', 'assistant', 'tool' and 'function'.",
                param=f"messages[{i}].role",
            )
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise InvalidRequest(
                f"Invalid type for 'messages[{i}].content': expected a string or an array, "
                f"got {kind_of(content)}.",
                param=f"messages[{i}].content",
            )
