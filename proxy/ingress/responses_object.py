"""The Responses object's fixed parts, and a sync chat completion as a response object.

`RESPONSE_DEFAULTS`: every field the Open Responses object requires, at the value that holds
when the request did not set it; `response_base`: the fields that hold from a response's start
to its end. `responses_usage`: chat usage as Responses usage. `completion_response`: the
final object of a whole chat completion, equal to the one a ResponsesWriter ends with when
fed the chunks the completion accumulates from (tests/test_responses_sync.py holds the two
equal), at a fraction of the writer's cost. Sans-IO.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

from proxy.errors import ProxyError, UpstreamFailed
from proxy.ingress.responses_items import PARTS, empty_part, function_call_item
from proxy.openai_types import MAX_COUNT, ChatCompletion, token_count

__all__ = [
    "BARE_FAILURE", "BARE_REQUIRED", "INCOMPLETE", "RESPONSE_DEFAULTS", "bare_failure",
    "completion_response", "failure_error", "response_base", "responses_usage",
]

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


# The fields of a failed response object that hold nothing of the request, so always encode:
# what a stream ends with when the echoed request cannot be (ResponsesWriter.fail).
BARE_FAILURE: Final = (
    "id", "object", "created_at", "status", "model", "output", "usage", "error", "store",
)

# What openai-python's Response type requires beside BARE_FAILURE, at its defaults.
BARE_REQUIRED: Final[Mapping[str, Any]] = {
    key: RESPONSE_DEFAULTS[key] for key in ("tools", "tool_choice", "parallel_tool_calls")
}

# A stop that cuts the answer short, and the reason an incomplete response gives for it.
INCOMPLETE: Final = {"length": "max_output_tokens", "content_filter": "content_filter"}


def failure_error(err: ProxyError) -> dict[str, Any]:
    """The `error` of a failed response object: the Responses API knows two codes for a
    failure that is not the request's fault, and keeps the rest in type and message."""
    return {
        "code": "rate_limit_exceeded" if err.status == 429 else "server_error",
        "message": err.message,
        "type": err.type,
        "param": err.param,
    }


def bare_failure(
    response: Mapping[str, Any], started: bool, emit: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    """Ends a stream whose response object cannot be encoded (an echoed request nested too
    deep) with `response.failed` holding the `BARE_FAILURE` fields and `BARE_REQUIRED`, after
    the start events if they could not go out either (SDKs refuse a stream that does not open with
    `response.created`); returns the failed object."""
    failed = {key: response[key] for key in BARE_FAILURE}
    # openai-python's Response requires these; the request's own may be what cannot be
    # encoded, so the defaults stand in.
    failed.update(BARE_REQUIRED)
    if not started:
        opened = {**failed, "status": "in_progress", "error": None}
        emit({"type": "response.created", "response": opened})
        emit({"type": "response.in_progress", "response": opened})
    emit({"type": "response.failed", "response": failed})
    return failed


def responses_usage(usage: Mapping[str, Any] | None) -> dict[str, Any]:
    """Chat usage → Responses usage with both details objects; zeros for what is unknown."""
    prompt = completion = total = cached = cache_write = reasoning = 0
    # An upstream's usage of another type counts as none (read once per response).
    if usage and isinstance(usage, Mapping):
        prompt = _count(usage.get("prompt_tokens"))
        completion = _count(usage.get("completion_tokens"))
        total = _count(usage.get("total_tokens")) or min(prompt + completion, MAX_COUNT)
        # Most servers send neither details object: no lookups in empty ones.
        details = usage.get("prompt_tokens_details")
        if details and isinstance(details, Mapping):
            cached = _count(details.get("cached_tokens"))
            cache_write = _count(details.get("cache_write_tokens"))
        details = usage.get("completion_tokens_details")
        if details and isinstance(details, Mapping):
            reasoning = _count(details.get("reasoning_tokens"))
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": cache_write},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": total,
    }


def _count(value: Any) -> int:
    return token_count(value) or 0


