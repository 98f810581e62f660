"""The open items of a Responses stream and the frames of its events. Sans-IO.

A `message` or `reasoning` item (`OpenItem`) with its one open content part, and a
`function_call` item (`OpenCall`), as ResponsesWriter keeps them while their deltas stream:
each knows its id and output index, the text or arguments so far, and the prefix of its delta
events, built once so a delta costs one `orjson.dumps` of its text and a few byte joins.
"""

from __future__ import annotations

import base64
import functools
import os
from typing import Any, Final

import orjson

from proxy.ingress.responses_tools import call_name
from proxy.sse import EVENT_END, event_head

__all__ = [
    "END", "PARTS", "SEQ", "OpenCall", "OpenItem", "Unencodable", "empty_part", "encode_event",
    "frame", "new_item_base",
]


@functools.cache
def frame(kind: str) -> bytes:
    """The start of an event of type `kind`, up to its JSON data; made once per kind (the
    kinds are the API's own names, a few dozen)."""
    return event_head(kind)


class Unencodable(Exception):
    """An event orjson cannot write (nested past its 254 levels): the proxy's own failure.
    Not a TypeError, which is what a chunk of the wrong shape raises, the upstream's."""


def encode_event(head: bytes, payload: dict[str, Any]) -> bytes:
    try:
        return head + orjson.dumps(payload) + EVENT_END
    except orjson.JSONEncodeError as exc:
        raise Unencodable(str(exc)) from exc


# Per content-part kind: the delta event, the done event, and the part's text field.
PARTS: Final = {
    "output_text": ("response.output_text.delta", "response.output_text.done", "text"),
    "refusal": ("response.refusal.delta", "response.refusal.done", "refusal"),
    "reasoning_text": ("response.reasoning_text.delta", "response.reasoning_text.done", "text"),
}
SEQ: Final = b',"sequence_number":'
END: Final = b"}" + EVENT_END


def new_item_base() -> str:
    """A random base for one response's item ids (URL-safe)."""
    return base64.urlsafe_b64encode(os.urandom(9)).decode()


def empty_part(kind: str) -> dict[str, Any]:
    if kind == "output_text":
        return {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    if kind == "refusal":
        return {"type": "refusal", "refusal": ""}
    return {"type": "reasoning_text", "text": ""}


class OpenItem:
    """An open `message` or `reasoning` item and its open content part."""

    __slots__ = ("id", "index", "kind", "part", "part_kind", "parts", "prefix", "texts")

    def __init__(self, kind: str, item_id: str, index: int) -> None:
        self.kind = kind
        self.id = item_id
        self.index = index
        self.parts: list[dict[str, Any]] = []
        self.part_kind = ""
        self.part: dict[str, Any] | None = None
        self.texts: list[str] = []
        self.prefix = b""

    def open_part(self, part_kind: str, events: bool = True) -> None:
        """Opens a part of `part_kind`, and (for a writer of events) the prefix of its delta
        events."""
        self.part_kind = part_kind
        self.part = empty_part(part_kind)
        self.texts = []
        if not events:
            return
        delta_type = PARTS[part_kind][0]
        logprobs = b'"logprobs":[],' if part_kind == "output_text" else b""
        self.prefix = (
            frame(delta_type) + b'{"type":"' + delta_type.encode() + b'","item_id":"'
            + self.id.encode() + b'","output_index":' + str(self.index).encode()
            + b',"content_index":' + str(len(self.parts)).encode() + b"," + logprobs
            + b'"delta":'
        )

    def snapshot(self, status: str) -> dict[str, Any]:
        parts = list(self.parts)
        if self.part is not None:
            part = dict(self.part)
            part[PARTS[self.part_kind][2]] = "".join(self.texts)
            parts.append(part)
        if self.kind == "message":
            return {"id": self.id, "type": "message", "status": status, "role": "assistant",
                    "content": parts}
        return {"id": self.id, "type": "reasoning", "status": status, "summary": [],
                "content": parts}


class OpenCall:
    """An open `function_call` item. `name` is the chat call's function name as streamed;
    the item names it as the client does (`call_name`: a namespaced function's own name and
    its `namespace`), from the tools the response echoes."""

    __slots__ = ("args", "call_id", "chat_index", "id", "index", "name", "prefix", "tools")

    def __init__(
        self, item_id: str, index: int, chat_index: int, call_id: str, name: str,
        tools: Any = None,
    ) -> None:
        self.id = item_id
        self.index = index
        self.chat_index = chat_index
        self.call_id = call_id
        self.name = name
        self.tools = tools
        self.args: list[str] = []
        self.prefix = (
            b'event: response.function_call_arguments.delta\ndata: {"type":'
            b'"response.function_call_arguments.delta","item_id":"' + item_id.encode()
            + b'","output_index":' + str(index).encode() + b',"delta":'
        )

    def snapshot(self, status: str, arguments: str | None = None) -> dict[str, Any]:
        return function_call_item(
            self.id, status, self.call_id, self.name,
            "".join(self.args) if arguments is None else arguments, self.tools,
        )


def function_call_item(
    item_id: str, status: str, call_id: str, chat_name: str, arguments: str, tools: Any
) -> dict[str, Any]:
    """A `function_call` output item of the chat call of function `chat_name`."""
    name, namespace = call_name(chat_name, tools)
    item = {"id": item_id, "type": "function_call", "status": status, "call_id": call_id,
            "name": name, "arguments": arguments}
    if namespace is not None:
        item["namespace"] = namespace
    return item
