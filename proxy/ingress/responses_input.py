"""Responses input items → chat-completions messages. Sans-IO.

A string `input` is one user message; `message` items keep their role (`developer` becomes
`system`, which every model server accepts) with `input_text`/`output_text` → text and
`input_image` → `image_url` parts; consecutive `function_call` items → one assistant message
with `tool_calls`, joined to the assistant text just before them (one model turn);
`function_call_output` → a `tool` message; `reasoning` items are dropped, since no chat
upstream can take them back.
"""

from __future__ import annotations

from typing import Any, Final

from proxy.errors import InvalidRequest
from proxy.ingress.fields import req_str
from proxy.json_body import kind_of

__all__ = ["translate_input"]

_ROLES: Final = {"user": "user", "assistant": "assistant", "system": "system",
                 "developer": "system"}
_TEXT_PARTS: Final = frozenset({"input_text", "output_text", "text"})


def translate_input(value: Any, messages: list[dict[str, Any]], sources: list[str]) -> None:
    """Appends the chat messages of a Responses `input` (a string or an item array), and to
    `sources` the path of what each came from (`input`, `input[3]`), so that an error found
    in a chat message can name what the client sent."""
    if value is None:
        return
    if isinstance(value, str):
        messages.append({"role": "user", "content": value})
        sources.append("input")
        return
    if not isinstance(value, list):
        raise InvalidRequest(
            f"Invalid type for 'input': expected a string or an array, got {kind_of(value)}.",
            param="input",
        )
    for i, item in enumerate(value):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequest(
                f"Invalid type for '{param}': expected an object, got {kind_of(item)}.",
                param=param,
            )
        kind = item.get("type")
        if kind is None and "role" in item:
            kind = "message"
        if kind == "message":
            messages.append(_message(item, param))
            sources.append(param)
        elif kind == "function_call":
            _function_call(item, param, messages)
            if len(sources) < len(messages):
                sources.append(param)
        elif kind == "function_call_output":
            messages.append(_function_call_output(item, param))
            sources.append(param)
        elif kind == "reasoning":
            continue
        elif kind == "item_reference":
            raise InvalidRequest(
                f"'{param}' is an item reference, which needs stored responses; this proxy "
                "stores none. Send the item itself.",
                param=param,
            )
        elif not isinstance(kind, str):
            raise _bad_type(kind, f"{param}.type")
        else:
            raise InvalidRequest(
                f"Input items of type '{kind}' ('{param}') are not supported: only message, "
                "function_call, function_call_output and reasoning items translate to chat "
                "completions.",
                param=f"{param}.type",
            )


def _message(item: dict[str, Any], param: str) -> dict[str, Any]:
    role = item.get("role")
    chat_role = _ROLES.get(role) if isinstance(role, str) else None
    if chat_role is None:
        if not isinstance(role, str):
            raise _bad_type(role, f"{param}.role")
        raise InvalidRequest(
            f"Invalid value for '{param}.role': supported values are 'user', 'assistant', "
            "'system' and 'developer'.",
            param=f"{param}.role",
        )
    content = item.get("content")
    if isinstance(content, str):
        return {"role": chat_role, "content": content}
    if not isinstance(content, list):
        raise InvalidRequest(
            f"Invalid type for '{param}.content': expected a string or an array, "
            f"got {kind_of(content)}.",
            param=f"{param}.content",
        )
    if chat_role == "assistant":
        return _assistant_message(content, param)
    parts = [_part(part, f"{param}.content[{j}]", chat_role) for j, part in enumerate(content)]
    if len(parts) == 1 and parts[0]["type"] == "text":
        return {"role": chat_role, "content": parts[0]["text"]}
    return {"role": chat_role, "content": parts}


def _assistant_message(content: list[Any], param: str) -> dict[str, Any]:
    # Output text parts are segments of one answer: chat takes them back as one string.
    text: list[str] = []
    refusal: list[str] = []
    for j, part in enumerate(content):
        where = f"{param}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(kind, str):
            raise _bad_part(part, where)
        if kind in _TEXT_PARTS:
            text.append(req_str(part, "text", where))
        elif kind == "refusal":
            refusal.append(req_str(part, "refusal", where))
        else:
            raise InvalidRequest(
                f"Invalid content part '{where}': assistant messages take output_text and "
                "refusal parts.",
                param=where,
            )
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
    if refusal:
        message["refusal"] = "".join(refusal)
    return message


