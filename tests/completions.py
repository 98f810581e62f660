"""Chat completions for the Responses tests: the chunks a completion accumulates from (the
reference a sync answer is held to), and a hypothesis strategy of completions."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from proxy.openai_types import ChatChunk, ChatCompletion, ChunkFactory, ToolCallDelta


def completion_chunks(completion: ChatCompletion) -> list[ChatChunk]:
    """The chunks that accumulate to a chat completion, in the order a stream brings them:
    reasoning, text, refusal, tool calls, finish, usage."""
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


_texts = st.one_of(st.none(), st.just(""), st.text(max_size=12))
_counts = st.one_of(st.integers(-3, 10**6), st.none(), st.booleans(), st.floats(allow_nan=True))


@st.composite
def _calls(draw: st.DrawFn) -> list[dict[str, Any]] | None:
    calls = draw(st.one_of(st.none(), st.lists(st.fixed_dictionaries({}, optional={
        "id": _texts,
        "type": st.just("function"),
        "function": st.fixed_dictionaries({}, optional={"name": _texts, "arguments": _texts}),
    }), max_size=3)))
    return calls


@st.composite
def completions(draw: st.DrawFn) -> ChatCompletion:
    """Chat completions as servers write them: any of the message's fields absent, null,
    empty or set; zero or one choice; any finish reason; usage absent or with odd counts."""
    message = draw(st.fixed_dictionaries({}, optional={
        "role": st.just("assistant"),
        "content": _texts,
        "reasoning_content": _texts,
        "refusal": _texts,
        "tool_calls": _calls(),
    }))
    choice = draw(st.fixed_dictionaries({"index": st.just(0), "message": st.just(message)},
                                        optional={"finish_reason": st.sampled_from(
                                            [None, "", "stop", "length", "tool_calls",
                                             "content_filter"])}))
    completion: dict[str, Any] = {
        "id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": "m",
        "choices": draw(st.sampled_from([[choice], [choice, choice], []])),
    }
    usage = draw(st.one_of(st.none(), st.fixed_dictionaries({}, optional={
        "prompt_tokens": _counts, "completion_tokens": _counts, "total_tokens": _counts,
        "prompt_tokens_details": st.fixed_dictionaries({}, optional={"cached_tokens": _counts}),
        "completion_tokens_details": st.fixed_dictionaries(
            {}, optional={"reasoning_tokens": _counts}),
    })))
    if usage is not None:
        completion["usage"] = usage
    return completion  # type: ignore[return-value]
