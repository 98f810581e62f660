"""The `echo` kind: answers with the last user message, with no network at all."""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, Iterator
from typing import Any

import aiohttp
import orjson

from proxy.openai_types import ChatChunk, ChunkFactory, accumulate, make_usage
from proxy.sse import encode_data
from proxy.upstreams.base import Call, EventStream, Upstream

_PIECES = re.compile(r"\S+\s*|\s+")
_TOKENS = re.compile(r"\w+|[^\w\s]")


def message_text(content: Any) -> str:
    """The text of a message's `content`: a string, or the text parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text", "")
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
            and isinstance(part.get("text"), str)
        )
    return ""


def count_tokens(text: str) -> int:
    """A rough count (words and punctuation): echo has no tokenizer, only plausible numbers."""
    return len(_TOKENS.findall(text))


class Echo(Upstream):
    kind = "echo"

    def _chunks(self, call: Call) -> Iterator[ChatChunk]:
        messages = call.body["messages"]
        reply = ""
        for message in reversed(messages):
            if message.get("role") == "user":
                reply = message_text(message.get("content"))
                break
        prompt = sum(count_tokens(message_text(m.get("content"))) for m in messages)
        factory = ChunkFactory(call.client_model)
        yield factory.role()
        for piece in _PIECES.findall(reply):
            yield factory.content(piece)
        yield factory.finish("stop")
        if call.include_usage or not call.stream:
            yield factory.usage(make_usage(prompt, count_tokens(reply)))

    async def complete(self, call: Call, http: aiohttp.ClientSession) -> bytes:
        return orjson.dumps(accumulate(self._chunks(call)))

    async def open_stream(self, call: Call, http: aiohttp.ClientSession) -> EventStream:
        return EventStream(self._events(call))

    async def _events(self, call: Call) -> AsyncGenerator[bytes, None]:
        for chunk in self._chunks(call):
            yield encode_data(orjson.dumps(chunk))