def response_base(
    response_id: str, model: str, created_at: float, echo: Mapping[str, Any], store: bool
) -> dict[str, Any]:
    """The response object's fields that hold from its start to its end, in their order."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(created_at),
        "model": model,
        **RESPONSE_DEFAULTS,
        **echo,
        "store": store,
        "background": False,
    }


def completion_response(
    completion: ChatCompletion, base: Mapping[str, Any], ids: str, completed_at: float
) -> dict[str, Any]:
    """The response object of a whole chat completion, built at once: the object a
    ResponsesWriter ends with when fed the chunks that accumulate to `completion` (the
    tests hold the two equal), without the writer's events and bookkeeping, which a sync
    answer never reads. A completion whose fields have the wrong types is the upstream's
    failure, never a crash of the proxy."""
    output: list[dict[str, Any]] = []
    finish = "stop"
    choices = completion["choices"]
    if choices:
        choice = choices[0]
        if not isinstance(choice, dict):
            raise _not_a_completion()
        message = _object(choice.get("message"))
        reasoning = _text(message.get("reasoning_content"))
        if reasoning:
            output.append({"id": f"rs_{ids}_0", "type": "reasoning", "status": "completed",
                           "summary": [],
                           "content": [{"type": "reasoning_text", "text": reasoning}]})
        content = _text(message.get("content"))
        refusal = _text(message.get("refusal"))
        if content or refusal:
            parts: list[dict[str, Any]] = []
            if content:
                parts.append(_part("output_text", content))
            if refusal:
                parts.append(_part("refusal", refusal))
            output.append(_message(f"msg_{ids}_{len(output)}", parts))
        calls = message.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                raise _not_a_completion()
            for chat_index, call in enumerate(calls):
                output.append(
                    _function_call(call, ids, len(output), chat_index, base.get("tools")))
        reason = choice.get("finish_reason")
        if reason:
            if not isinstance(reason, str):
                raise _not_a_completion()
            finish = reason
    incomplete = INCOMPLETE.get(finish)
    status = "completed" if incomplete is None else "incomplete"
    if not output:
        # A chat answer with no content is an empty string; clients read output[0].
        output.append(_message(f"msg_{ids}_0", [empty_part("output_text")]))
    # The last item ends with the response, as a stream's does: cut short by a length stop.
    output[-1]["status"] = status
    usage = completion.get("usage")
    response = dict(base)
    response["status"] = status
    response["completed_at"] = int(completed_at) if incomplete is None else None
    response["error"] = None
    response["incomplete_details"] = None if incomplete is None else {"reason": incomplete}
    response["output"] = output
    response["usage"] = responses_usage(usage)
    return response


def _function_call(
    call: Any, ids: str, index: int, chat_index: int, tools: Any
) -> dict[str, Any]:
    if not isinstance(call, dict):
        raise _not_a_completion()
    function = _object(call.get("function"))
    call_id = _text(call.get("id")) or f"call_{ids}_{chat_index}"
    # Clients json-parse the arguments: a call with none takes an empty object.
    arguments = _text(function.get("arguments")) or "{}"
    name = _text(function.get("name"))
    if not name:
        # No client can run it; the stream's writer refuses it the same way.
        raise UpstreamFailed("The upstream sent a tool call without a function name.")
    return function_call_item(f"fc_{ids}_{index}", "completed", call_id, name, arguments, tools)


def _message(item_id: str, parts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": "completed", "role": "assistant",
            "content": parts}


def _part(kind: str, text: str) -> dict[str, Any]:
    """A content part of `kind` (output_text, refusal) holding `text`, as a stream's ends."""
    part = empty_part(kind)
    part[PARTS[kind][2]] = text
    return part


def _object(value: Any) -> dict[str, Any]:
    """An object of the completion: empty where it is null or absent."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    raise _not_a_completion()


def _text(value: Any) -> str:
    """A text field of the completion: a string, or empty where it is null or absent."""
    if type(value) is str:
        return value
    if value is None:
        return ""
    raise _not_a_completion()


def _not_a_completion() -> UpstreamFailed:
    return UpstreamFailed(
        "The upstream answered with a chat completion whose message does not have the "
        "types a chat completion has."
    )
