"""OpenAI chat-completions wire shapes, chunk builders, and the stream accumulator.

The OpenAI chat format is the proxy's internal language: adapters that translate produce
`ChatChunk` dicts with these builders, and a sync answer is `accumulate(chunks)`, so sync and
stream can never disagree.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from typing import Any, Final, NotRequired, TypedDict


class FunctionCall(TypedDict, total=False):
    name: str
    arguments: str


class ToolCallDelta(TypedDict, total=False):
    index: int
    id: str
    type: str
    function: FunctionCall


class Delta(TypedDict, total=False):
    role: str
    content: str | None
    reasoning_content: str
    tool_calls: list[ToolCallDelta]
    refusal: str | None


class ChunkChoice(TypedDict):
    index: int
    delta: Delta
    logprobs: NotRequired[Any]
    finish_reason: str | None


class Usage(TypedDict, total=False):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int]
    completion_tokens_details: dict[str, int]


class ChatChunk(TypedDict):
    id: str
    object: str
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: NotRequired[Usage | None]
    system_fingerprint: NotRequired[str | None]


class ChatMessage(TypedDict, total=False):
    role: str
    content: str | None
    reasoning_content: str
    tool_calls: list[dict[str, Any]]
    refusal: str | None


class CompletionChoice(TypedDict):
    index: int
    message: ChatMessage
    logprobs: Any
    finish_reason: str | None


class ChatCompletion(TypedDict):
    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: NotRequired[str | None]


def new_completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


class ChunkFactory:
    """Builds the chunks of one stream: `id`, `created` and `model` are the same on every one."""

    __slots__ = ("created", "id", "model")

    def __init__(self, model: str, completion_id: str | None = None) -> None:
        self.id = completion_id or new_completion_id()
        self.created = int(time.time())
        self.model = model

    def chunk(self, delta: Delta, finish_reason: str | None = None) -> ChatChunk:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            # logprobs: null as OpenAI sends it, in its place: strict clients compare shapes.
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }

    def role(self) -> ChatChunk:
        return self.chunk({"role": "assistant", "content": ""})

    def content(self, text: str) -> ChatChunk:
        return self.chunk({"content": text})

    def reasoning(self, text: str) -> ChatChunk:
        return self.chunk({"reasoning_content": text})

    def finish(self, reason: str) -> ChatChunk:
        return self.chunk({}, reason)

    def usage(self, usage: Usage) -> ChatChunk:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage,
        }


# The largest token count an answer gives: a JavaScript client reads no larger integer
# exactly, and a sum of two stays far inside the 64 bits JSON encoders (orjson) write.
MAX_COUNT: Final = 2**53


def token_count(value: Any) -> int | None:
    """A token count an upstream reported, as a client can read it: an integer clamped to
    0..MAX_COUNT, a float truncated into that range; None for what is not a number (a
    boolean, a string, NaN). Every upstream number that becomes a `usage` passes here."""
    if type(value) is int:
        if 0 <= value <= MAX_COUNT:  # nearly always: one check
            return value
        return MAX_COUNT if value > 0 else 0
    if type(value) is float and value == value:
        return int(min(max(value, 0.0), MAX_COUNT))
    return None


def make_usage(prompt: int, completion: int) -> Usage:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": min(prompt + completion, MAX_COUNT),
    }


def accumulate(chunks: Iterable[ChatChunk]) -> ChatCompletion:
    """The sync completion that a client accumulating these chunks would hold."""
    completion_id = ""
    created = 0
    model = ""
    content: list[str] = []
    reasoning: list[str] = []
    refusal: list[str] = []
    tools: dict[int, dict[str, Any]] = {}
    finish: str | None = None
    usage: Usage | None = None
    saw_content = False
    for chunk in chunks:
        completion_id = completion_id or chunk["id"]
        created = created or chunk["created"]
        model = model or chunk["model"]
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk["choices"]:
            delta = choice["delta"]
            text = delta.get("content")
            if text:
                content.append(text)
                saw_content = True
            thought = delta.get("reasoning_content")
            if thought:
                reasoning.append(thought)
            declined = delta.get("refusal")
            if declined:
                refusal.append(declined)
            for call in delta.get("tool_calls") or ():
                slot = tools.setdefault(
                    call.get("index", 0),
                    {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
                )
                if call.get("id"):
                    slot["id"] = call["id"]
                fn = call.get("function") or {}
                if fn.get("name"):
                    slot["function"]["name"] += fn["name"]
                if fn.get("arguments"):
                    slot["function"]["arguments"] += fn["arguments"]
            if choice["finish_reason"] is not None:
                finish = choice["finish_reason"]
    message: ChatMessage = {
        "role": "assistant",
        "content": "".join(content) if saw_content or not tools else None,
    }
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if refusal:
        message["refusal"] = "".join(refusal)
    if tools:
        message["tool_calls"] = [tools[i] for i in sorted(tools)]
    return {
        "id": completion_id or new_completion_id(),
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": usage or make_usage(0, 0),
    }
