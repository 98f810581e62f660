"""Parsing and checking a chat-completions request body. Sans-IO: bytes in, ChatRequest out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from proxy.errors import InvalidRequest, UnsupportedMediaType

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
# orjson parses JSON nested up to 1024 levels but serializes only up to 254, so a body nested
# deeper than this would parse and then fail (a 500) where an adapter forwards it.
MAX_DEPTH = 254


@dataclass(frozen=True, slots=True)
class ChatRequest:
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
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest(
            "We could not parse the JSON body of your request. The body must be a JSON object."
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    # Counting brackets is a cheap bound on the depth: only bodies that could be too deep pay
    # for the trial serialization.
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH:
        try:
            orjson.dumps(body)
        except orjson.JSONEncodeError:
            raise InvalidRequest(
                f"The request body is nested too deeply (more than {MAX_DEPTH} levels)."
            ) from None

    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise InvalidRequest("'model' must be a non-empty string.", param="model")

    _check_messages(body.get("messages"))

    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest(
            f"Invalid type for 'stream': expected a boolean, got {_type_name(stream)}.",
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
            f"Invalid type for 'messages': expected an array, got {_type_name(messages)}.",
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
                f"got {_type_name(message)}.",
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
                f"got {_type_name(content)}.",
                param=f"messages[{i}].content",
            )


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "null"
