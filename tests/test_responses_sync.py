"""The sync Responses answer of a whole chat completion, sans-IO: `completion_response` builds
it at once, and must equal, byte for byte, the object a ResponsesWriter ends with when fed the
chunks the completion accumulates from (the stream's final object). A completion with the
wrong types is the upstream's failure (a 502), never a crash."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings

from proxy.errors import UpstreamFailed
from proxy.ingress.responses import render_sync
from proxy.ingress.responses_object import completion_response, response_base
from proxy.ingress.responses_writer import ResponsesWriter
from proxy.openai_types import ChatCompletion
from tests.completions import completion_chunks, completions

CREATED, DONE = 1700000000, 1700000005
ECHO = {"instructions": "Be brief.", "metadata": {"k": "v"}, "temperature": 0.2}


def direct(completion: ChatCompletion, store: bool = False) -> dict[str, Any]:
    base = response_base("resp_x", "m", CREATED, ECHO, store)
    return completion_response(completion, base, "ids", DONE)


def through_the_writer(completion: ChatCompletion, store: bool = False) -> dict[str, Any]:
    writer = ResponsesWriter("resp_x", "m", CREATED, ECHO, store, clock=lambda: DONE,
                             item_base="ids")
    return render_sync(writer, [completion_chunks(completion)])


def completion(message: dict[str, Any], finish: Any = "stop", **extra: Any) -> ChatCompletion:
    return {"id": "c", "object": "chat.completion", "created": 1, "model": "m",  # type: ignore[typeddict-item]
            "choices": [{"index": 0, "message": message, "finish_reason": finish}], **extra}


@settings(max_examples=400, deadline=None)
@given(completions())
def test_the_object_equals_the_writers_for_any_completion(c: ChatCompletion) -> None:
    for store in (False, True):
        try:
            expected = direct(c, store)
        except UpstreamFailed as exc:
            # A tool call without a name: the writer refuses it too.
            assert "without a function name" in exc.message
            with pytest.raises(UpstreamFailed, match="without a function name"):
                through_the_writer(c, store)
            continue
        assert orjson.dumps(expected) == orjson.dumps(through_the_writer(c, store))


def test_every_kind_of_item_in_order_with_the_last_cut_short_by_a_length_stop() -> None:
    c = completion({"reasoning_content": "think", "content": "text", "refusal": "no",
                    "tool_calls": [{"id": "call_a", "function": {"name": "f", "arguments": "{}"}},
                                   {"function": {"name": "g"}}]}, "length",
                   usage={"prompt_tokens": 3, "completion_tokens": 4})
    final = direct(c)
    assert final == through_the_writer(c)
    assert [(o["id"], o["type"], o["status"]) for o in final["output"]] == [
        ("rs_ids_0", "reasoning", "completed"), ("msg_ids_1", "message", "completed"),
        ("fc_ids_2", "function_call", "completed"), ("fc_ids_3", "function_call", "incomplete")]
    assert [p["type"] for p in final["output"][1]["content"]] == ["output_text", "refusal"]
    assert final["output"][3]["call_id"] == "call_ids_1"
    assert final["output"][3]["arguments"] == "{}"
    assert final["status"] == "incomplete" and final["completed_at"] is None
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["usage"]["total_tokens"] == 7


def test_an_empty_answer_is_one_empty_message_and_the_echo_is_kept() -> None:
    final = direct(completion({"content": None}, None))
    assert final == through_the_writer(completion({"content": None}, None))
    assert final["output"] == [{"id": "msg_ids_0", "type": "message", "status": "completed",
                                "role": "assistant", "content": [
                                    {"type": "output_text", "text": "", "annotations": [],
                                     "logprobs": []}]}]
    assert final["completed_at"] == DONE and final["created_at"] == CREATED
    assert final["instructions"] == "Be brief." and final["metadata"] == {"k": "v"}


WRONG = {
    "choice-not-object": {"choices": ["x"]},
    "message-not-object": {"choices": [{"message": "hi"}]},
    "content-number": {"choices": [{"message": {"content": 5}}]},
    "reasoning-list": {"choices": [{"message": {"reasoning_content": ["a"]}}]},
    "refusal-object": {"choices": [{"message": {"refusal": {}}}]},
    "tool-calls-string": {"choices": [{"message": {"tool_calls": "f"}}]},
    "tool-call-not-object": {"choices": [{"message": {"tool_calls": [1]}}]},
    "function-not-object": {"choices": [{"message": {"tool_calls": [{"function": []}]}}]},
    "name-number": {"choices": [{"message": {"tool_calls": [{"function": {"name": 3}}]}}]},
    "arguments-object": {"choices": [{"message": {"tool_calls": [
        {"function": {"name": "f", "arguments": {"x": 1}}}]}}]},
    "call-id-number": {"choices": [{"message": {"tool_calls": [{"id": 7}]}}]},
    "finish-list": {"choices": [{"message": {}, "finish_reason": ["stop"]}]},
}


@pytest.mark.parametrize("name", list(WRONG))
def test_a_completion_with_wrong_types_is_the_upstreams_failure(name: str) -> None:
    with pytest.raises(UpstreamFailed, match="types a chat completion has"):
        direct(WRONG[name])  # type: ignore[arg-type]


def test_usage_that_is_not_an_object_counts_as_none() -> None:
    final = direct(completion({"content": "x"}, usage="lots"))
    assert final["usage"]["total_tokens"] == 0 and final["output"][0]["content"][0]["text"] == "x"
