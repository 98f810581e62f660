"""The reusable Responses stream check rejects each kind of broken stream.

A valid writer stream is parsed, broken in one way, serialized again, and must fail the
check; the unbroken stream passes (so each failure below is the break's doing).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from proxy.ingress.responses_writer import ResponsesWriter
from proxy.openai_types import ChunkFactory
from tests.responses_assert import assert_response_types, assert_responses_stream, parse_sse

F = ChunkFactory("m", "chatcmpl-x")

Events = list[tuple[str | None, dict[str, Any]]]


def valid() -> Events:
    w = ResponsesWriter("resp_ok", "m", 0, {}, item_base="b")
    raw = w.start() + w.feed([
        F.role(), F.content("Hi "), F.content("there"),
        F.chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                 "function": {"name": "f", "arguments": '{"a":'}}]}),
        F.chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
        F.finish("tool_calls"),
    ]) + w.finish()
    return parse_sse(raw).events


def encode(events: Events, done: bytes = b"data: [DONE]\n\n") -> bytes:
    out = b""
    for name, data in events:
        if name is not None:
            out += b"event: " + name.encode() + b"\n"
        out += b"data: " + orjson.dumps(data) + b"\n\n"
    return out + done


def index_of(events: Events, kind: str, nth: int = 0) -> int:
    return [i for i, (_, d) in enumerate(events) if d["type"] == kind][nth]


def renumber(events: Events) -> Events:
    for n, (_, data) in enumerate(events):
        data["sequence_number"] = n
    return events


def drop_delta(e: Events) -> Events:
    del e[index_of(e, "response.output_text.delta")]
    return e


def rename_event(e: Events) -> Events:
    i = index_of(e, "response.output_text.delta")
    e[i] = ("response.output_text.done", e[i][1])
    return e


def swap_start(e: Events) -> Events:
    e[0], e[1] = e[1], e[0]
    return renumber(e)


def two_terminals(e: Events) -> Events:
    e.insert(-1, copy.deepcopy(e[-1]))
    return renumber(e)


def failed_first(e: Events) -> Events:
    failed = copy.deepcopy(e[-1])
    failed[1]["type"] = "response.failed"
    failed[1]["response"]["status"] = "failed"
    return renumber([(failed[1]["type"], failed[1])])


def change_done_item_id(e: Events) -> Events:
    e[index_of(e, "response.output_item.done")][1]["item"]["id"] = "msg_other"
    return e


def change_final_text(e: Events) -> Events:
    e[-1][1]["response"]["output"][0]["content"][0]["text"] = "Hi there!"
    return e


def change_text_done(e: Events) -> Events:
    e[index_of(e, "response.output_text.done")][1]["text"] = "Hi"
    return e


def change_arguments_done(e: Events) -> Events:
    e[index_of(e, "response.function_call_arguments.done")][1]["arguments"] = '{"a":2}'
    return e


def no_arguments_delta(e: Events) -> Events:
    del e[index_of(e, "response.function_call_arguments.delta", 1)]
    del e[index_of(e, "response.function_call_arguments.delta")]
    return renumber(e)


def bad_item_id(e: Events) -> Events:
    for _, data in e:
        if data.get("item_id") == "msg_b_0":
            data["item_id"] = "msg_b.0"
        for key in ("item",):
            if key in data and data[key]["id"] == "msg_b_0":
                data[key]["id"] = "msg_b.0"
    e[-1][1]["response"]["output"][0]["id"] = "msg_b.0"
    return e


def drop_required_field(e: Events) -> Events:
    del e[-1][1]["response"]["top_p"]
    return e


def change_response_id(e: Events) -> Events:
    e[-1][1]["response"]["id"] = "resp_other"
    return e


def overlap_items(e: Events) -> Events:
    # Move the message's output_item.done after the function call was added.
    i = index_of(e, "response.output_item.done")
    done = e.pop(i)
    e.insert(index_of(e, "response.output_item.added", 1) + 1, done)
    return renumber(e)


BREAKS: dict[str, Callable[[Events], Events]] = {
    "sequence-gap": drop_delta,
    "event-name-not-type": rename_event,
    "in-progress-before-created": swap_start,
    "two-terminal-events": two_terminals,
    "failed-as-first-event": failed_first,
    "done-item-id-differs": change_done_item_id,
    "final-text-not-deltas": change_final_text,
    "text-done-not-deltas": change_text_done,
    "arguments-done-not-deltas": change_arguments_done,
    "function-call-without-delta": no_arguments_delta,
    "item-id-outside-alphabet": bad_item_id,
    "required-field-missing": drop_required_field,
    "response-id-changes": change_response_id,
    "items-overlap": overlap_items,
}


def test_the_unbroken_stream_passes() -> None:
    assert_responses_stream(encode(valid()))


@pytest.mark.parametrize("name", list(BREAKS))
def test_a_broken_stream_fails_the_check(name: str) -> None:
    with pytest.raises(AssertionError):
        assert_responses_stream(encode(BREAKS[name](valid())))


@pytest.mark.parametrize(
    "done",
    [b"", b"data: [DONE]\n\ndata: [DONE]\n\n", b"data: [DONE]\n\ndata: {}\n\n"],
    ids=["missing", "twice", "event-after"],
)
def test_done_must_come_once_and_last(done: bytes) -> None:
    with pytest.raises(AssertionError):
        assert_responses_stream(encode(valid(), done))


def test_parsed_events_without_names_are_checked_too() -> None:
    data = [d for _, d in valid()]
    assert_responses_stream(data)
    with pytest.raises(AssertionError):
        assert_responses_stream(data[:-1])


# -- what only openai-python's types and the specification's required fields catch ----------


def extra_item_field(e: Events) -> Events:
    e[index_of(e, "response.output_item.added")][1]["item"]["rol"] = "assistant"
    return e


def misspelled_usage_field(e: Events) -> Events:
    usage = e[-1][1]["response"]["usage"]
    usage["output_tokens_detail"] = usage["output_tokens_details"]
    return e


def extra_event_field(e: Events) -> Events:
    e[index_of(e, "response.function_call_arguments.done")][1]["name"] = "f"
    return e


def wrong_field_type(e: Events) -> Events:
    e[index_of(e, "response.output_text.delta")][1]["logprobs"] = {}
    return e


def unknown_error_code(e: Events) -> Events:
    e[-1][1]["type"] = "response.failed"
    e[-1] = ("response.failed", e[-1][1])
    response = e[-1][1]["response"]
    response.update(status="failed", error={"code": "upstream_error", "message": "m"})
    return e


def part_without_logprobs(e: Events) -> Events:
    del e[index_of(e, "response.content_part.added")][1]["part"]["logprobs"]
    return e


def call_without_status(e: Events) -> Events:
    del e[index_of(e, "response.output_item.added", 1)][1]["item"]["status"]
    return e


def usage_without_details(e: Events) -> Events:
    del e[-1][1]["response"]["usage"]["input_tokens_details"]
    return e


TYPE_BREAKS: dict[str, tuple[Callable[[Events], Events], str]] = {
    "extra-item-field": (extra_item_field, r"does not know: \['\.item\.rol'\]"),
    "misspelled-usage-field": (misspelled_usage_field, "output_tokens_detail'"),
    "extra-event-field": (extra_event_field, r"does not know: \['\.name'\]"),
    "wrong-field-type": (wrong_field_type, "ResponseTextDeltaEvent"),
    "unknown-error-code": (unknown_error_code, "ResponseFailedEvent"),
    "output-text-part-without-logprobs": (part_without_logprobs, "without annotations or"),
    "item-without-status": (call_without_status, "an item without id or status"),
    "usage-without-details": (usage_without_details, "ResponseCompletedEvent"),
}


@pytest.mark.parametrize("name", list(TYPE_BREAKS))
def test_a_stream_openai_python_or_the_specification_refuses_fails_the_check(name: str) -> None:
    broken, message = TYPE_BREAKS[name]
    with pytest.raises(AssertionError, match=message):
        assert_responses_stream(encode(broken(valid())))


def test_a_sync_object_with_a_field_openai_python_does_not_know_fails_the_check() -> None:
    final = assert_responses_stream(encode(valid()))
    assert_response_types(final)
    final["output"][0]["content"][0]["annotation"] = []
    with pytest.raises(AssertionError, match=r"\.output\[0\]\.content\[0\]\.annotation'"):
        assert_response_types(final)
