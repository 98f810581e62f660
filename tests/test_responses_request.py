"""Responses request → chat-completions body, sans-IO; every bad field is a 400 naming it."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import InvalidRequest
from proxy.ingress.responses_request import (
    ResponsesRequest,
    parse_responses_request,
    refuse_state,
)


def parse(**body: Any) -> ResponsesRequest:
    body.setdefault("model", "m")
    return parse_responses_request(orjson.dumps(body))


def messages(**body: Any) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = parse(**body).chat["messages"]
    return messages


def text(t: str, kind: str = "input_text") -> dict[str, str]:
    return {"type": kind, "text": t}


WEATHER = {"type": "function", "name": "get_weather", "description": "Weather now.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
           "strict": True}
TIME = {"type": "function", "name": "get_time"}


# -- input ----------------------------------------------------------------------------------


def test_string_input_is_one_user_message_after_the_instructions() -> None:
    assert messages(input="Hi", instructions="Be brief.") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]


@pytest.mark.parametrize(
    ("role", "chat_role"),
    [("user", "user"), ("system", "system"), ("developer", "system"), ("assistant", "assistant")],
)
def test_message_items_keep_their_role_and_developer_becomes_system(
    role: str, chat_role: str
) -> None:
    kind = "output_text" if role == "assistant" else "input_text"
    got = messages(input=[{"type": "message", "role": role, "content": [text("x", kind)]},
                          {"role": "user", "content": "go"}])
    assert got[0] == {"role": chat_role, "content": "x"}


def test_easy_messages_without_type_and_with_string_content_are_messages() -> None:
    assert messages(input=[{"role": "user", "content": "plain"}]) == [
        {"role": "user", "content": "plain"}
    ]


def test_input_image_becomes_an_image_url_part_beside_the_text() -> None:
    got = messages(input=[{"role": "user", "content": [
        text("What is this?"),
        {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"},
    ]}])
    assert got == [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA",
                                            "detail": "low"}},
    ]}]


def test_input_file_with_data_becomes_a_file_part() -> None:
    got = messages(input=[{"role": "user", "content": [
        {"type": "input_file", "filename": "a.pdf", "file_data": "data:application/pdf;base64,AA"},
    ]}])
    assert got[0]["content"] == [{"type": "file", "file": {
        "file_data": "data:application/pdf;base64,AA", "filename": "a.pdf"}}]


def test_assistant_output_text_parts_are_one_string() -> None:
    got = messages(input=[
        {"role": "user", "content": "q"},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [text("Hel", "output_text"), text("lo", "output_text")]},
        {"role": "user", "content": "again"},
    ])
    assert got[1] == {"role": "assistant", "content": "Hello"}


def test_an_assistant_refusal_is_its_content_which_every_chat_server_renders() -> None:
    got = messages(input=[
        {"role": "user", "content": "q"},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "phase": None, "content": [{"type": "refusal", "refusal": "I can't help."}]},
        {"role": "user", "content": "why?"},
    ])
    assert got[1] == {"role": "assistant", "content": "I can't help."}


def test_consecutive_function_calls_are_one_assistant_message_then_tool_messages() -> None:
    got = messages(input=[
        {"role": "user", "content": "Weather and time in Paris?"},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "function_call", "call_id": "call_a", "name": "get_weather",
         "arguments": '{"city":"Paris"}', "id": "fc_1"},
        {"type": "function_call", "call_id": "call_b", "name": "get_time", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_a", "output": "18C"},
        {"type": "function_call_output", "call_id": "call_b",
         "output": [text("12:00"), text(" CET")]},
    ])
    assert got == [
        {"role": "user", "content": "Weather and time in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "call_b", "type": "function",
             "function": {"name": "get_time", "arguments": "{}"}},
        ]},
        {"role": "tool", "tool_call_id": "call_a", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_b", "content": "12:00 CET"},
    ]


def test_a_function_call_after_assistant_text_joins_that_message() -> None:
    got = messages(input=[
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "Let me check."},
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c", "output": "ok"},
    ])
    assert got[1]["content"] == "Let me check." and got[1]["tool_calls"][0]["id"] == "c"
    assert [m["role"] for m in got] == ["user", "assistant", "tool"]


def test_reasoning_items_are_dropped() -> None:
    got = messages(input=[{"type": "reasoning", "id": "rs_1", "summary": [],
                           "content": [{"type": "reasoning_text", "text": "secret"}]},
                          {"role": "user", "content": "hi"}])
    assert got == [{"role": "user", "content": "hi"}]


def test_instructions_and_leading_system_items_are_one_system_message_later_ones_stay() -> None:
    got = messages(instructions="Be brief.", input=[
        {"type": "message", "role": "developer", "content": [text("Sandbox: read-only.")]},
        {"role": "system", "content": [text("Use "), text("metric units.")]},
        {"role": "user", "content": "q"},
        {"role": "developer", "content": "Now writable."},
        {"role": "user", "content": "go"},
    ])
    assert got == [
        {"role": "system", "content": "Be brief.\n\nSandbox: read-only.\n\nUse metric units."},
        {"role": "user", "content": "q"},
        {"role": "system", "content": "Now writable."},
        {"role": "user", "content": "go"},
    ]


def test_tool_output_images_follow_the_tool_messages_in_a_user_message() -> None:
    got = messages(input=[
        {"role": "user", "content": "Screenshot both."},
        {"type": "function_call", "call_id": "a", "name": "shot", "arguments": "{}"},
        {"type": "function_call", "call_id": "b", "name": "shot", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "b", "output": [
            text("second"), {"type": "input_image", "image_url": "data:image/png;base64,BB",
                             "detail": None, "file_id": None}]},
        {"type": "function_call_output", "call_id": "a", "output": [
            {"type": "input_image", "image_url": "data:image/png;base64,AA"}]},
        {"role": "user", "content": "Compare."},
    ])
    assert [m["role"] for m in got] == ["user", "assistant", "tool", "tool", "user", "user"]
    assert got[2] == {"role": "tool", "tool_call_id": "b", "content": "second"}
    assert got[3] == {"role": "tool", "tool_call_id": "a", "content": ""}
    assert got[4]["content"] == [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,BB"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
    ]


def test_an_empty_content_list_is_an_empty_string_and_original_detail_is_high() -> None:
    got = messages(input=[
        {"role": "user", "content": []},
        {"role": "user", "content": [
            {"type": "input_image", "image_url": "http://x/a.png", "detail": "original"}]},
    ])
    assert got[0] == {"role": "user", "content": ""}
    assert got[1]["content"] == [
        {"type": "image_url", "image_url": {"url": "http://x/a.png", "detail": "high"}}]


# -- tools, tool_choice, options -----------------------------------------------------------


def test_function_tools_become_chat_tools_and_are_echoed_whole() -> None:
    request = parse(input="hi", tools=[WEATHER, TIME], tool_choice="required",
                    parallel_tool_calls=False)
    assert request.chat["tools"] == [
        {"type": "function", "function": {
            "name": "get_weather", "description": "Weather now.",
            "parameters": WEATHER["parameters"], "strict": True}},
        {"type": "function", "function": {
            "name": "get_time", "parameters": {"type": "object", "properties": {}}}},
    ]
    assert request.chat["tool_choice"] == "required"
    assert request.chat["parallel_tool_calls"] is False
    assert request.echo["tools"][1] == {"type": "function", "name": "get_time",
                                        "description": None, "parameters": None, "strict": None}
    assert request.echo["tool_choice"] == "required"
    assert request.echo["parallel_tool_calls"] is False


def test_tool_choice_naming_a_function_becomes_the_chat_form() -> None:
    request = parse(input="hi", tools=[WEATHER], tool_choice={"type": "function",
                                                              "name": "get_weather"})
    assert request.chat["tool_choice"] == {"type": "function",
                                           "function": {"name": "get_weather"}}
    assert request.echo["tool_choice"] == {"type": "function", "name": "get_weather"}


def test_allowed_tools_offers_the_upstream_only_those_functions() -> None:
    request = parse(input="hi", tools=[WEATHER, TIME], tool_choice={
        "type": "allowed_tools", "mode": "required",
        "tools": [{"type": "function", "name": "get_time"}]})
    assert [t["function"]["name"] for t in request.chat["tools"]] == ["get_time"]
    assert request.chat["tool_choice"] == "required"
    assert len(request.echo["tools"]) == 2


def test_without_tools_no_tool_fields_reach_the_upstream() -> None:
    request = parse(input="hi", tool_choice="auto", parallel_tool_calls=True)
    assert not {"tools", "tool_choice", "parallel_tool_calls"} & request.chat.keys()
    assert request.echo["tools"] == [] and request.echo["tool_choice"] == "auto"


@pytest.mark.parametrize(
    ("fmt", "response_format"),
    [
        ({"type": "text"}, None),
        ({"type": "json_object"}, {"type": "json_object"}),
        ({"type": "json_schema", "name": "person", "strict": True,
          "schema": {"type": "object", "properties": {"name": {"type": "string"}}}},
         {"type": "json_schema", "json_schema": {
             "name": "person", "strict": True,
             "schema": {"type": "object", "properties": {"name": {"type": "string"}}}}}),
    ],
    ids=["text", "json_object", "json_schema"],
)
def test_text_format_becomes_response_format(
    fmt: dict[str, Any], response_format: dict[str, Any] | None
) -> None:
    request = parse(input="hi", text={"format": fmt})
    assert request.chat.get("response_format") == response_format
    assert request.echo["text"]["format"]["type"] == fmt["type"]


def test_sampling_limits_and_user_are_forwarded_and_echoed() -> None:
    request = parse(input="hi", temperature=0.3, top_p=0.9, max_output_tokens=64, user="u1",
                    metadata={"team": "a"}, reasoning={"effort": "low"})
    chat = request.chat
    assert (chat["temperature"], chat["top_p"], chat["max_tokens"], chat["user"]) == (
        0.3, 0.9, 64, "u1")
    assert chat["reasoning_effort"] == "low"
    assert "metadata" not in chat and "max_output_tokens" not in chat
    echo = request.echo
    assert (echo["temperature"], echo["top_p"], echo["max_output_tokens"], echo["user"]) == (
        0.3, 0.9, 64, "u1")
    assert echo["metadata"] == {"team": "a"}
    assert echo["reasoning"] == {"effort": "low", "summary": None}


def test_openai_bounds_and_enums_are_accepted_at_their_limits() -> None:
    metadata = {f"{i:02}" + "k" * 62: "v" * 512 for i in range(16)}
    request = parse(input="hi", temperature=2, top_p=0, presence_penalty=-2,
                    frequency_penalty=2.0, top_logprobs=20, service_tier="flex",
                    max_output_tokens=1, metadata=metadata)
    assert (request.chat["temperature"], request.chat["top_p"]) == (2, 0)
    assert request.echo["top_logprobs"] == 20 and request.echo["metadata"] == metadata
    # Checked, not translated: no chat server has tiers or Responses-style logprobs.
    assert "service_tier" not in request.chat and "top_logprobs" not in request.chat


@pytest.mark.parametrize("tier", ["fast", "ultrafast"])
def test_the_newer_service_tiers_are_accepted_and_not_sent_on(tier: str) -> None:
    request = parse(input="hi", service_tier=tier)
    assert "service_tier" not in request.chat and "service_tier" not in request.echo


def test_text_verbosity_is_sent_as_the_chat_verbosity_and_echoed() -> None:
    request = parse(input="hi", text={"verbosity": "low"})
    assert request.chat["verbosity"] == "low"
    assert request.echo["text"] == {"format": {"type": "text"}, "verbosity": "low"}
    assert "verbosity" not in parse(input="hi", text={"format": {"type": "text"}}).chat


def test_the_deprecated_generate_summary_is_taken_as_summary() -> None:
    request = parse(input="hi", reasoning={"effort": "high", "generate_summary": "concise"})
    assert request.echo["reasoning"] == {"effort": "high", "summary": "concise"}
    both = parse(input="hi", reasoning={"summary": "detailed", "generate_summary": "concise"})
    assert both.echo["reasoning"]["summary"] == "detailed"


def test_moderation_is_sent_as_the_chat_moderation() -> None:
    moderation = {"model": "omni-moderation-latest", "policy": {"output": {"mode": "block"}}}
    assert parse(input="hi", moderation=moderation).chat["moderation"] == moderation
    assert "moderation" not in parse(input="hi", moderation=None).chat


def test_streaming_asks_the_upstream_for_usage_and_sync_does_not_stream() -> None:
    streaming = parse(input="hi", stream=True)
    assert streaming.stream and streaming.chat["stream"] is True
    assert streaming.chat["stream_options"] == {"include_usage": True}
    sync = parse(input="hi")
    assert not sync.stream and sync.chat["stream"] is False
    assert "stream_options" not in sync.chat


def test_state_fields_are_kept_for_the_route_to_decide() -> None:
    request = parse(input="hi", previous_response_id="resp_1", conversation={"id": "conv_1"},
                    background=True, store=True)
    assert (request.previous_response_id, request.conversation, request.background,
            request.store) == ("resp_1", "conv_1", True, True)
    assert request.echo["previous_response_id"] == "resp_1"


def test_model_is_optional_and_passed_through() -> None:
    assert parse_responses_request(b'{"input": "hi"}').chat.get("model") is None
    assert parse(input="hi", model="local/x").chat["model"] == "local/x"


# -- errors ---------------------------------------------------------------------------------


BAD: list[tuple[str, dict[str, Any], str | None]] = [
    ("input-missing", {}, "input"),
    ("input-only-instructions", {"instructions": "x"}, "input"),
    ("input-number", {"input": 3}, "input"),
    ("item-not-object", {"input": ["hi"]}, "input[0]"),
    ("item-no-type", {"input": [{"content": "x"}]}, "input[0].type"),
    ("item-unknown-type", {"input": [{"type": "web_search_call", "id": "ws"}]}, "input[0].type"),
    ("item-reference", {"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
    ("bad-role", {"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ("content-number", {"input": [{"role": "user", "content": 1}]}, "input[0].content"),
    ("part-unknown", {"input": [{"role": "user", "content": [{"type": "input_audio"}]}]},
     "input[0].content[0].type"),
    ("part-text-missing", {"input": [{"role": "user", "content": [{"type": "input_text"}]}]},
     "input[0].content[0].text"),
    ("image-file-id", {"input": [{"role": "user", "content": [
        {"type": "input_image", "file_id": "file-1"}]}]}, "input[0].content[0].image_url"),
    ("image-bad-detail", {"input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "http://x/a.png", "detail": "max"}]}]},
     "input[0].content[0].detail"),
    ("image-in-system", {"input": [{"role": "system", "content": [
        {"type": "input_image", "image_url": "http://x/a.png"}]}]}, "input[0].content[0]"),
    ("file-url", {"input": [{"role": "user", "content": [
        {"type": "input_file", "file_url": "http://x/a.pdf"}]}]}, "input[0].content[0]"),
    ("assistant-image", {"input": [{"role": "assistant", "content": [
        {"type": "input_image", "image_url": "http://x"}]}]}, "input[0].content[0]"),
    ("call-no-call-id", {"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
     "input[0].call_id"),
    ("call-args-object", {"input": [{"type": "function_call", "call_id": "c", "name": "f",
                                     "arguments": {}}]}, "input[0].arguments"),
    ("output-no-call-id", {"input": [{"type": "function_call_output", "output": "x"}]},
     "input[0].call_id"),
    ("output-number", {"input": [{"type": "function_call_output", "call_id": "c",
                                  "output": 1}]}, "input[0].output"),
    ("output-audio", {"input": [{"type": "function_call_output", "call_id": "c", "output": [
        {"type": "input_audio"}]}]}, "input[0].output[0].type"),
    ("output-without-its-call", {"input": [
        {"role": "user", "content": "q"},
        {"type": "function_call", "call_id": "a", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "a", "output": "1"},
        {"type": "function_call_output", "call_id": "b", "output": "2"}]}, "input[3].call_id"),
    ("output-twice", {"input": [
        {"type": "function_call", "call_id": "a", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "a", "output": "1"},
        {"type": "function_call_output", "call_id": "a", "output": "1"}]}, "input[2].call_id"),
    ("output-before-its-call", {"input": [
        {"type": "function_call_output", "call_id": "a", "output": "1"},
        {"type": "function_call", "call_id": "a", "name": "f", "arguments": "{}"}]},
     "input[0].call_id"),
    ("call-without-output", {"input": [
        {"role": "user", "content": "q"},
        {"type": "function_call", "call_id": "a", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "b", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "a", "output": "1"}]}, "input[2].call_id"),
    ("local-shell-call", {"input": [{"type": "local_shell_call", "id": "ls", "call_id": "c",
                                     "status": "completed", "action": {
                                         "type": "exec", "command": ["ls"], "env": {}}}]},
     "input[0].type"),
    ("custom-tool-call", {"input": [{"type": "custom_tool_call", "call_id": "c",
                                     "name": "apply_patch", "input": "*** Begin Patch"}]},
     "input[0].type"),
    ("model-empty", {"model": "", "input": "x"}, "model"),
    ("model-number", {"model": 1, "input": "x"}, "model"),
    ("stream-string", {"input": "x", "stream": "true"}, "stream"),
    ("store-string", {"input": "x", "store": "no"}, "store"),
    ("background-number", {"input": "x", "background": 1}, "background"),
    ("previous-number", {"input": "x", "previous_response_id": 5}, "previous_response_id"),
    ("conversation-number", {"input": "x", "conversation": 5}, "conversation"),
    ("prompt", {"input": "x", "prompt": {"id": "pmpt_1"}}, "prompt"),
    ("instructions-list", {"input": "x", "instructions": ["a"]}, "instructions"),
    ("temperature-string", {"input": "x", "temperature": "hot"}, "temperature"),
    ("top-p-bool", {"input": "x", "top_p": True}, "top_p"),
    ("max-output-zero", {"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ("max-output-float", {"input": "x", "max_output_tokens": 1.5}, "max_output_tokens"),
    ("metadata-values", {"input": "x", "metadata": {"a": 1}}, "metadata"),
    ("truncation", {"input": "x", "truncation": "middle"}, "truncation"),
    ("include-string", {"input": "x", "include": "all"}, "include"),
    ("tools-object", {"input": "x", "tools": {}}, "tools"),
    ("tool-web-search", {"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ("tool-file-search", {"input": "x", "tools": [WEATHER, {"type": "file_search",
                                                            "vector_store_ids": ["vs"]}]},
     "tools[1].type"),
    ("tool-not-object", {"input": "x", "tools": [WEATHER, "f"]}, "tools[1]"),
    ("tool-no-name", {"input": "x", "tools": [{"type": "function"}]}, "tools[0].name"),
    ("tool-parameters-list", {"input": "x", "tools": [{"type": "function", "name": "f",
                                                       "parameters": []}]},
     "tools[0].parameters"),
    ("tool-choice-unknown", {"input": "x", "tools": [WEATHER], "tool_choice": "any"},
     "tool_choice"),
    ("tool-choice-hosted", {"input": "x", "tools": [WEATHER],
                            "tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
    ("tool-choice-unknown-function", {"input": "x", "tools": [WEATHER],
                                      "tool_choice": {"type": "function", "name": "nope"}},
     "tool_choice"),
    ("parallel-string", {"input": "x", "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ("text-format-unknown", {"input": "x", "text": {"format": {"type": "xml"}}},
     "text.format.type"),
    ("json-schema-no-schema", {"input": "x", "text": {"format": {"type": "json_schema",
                                                                 "name": "a"}}},
     "text.format.schema"),
    ("json-schema-no-name", {"input": "x", "text": {"format": {"type": "json_schema",
                                                               "schema": {}}}},
     "text.format.name"),
    ("verbosity", {"input": "x", "text": {"verbosity": "loud"}}, "text.verbosity"),
    ("reasoning-effort", {"input": "x", "reasoning": {"effort": "extreme"}}, "reasoning.effort"),
    ("stream-options", {"input": "x", "stream_options": []}, "stream_options"),
    ("temperature-above-2", {"input": "x", "temperature": 2.5}, "temperature"),
    ("temperature-negative", {"input": "x", "temperature": -0.1}, "temperature"),
    ("temperature-past-64-bits", {"input": "x", "temperature": 1e30}, "temperature"),
    ("top-p-above-1", {"input": "x", "top_p": 1.5}, "top_p"),
    ("presence-penalty-below-2", {"input": "x", "presence_penalty": -3}, "presence_penalty"),
    ("frequency-penalty-above-2", {"input": "x", "frequency_penalty": 2.01},
     "frequency_penalty"),
    ("top-logprobs-string", {"input": "x", "top_logprobs": "5"}, "top_logprobs"),
    ("top-logprobs-bool", {"input": "x", "top_logprobs": True}, "top_logprobs"),
    ("top-logprobs-above-20", {"input": "x", "top_logprobs": 21}, "top_logprobs"),
    ("top-logprobs-negative", {"input": "x", "top_logprobs": -1}, "top_logprobs"),
    ("service-tier-unknown", {"input": "x", "service_tier": "turbo"}, "service_tier"),
    ("moderation-string", {"input": "x", "moderation": "omni-moderation-latest"}, "moderation"),
    ("generate-summary", {"input": "x", "reasoning": {"generate_summary": "long"}},
     "reasoning.generate_summary"),
    ("service-tier-list", {"input": "x", "service_tier": ["auto"]}, "service_tier"),
    ("metadata-17-keys", {"input": "x", "metadata": {str(i): "v" for i in range(17)}},
     "metadata"),
    ("metadata-long-key", {"input": "x", "metadata": {"k" * 65: "v"}}, "metadata"),
    ("metadata-long-value", {"input": "x", "metadata": {"k": "v" * 513}}, "metadata"),
    ("tool-name-empty", {"input": "x", "tools": [{"type": "function", "name": ""}]},
     "tools[0].name"),
    ("tool-name-duplicate", {"input": "x", "tools": [WEATHER, TIME, dict(WEATHER)]},
     "tools[2].name"),
    ("tool-choice-required-without-tools", {"input": "x", "tool_choice": "required"},
     "tool_choice"),
    ("allowed-tools-required-empty", {"input": "x", "tools": [WEATHER], "tool_choice": {
        "type": "allowed_tools", "mode": "required", "tools": []}}, "tool_choice"),
    ("text-format-string", {"input": "x", "text": {"format": "json_object"}}, "text.format"),
    ("text-format-list", {"input": "x", "text": {"format": [{"type": "text"}]}},
     "text.format"),
    ("json-schema-empty-name", {"input": "x", "text": {"format": {
        "type": "json_schema", "name": "", "schema": {}}}}, "text.format.name"),
    ("include-obfuscation-string", {"input": "x", "stream_options": {
        "include_obfuscation": "no"}}, "stream_options.include_obfuscation"),
]


@pytest.mark.parametrize(("body", "param"), [(b, p) for _, b, p in BAD],
                         ids=[n for n, _, _ in BAD])
def test_a_bad_field_is_a_400_naming_it(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_responses_request(orjson.dumps(body))
    assert caught.value.status == 400
    assert caught.value.param == param


def _call(call_id: str = "c", name: str = "f") -> dict[str, str]:
    return {"type": "function_call", "call_id": call_id, "name": name, "arguments": "{}"}


def _output(call_id: str = "c") -> dict[str, str]:
    return {"type": "function_call_output", "call_id": call_id, "output": "ok"}


# Each would pair (or fail pairing) without the check: "" is an id like any other to a dict.
EMPTY_ID: list[tuple[str, list[Any], str]] = [
    ("call-and-output-call-id", [_call(""), _output("")], "input[1].call_id"),
    ("call-name", [_call(name=""), _output()], "input[1].name"),
    ("output-call-id", [_call(), _output(), _output("")], "input[3].call_id"),
]


@pytest.mark.parametrize(("items", "param"), [(i, p) for _, i, p in EMPTY_ID],
                         ids=[n for n, _, _ in EMPTY_ID])
def test_an_empty_call_id_or_function_name_is_a_400_naming_it(
    items: list[Any], param: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse(input=[{"role": "user", "content": "q"}, *items])
    err = caught.value.body()["error"]
    assert caught.value.status == 400
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert err["code"] == "empty_string"
    assert f"Invalid '{param}': empty string." in err["message"]


NOT_A_STRING: list[tuple[str, list[Any], str]] = [
    ("user-part", [{"role": "user", "content": [{"type": {}, "text": "x"}]}],
     "input[0].content[0].type"),
    ("assistant-part", [{"role": "assistant", "content": [{"type": [], "text": "x"}]},
                        {"role": "user", "content": "u"}], "input[0].content[0].type"),
    ("output-part", [{"type": "function_call_output", "call_id": "c", "output": [{"type": {}}]}],
     "input[0].output[0].type"),
    ("item", [{"type": 5}], "input[0].type"),
    ("role", [{"role": ["user"], "content": "x"}], "input[0].role"),
    ("image-url", [{"role": "user", "content": [
        {"type": "input_image", "image_url": {"url": "http://x/a.png"}}]}],
     "input[0].content[0].image_url"),
]


@pytest.mark.parametrize(("items", "param"), [(i, p) for _, i, p in NOT_A_STRING],
                         ids=[n for n, _, _ in NOT_A_STRING])
def test_a_type_or_role_of_another_json_type_is_a_400_saying_so(
    items: list[Any], param: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse(input=items)
    assert caught.value.param == param
    assert caught.value.message.startswith(f"Invalid type for '{param}': expected a string, got ")


def test_a_content_part_that_is_not_an_object_is_a_400_naming_the_part() -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse(input=[{"role": "user", "content": ["hi"]}])
    assert caught.value.param == "input[0].content[0]"
    assert caught.value.message == (
        "Invalid type for 'input[0].content[0]': expected an object, got a string.")


@pytest.mark.parametrize(
    ("tool", "message"),
    [
        ({"name": "f"}, "Missing required parameter: 'tools[0].type'."),
        ({"type": {"a": True, "b": None}},
         "Invalid type for 'tools[0].type': expected a string, got an object."),
        ({"type": ["function"]},
         "Invalid type for 'tools[0].type': expected a string, got an array."),
    ],
    ids=["missing", "object", "array"],
)
def test_a_tool_type_missing_or_not_a_string_is_named_without_a_python_repr(
    tool: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse(input="x", tools=[tool])
    assert (caught.value.param, caught.value.message) == ("tools[0].type", message)


def test_allowed_tools_among_many_keeps_exactly_the_allowed_ones_in_tool_order() -> None:
    names = [f"f{i}" for i in range(20_000)]
    allowed = names[::-7]
    request = parse(
        input="hi", tools=[{"type": "function", "name": n} for n in names],
        tool_choice={"type": "allowed_tools", "mode": "auto",
                     "tools": [{"type": "function", "name": n} for n in allowed]})
    assert [t["function"]["name"] for t in request.chat["tools"]] == allowed[::-1]
    assert [t["name"] for t in request.echo["tool_choice"]["tools"]] == allowed
    assert len(request.echo["tools"]) == len(names)


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"[]", b'"text"', b"null", b"\xff\xfe", b"[" * 300 + b"]" * 300,
     b'{"input": ' + b"[" * 300 + b"]" * 300 + b"}"],
    ids=["empty", "truncated", "array", "string", "null", "binary", "deep-array",
         "deep-input"],
)
def test_a_body_that_is_not_a_json_object_is_a_400(raw: bytes) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_responses_request(raw)
    assert caught.value.status == 400


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=20,
)
FIELDS = st.sampled_from([
    "model", "input", "instructions", "tools", "tool_choice", "text", "reasoning", "stream",
    "temperature", "max_output_tokens", "metadata", "previous_response_id", "conversation",
    "background", "store", "parallel_tool_calls", "include", "truncation", "user",
])
ITEM = st.fixed_dictionaries({"type": st.sampled_from(
    ["message", "function_call", "function_call_output", "reasoning", "item_reference", "x"]),
}, optional={"role": st.sampled_from(["user", "assistant", "system", "developer", "tool"]),
             "content": JSON, "call_id": JSON, "name": JSON, "arguments": JSON,
             "output": JSON})


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(st.dictionaries(FIELDS, JSON, max_size=6), st.lists(ITEM, max_size=4))
def test_any_json_body_parses_or_is_an_invalid_request(body: dict[str, Any],
                                                       items: list[Any]) -> None:
    if items:
        body["input"] = items
    try:
        request = parse_responses_request(orjson.dumps(body))
    except InvalidRequest as err:
        assert err.status == 400 and err.message
        return
    # What parses can always be sent on: the chat body encodes.
    orjson.dumps(request.chat)
    assert request.chat["messages"]


@st.composite
def tool_round(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Parallel calls with distinct (non-empty) ids, then their outputs in any order."""
    ids = draw(st.lists(st.text(min_size=1, max_size=4), min_size=1, max_size=3, unique=True))
    calls = [{"type": "function_call", "call_id": i, "name": draw(st.text(min_size=1,
                                                                          max_size=4)),
              "arguments": draw(st.text(max_size=8))} for i in ids]
    outputs = [{"type": "function_call_output", "call_id": i, "output": draw(st.text(max_size=8))}
               for i in draw(st.permutations(ids))]
    return calls + outputs