def _part(part: Any, param: str, role: str) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if not isinstance(kind, str):
        raise _bad_part(part, param)
    if kind in _TEXT_PARTS:
        return {"type": "text", "text": req_str(part, "text", param)}
    if kind == "input_image" and role == "user":
        url = part.get("image_url")
        if not isinstance(url, str) or not url:
            if url is not None and not isinstance(url, str):
                raise _bad_type(url, f"{param}.image_url")
            raise InvalidRequest(
                f"'{param}' needs an 'image_url' (a URL or a data: URL); file ids need the "
                "Files API, which this proxy does not serve.",
                param=f"{param}.image_url",
            )
        image: dict[str, Any] = {"url": url}
        detail = part.get("detail")
        if detail is not None:
            if detail not in ("auto", "low", "high"):
                if not isinstance(detail, str):
                    raise _bad_type(detail, f"{param}.detail")
                raise InvalidRequest(
                    f"Invalid value for '{param}.detail': supported values are 'auto', 'low' "
                    "and 'high'.",
                    param=f"{param}.detail",
                )
            image["detail"] = detail
        return {"type": "image_url", "image_url": image}
    if kind == "input_file" and role == "user":
        file: dict[str, Any] = {}
        for key in ("file_data", "file_id", "filename"):
            value = part.get(key)
            if value is not None:
                file[key] = req_str(part, key, param)
        if "file_data" not in file and "file_id" not in file:
            raise InvalidRequest(
                f"'{param}' needs 'file_data' (with 'filename') or 'file_id'; 'file_url' "
                "does not translate to chat completions.",
                param=param,
            )
        return {"type": "file", "file": file}
    if kind in ("input_image", "input_file"):
        raise InvalidRequest(
            f"'{param}': images and files are accepted in user messages only.", param=param
        )
    raise InvalidRequest(
        f"Invalid content part '{param}': supported types are input_text, input_image and "
        "input_file.",
        param=f"{param}.type",
    )


def _function_call(item: dict[str, Any], param: str, messages: list[dict[str, Any]]) -> None:
    call = {
        "id": req_str(item, "call_id", param),
        "type": "function",
        "function": {
            "name": req_str(item, "name", param),
            "arguments": req_str(item, "arguments", param),
        },
    }
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant":
        # The calls of one model turn, and the text it wrote before them, are one chat message.
        last.setdefault("tool_calls", []).append(call)
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _function_call_output(item: dict[str, Any], param: str) -> dict[str, Any]:
    call_id = req_str(item, "call_id", param)
    output = item.get("output")
    if isinstance(output, list):
        text: list[str] = []
        for j, part in enumerate(output):
            kind = part.get("type") if isinstance(part, dict) else None
            if not isinstance(kind, str):
                raise _bad_part(part, f"{param}.output[{j}]")
            if kind not in _TEXT_PARTS:
                raise InvalidRequest(
                    f"'{param}.output[{j}]': chat completions take text tool results only.",
                    param=f"{param}.output[{j}]",
                )
            text.append(req_str(part, "text", f"{param}.output[{j}]"))
        output = "".join(text)
    elif not isinstance(output, str):
        raise InvalidRequest(
            f"Invalid type for '{param}.output': expected a string or an array, "
            f"got {kind_of(output)}.",
            param=f"{param}.output",
        )
    return {"role": "tool", "tool_call_id": call_id, "content": output}


def _bad_part(part: Any, param: str) -> InvalidRequest:
    """A content part that is not an object or whose `type` is not a string (tested before
    any set lookup: a list or an object is unhashable)."""
    if not isinstance(part, dict):
        return InvalidRequest(
            f"Invalid type for '{param}': expected an object, got {kind_of(part)}.", param=param
        )
    return _bad_type(part.get("type"), f"{param}.type")


def _bad_type(value: Any, param: str) -> InvalidRequest:
    """A string field that is missing, or present with another JSON type."""
    if value is None:
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param)
    return InvalidRequest(
        f"Invalid type for '{param}': expected a string, got {kind_of(value)}.", param=param
    )
