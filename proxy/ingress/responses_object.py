"""The Responses object's fixed parts, and a sync chat completion as the chunks a writer reads.

`RESPONSE_DEFAULTS`: every field the Open Responses object requires, at the value that holds
when the request did not set it. `responses_usage`: chat usage as Responses usage.
`completion_chunks`: the chunks that accumulate to a chat completion, so a sync answer goes
through the same writer as a stream and the two cannot disagree. Sans-IO.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from proxy.errors import ProxyError
from proxy.openai_types import ChatChunk, ChatCompletion, ChunkFactory, ToolCallDelta

__all__ = ["RESPONSE_DEFAULTS", "completion_chunks", "failure_error", "responses_usage"]

RESPONSE_DEFAULTS: Final[Mapping[str, Any]] = {
    # Every field the Open Responses object requires, at the value that holds when the request
    # did not set it; the request's `echo` overrides them.
    "instructions": None,
    "previous_response_id": None,
    "tools": [],
    "tool_choice": "auto",
    "parallel_tool_calls": True,
    "temperature": 1.0,
    "top_p": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "top_logprobs": 0,
    "max_output_tokens": None,
    "max_tool_calls": None,
    "text": {"format": {"type": "text"}},
    "reasoning": None,
    "truncation": "disabled",
    "user": None,
    "metadata": {},
    "service_tier": "default",
    "safety_identifier": None,
    "prompt_cache_key": None,
}


def failure_error(err: ProxyError) -> dict[str, Any]:
    """The `error` of a failed response object: the Responses API knows two codes for a
    failure that is not the request's fault, and keeps the rest in type and message."""
    return {
        "code": "rate_limit_exceeded" if err.status == 429 else "server_error",
        "message": err.message,
        "type": err.type,
        "param": err.param,
    }


def responses_usage(usage: Mapping[str, Any] | None) -> dict[str, Any]:
    """Chat usage → Responses usage with both details objects; zeros for what is unknown."""
    usage = usage or {}
    prompt = _count(usage.get("prompt_tokens"))
    completion = _count(usage.get("completion_tokens"))
    total = _count(usage.get("total_tokens")) or prompt + completion
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    if not isinstance(prompt_details, Mapping):
        prompt_details = {}
    if not isinstance(completion_details, Mapping):
        completion_details = {}
    return {
        "input_tokens": prompt,
        "input_tokens_details": {
            "cached_tokens": _count(prompt_details.get("cached_tokens")),
            "cache_write_tokens": _count(prompt_details.get("cache_write_tokens")),
        },
        "output_tokens": completion,
        "output_tokens_details": {
            "reasoning_tokens": _count(completion_details.get("reasoning_tokens")),
        },
        "total_tokens": total,
    }


def _count(value: Any) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, float) and value == value and value >= 0:
        return int(value)
    return 0


def completion_chunks(completion: ChatCompletion) -> list[ChatChunk]:
    """The chunks that accumulate to a sync chat completion, for a writer to read."""
    factory = ChunkFactory(completion.get("model", ""), completion.get("id") or None)
    factory.created = completion.get("created") or factory.created
    chunks: list[ChatChunk] = [factory.role()]
    finish = "stop"
    for choice in completion.get("choices", [])[:1]:
        message = choice.get("message") or {}
        reasoning = message.get("reasoning_content")
        if reasoning:
            chunks.append(factory.reasoning(reasoning))
        content = message.get("content")
        if content:
            chunks.append(factory.content(content))
        refusal = message.get("refusal")
        if refusal:
            chunks.append(factory.chunk({"refusal": refusal}))
        calls: list[ToolCallDelta] = []
        for i, call in enumerate(message.get("tool_calls") or ()):
            function = call.get("function") or {}
            calls.append({
                "index": i,
                "id": call.get("id") or "",
                "type": "function",
                "function": {"name": function.get("name") or "",
                             "arguments": function.get("arguments") or ""},
            })
        if calls:
            chunks.append(factory.chunk({"tool_calls": calls}))
        finish = choice.get("finish_reason") or finish
    chunks.append(factory.finish(finish))
    usage = completion.get("usage")
    if usage:
        chunks.append(factory.usage(usage))
    return chunks
