"""Responses input items → chat-completions messages. Sans-IO.

A string `input` is one user message; `message` items keep their role (`developer` becomes
`system`, which every model server accepts) with `input_text`/`output_text` → text and
`input_image` → `image_url` parts; the leading system messages (`instructions` and the first
system/developer items) are one, since many chat templates take a single system message, first;
an assistant message's text and refusal parts are one string; consecutive `function_call` items
→ one assistant message with `tool_calls`, joined to the assistant text just before them (one
model turn); `function_call_output` → a `tool` message, whose images and files (which a tool
message cannot carry) follow in a user message. Every call needs its output and every output
its call, as chat servers require. `reasoning` items are dropped, since no chat upstream can
take them back. The decisions, per item, are listed in docs/responses.md.
"""

from __future__ import annotations

from typing import Any, Final

from proxy.errors import InvalidRequest
from proxy.ingress.fields import req_str
from proxy.ingress.responses_tools import qualified
from proxy.json_body import kind_of

__all__ = ["translate_input"]

_ROLES: Final = {"user": "user", "assistant": "assistant", "system": "system",
                 "developer": "system"}
_TEXT_PARTS: Final = frozenset({"input_text", "output_text", "text"})
# Chat has no `original` (full resolution): `high` is the nearest.
_DETAILS: Final = {"auto": "auto", "low": "low", "high": "high", "original": "high"}


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
    # Only the leading system messages merge: a later one keeps its place in the turns.
    leading = all(m["role"] == "system" for m in messages)
    calls: dict[str, str] = {}  # call_id → its item's path, until its output comes
    media: list[dict[str, Any]] = []  # tool outputs' images and files, for a user message
    media_from = ""  # the first output they came from
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
        if media and kind != "function_call_output" and kind != "reasoning":
            _flush_media(media, media_from, messages, sources)
        if kind == "message":
            message = _message(item, param)
            if message["role"] != "system":
                leading = False
            elif leading and messages:
                messages[-1]["content"] += "\n\n" + message["content"]
                continue
            messages.append(message)
            sources.append(param)
        elif kind == "function_call":
            leading = False
            call_id = _function_call(item, param, messages)
            calls.setdefault(call_id, param)
            if len(sources) < len(messages):
                sources.append(param)
        elif kind == "function_call_output":
            leading = False
            if not media:
                media_from = param
            message = _function_call_output(item, param, media)
            if calls.pop(message["tool_call_id"], None) is None:
                raise InvalidRequest(
                    f"No function_call before '{param}' has its call_id "
                    f"'{message['tool_call_id']}' (or its output came already): send the "
                    "call in 'input' before its output; this proxy stores no earlier "
                    "responses.",
                    param=f"{param}.call_id",
                )
            messages.append(message)
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
    if media:
        _flush_media(media, media_from, messages, sources)
    if calls:
        call_id, param = next(iter(calls.items()))
        raise InvalidRequest(
            f"No function_call_output in 'input' answers '{param}' (call_id '{call_id}'): "
            "chat models need the output of every call they made.",
            param=f"{param}.call_id",
        )


def _flush_media(media: list[dict[str, Any]], source: str, messages: list[dict[str, Any]],
                 sources: list[str]) -> None:
    """The images and files of the tool outputs just before, as the user message after them
    (a chat tool message takes text only; a message between tool messages would split them
    from their calls)."""
    messages.append({"role": "user", "content": list(media)})
    sources.append(source)
    media.clear()


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
    if chat_role == "system" or not parts:
        # Text only (images are refused there): a string, which every template takes and
        # the leading system messages merge into.
        return {"role": chat_role, "content": "".join(part["text"] for part in parts)}
    if len(parts) == 1 and parts[0]["type"] == "text":
        return {"role": chat_role, "content": parts[0]["text"]}
    return {"role": chat_role, "content": parts}


def _assistant_message(content: list[Any], param: str) -> dict[str, Any]:
    # Output text parts are segments of one answer: chat takes them back as one string. A
    # refusal joins it too: most chat servers render no `refusal` field, and the model would
    # see an empty turn.
    text: list[str] = []
    for j, part in enumerate(content):
        where = f"{param}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(kind, str):
            raise _bad_part(part, where)
        if kind in _TEXT_PARTS:
            text.append(req_str(part, "text", where))
        elif kind == "refusal":
            text.append(req_str(part, "refusal", where))
        else:
            raise InvalidRequest(
                f"Invalid content part '{where}': assistant messages take output_text and "
                "refusal parts.",
                param=where,
            )
    return {"role": "assistant", "content": "".join(text)}


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
            if detail not in _DETAILS:
                if not isinstance(detail, str):
                    raise _bad_type(detail, f"{param}.detail")
                raise InvalidRequest(
                    f"Invalid value for '{param}.detail': supported values are 'auto', 'low', "
                    "'high' and 'original'.",
                    param=f"{param}.detail",
                )
            image["detail"] = _DETAILS[detail]
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


def _function_call(item: dict[str, Any], param: str, messages: list[dict[str, Any]]) -> str:
    call_id = _nonempty(item, "call_id", param)
    name = _nonempty(item, "name", param)
    if item.get("namespace") is not None:
        # A namespaced function's call, named as the chat model was offered it.
        name = qualified(_nonempty(item, "namespace", param), name)
    call = {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": req_str(item, "arguments", param)},
    }
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant":
        # The calls of one model turn, and the text it wrote before them, are one chat message.
        last.setdefault("tool_calls", []).append(call)
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    return call_id


def _function_call_output(
    item: dict[str, Any], param: str, media: list[dict[str, Any]]
) -> dict[str, Any]:
    """The tool message; the output's images and files go to `media`."""
    call_id = _nonempty(item, "call_id", param)
    output = item.get("output")
    if isinstance(output, list):
        text: list[str] = []
        for j, part in enumerate(output):
            chat_part = _part(part, f"{param}.output[{j}]", "user")
            if chat_part["type"] == "text":
                text.append(chat_part["text"])
            else:
                media.append(chat_part)
        output = "".join(text)
    elif not isinstance(output, str):
        raise InvalidRequest(
            f"Invalid type for '{param}.output': expected a string or an array, "
            f"got {kind_of(output)}.",
            param=f"{param}.output",
        )
    return {"role": "tool", "tool_call_id": call_id, "content": output}


def _nonempty(item: dict[str, Any], key: str, param: str) -> str:
    """A call's `call_id` or `name`: "" pairs no call with its output and names no function,
    and OpenAI refuses it, in these words."""
    value = req_str(item, key, param)
    if not value:
        where = f"{param}.{key}"
        raise InvalidRequest(
            f"Invalid '{where}': empty string. Expected a string with minimum length 1, but "
            "got an empty string instead.",
            param=where,
            code="empty_string",
        )
    return value


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