WELL_FORMED = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "developer"]),
                           "content": st.text(max_size=8)}).map(lambda m: [m]),
    tool_round(),
    st.fixed_dictionaries({"type": st.just("reasoning"), "id": st.text(max_size=4),
                           "summary": st.just([])}).map(lambda r: [r]),
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.lists(WELL_FORMED, max_size=5))
def test_well_formed_items_always_translate_every_call_and_output(
    rounds: list[list[Any]]
) -> None:
    items = [item for round_ in rounds for item in round_]
    items.append({"role": "user", "content": "go"})
    chat = parse(input=items).chat["messages"]
    calls = [c for m in chat for c in m.get("tool_calls", ())]
    assert [c["id"] for c in calls] == [i["call_id"] for i in items
                                        if i.get("type") == "function_call"]
    assert [m["tool_call_id"] for m in chat if m["role"] == "tool"] == [
        i["call_id"] for i in items if i.get("type") == "function_call_output"]
    assert len(chat) <= len(items)


# -- refused state ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("previous_response_id", "resp_abc"), ("conversation", "conv_1"), ("background", True)],
)
def test_stateless_routes_refuse_state_naming_the_param(field: str, value: Any) -> None:
    request = parse(input="hi", **{field: value})
    with pytest.raises(InvalidRequest) as caught:
        refuse_state(request)
    assert caught.value.status == 400 and caught.value.param == field
    assert "resend the whole conversation in `input`" in caught.value.message


def test_a_plain_request_passes_the_state_check() -> None:
    refuse_state(parse(input="hi", store=True, background=False))


def test_chaining_routes_accept_previous_response_id_but_not_conversation() -> None:
    refuse_state(parse(input="hi", previous_response_id="resp_abc"), chains=True)
    with pytest.raises(InvalidRequest) as caught:
        refuse_state(parse(input="hi", conversation="conv_1"), chains=True)
    assert caught.value.param == "conversation"
