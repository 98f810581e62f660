"""End to end: the Responses API through the proxy with openai-python, on echo and openai routes.

Every stream passes the reusable check (tests/responses_assert.py); sync answers are compared
with the stream's final object; what the fake upstream received shows the translation.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from tests.conftest import KEY, Proxy, ProxyFactory, answering, closed_port, stepped_stream
from tests.fake_openai import FakeOpenAI
from tests.responses_assert import assert_responses_stream, output_text, parse_sse
from tests.responses_client import CLOCK, WEATHER, comparable, post_raw, stream_final


def routes_for(fake: FakeOpenAI) -> str:
    return f"""
upstreams:
  fake:
    kind: openai
    url: {fake.url}/v1
    api_key: upstream-secret
  demo:
    kind: echo
models:
  mistral:
    upstream: fake
    model: mistralai/Mistral-7B-Instruct-v0.2
  echo:
    upstream: demo
"""


@pytest.fixture
async def proxy(make_proxy: ProxyFactory, fake_openai: FakeOpenAI) -> Proxy:
    return await make_proxy(routes_for(fake_openai))


@asynccontextmanager
async def proxy_before(
    make_proxy: ProxyFactory, chat: Callable[[web.Request], Awaitable[web.StreamResponse]],
    model: str = "odd",
) -> AsyncIterator[Proxy]:
    """A proxy whose one model is an openai route to an upstream answering chat with `chat`."""
    async with answering("/v1/chat/completions", chat) as url:
        yield await make_proxy(
            f"upstreams:\n  {model}:\n    kind: openai\n    url: {url}/v1\n"
            f"models:\n  {model}:\n    upstream: {model}\n"
        )


def chat_body(fake: FakeOpenAI) -> dict[str, Any]:
    body = fake.received[-1].body
    assert body is not None
    return body


# -- echo and plain text ---------------------------------------------------------------------


async def test_echo_route_answers_sync_with_the_strict_response_object(proxy: Proxy) -> None:
    reply = await proxy.client().responses.create(model="echo", input="hello there")
    assert reply.output_text == "hello there"
    assert reply.status == "completed"
    assert reply.id.startswith("resp_") and reply.output[0].id.startswith("msg_")
    assert reply.model == "echo"
    assert reply.store is False
    assert reply.usage is not None and reply.usage.output_tokens == 2


@pytest.mark.parametrize("stream", [False, True], ids=["sync", "stream"])
async def test_a_json_text_format_echo_cannot_honour_is_a_400_naming_text_format(
    proxy: Proxy, stream: bool
) -> None:
    # Translated to the chat `response_format`, which the echo kind refuses: the client is
    # told of its own field.
    with pytest.raises(openai.BadRequestError) as info:
        await proxy.client().responses.create(
            model="echo", input="hi", text={"format": {"type": "json_object"}}, stream=stream
        )
    assert info.value.param == "text.format"


async def test_echo_route_stream_passes_the_event_checks_and_the_sdk_accumulates_it(
    proxy: Proxy,
) -> None:
    final, _ = await stream_final(proxy, {"model": "echo", "input": "one two three"})
    assert output_text(final) == "one two three"
    assert final["store"] is False
    async with proxy.client().responses.stream(model="echo", input="one two three") as stream:
        answer = await stream.get_final_response()
    assert answer.output_text == "one two three"
    assert answer.status == "completed"


@pytest.mark.parametrize("model", ["echo", "mistral"])
async def test_sync_answer_equals_the_streams_final_object(proxy: Proxy, model: str) -> None:
    body = {"model": model, "input": "same answer twice", "instructions": "Be brief.",
            "metadata": {"k": "v"}}
    status, _, raw = await post_raw(proxy, body)
    assert status == 200
    sync = orjson.loads(raw)
    final, _ = await stream_final(proxy, body)
    assert comparable(sync) == comparable(final)
    assert sync["metadata"] == {"k": "v"} and sync["instructions"] == "Be brief."


async def test_openai_route_translates_to_chat_and_rewrites_the_model(
    proxy: Proxy, fake_openai: FakeOpenAI
) -> None:
    reply = await proxy.client().responses.create(
        model="mistral", input="hello upstream", instructions="Be brief.", max_output_tokens=50,
        temperature=0.2,
    )
    assert reply.output_text == "hello upstream"
    assert reply.model == "mistral" and reply.store is False
    assert reply.usage is not None and (reply.usage.input_tokens, reply.usage.total_tokens) == (
        11, 13)
    sent = chat_body(fake_openai)
    assert fake_openai.received[-1].path == "/v1/chat/completions"
    assert sent["model"] == "mistralai/Mistral-7B-Instruct-v0.2"
    assert sent["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "hello upstream"}]
    assert sent["max_tokens"] == 50 and sent["temperature"] == 0.2
    assert fake_openai.received[-1].headers["Authorization"] == "Bearer upstream-secret"
    assert KEY not in str(fake_openai.received[-1].headers)


async def test_newer_request_fields_of_openai_python_reach_the_chat_upstream_translated(
    proxy: Proxy, fake_openai: FakeOpenAI
) -> None:
    moderation: Any = {"model": "omni-moderation-latest", "policy": {"output": {"mode": "block"}}}
    reply = await proxy.client().responses.create(
        model="mistral", input="hi", service_tier="fast", text={"verbosity": "low"},
        reasoning={"effort": "low", "generate_summary": "concise"}, moderation=moderation,
    )
    assert reply.output_text == "hi" and reply.reasoning is not None
    assert reply.reasoning.summary == "concise" and reply.text is not None
    assert reply.text.verbosity == "low"
    sent = chat_body(fake_openai)
    assert (sent["verbosity"], sent["reasoning_effort"]) == ("low", "low")
    assert sent["moderation"] == moderation and "service_tier" not in sent


async def test_moderation_on_an_echo_route_is_a_400_naming_it(proxy: Proxy) -> None:
    # Echo moderates nothing: run as if absent, the client would trust unmoderated text.
    with pytest.raises(openai.BadRequestError) as info:
        await proxy.client().responses.create(
            model="echo", input="hi", moderation={"model": "omni-moderation-latest"}
        )
    assert info.value.param == "moderation"


async def test_openai_route_stream_asks_the_upstream_for_usage(
    proxy: Proxy, fake_openai: FakeOpenAI
) -> None:
    final, _ = await stream_final(proxy, {"model": "mistral", "input": "a b c"})
    assert output_text(final) == "a b c"
    assert final["usage"]["output_tokens"] == 3 and final["store"] is False
    sent = chat_body(fake_openai)
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


async def test_responses_path_without_v1_works_too(proxy: Proxy) -> None:
    status, _, raw = await post_raw(proxy, {"model": "echo", "input": "short"}, path="/responses")
    assert status == 200 and b'"text":"short"' in raw


# -- function tools ------------------------------------------------------------------------


async def test_function_call_streams_as_an_item_with_argument_deltas(
    proxy: Proxy, fake_openai: FakeOpenAI
) -> None:
    final, raw = await stream_final(proxy, {
        "model": "mistral", "input": "weather in Paris?", "tools": [WEATHER],
        "tool_choice": "required",
    })
    [call] = final["output"]
    assert call["type"] == "function_call" and call["id"].startswith("fc_")
    assert call["call_id"] == "call_abc123" and call["name"] == "get_weather"
    assert call["arguments"] == '{"city": "Paris"}'
    deltas = [d for _, d in parse_sse(raw).events
              if d["type"] == "response.function_call_arguments.delta"]
    assert [d["delta"] for d in deltas] == ['{"city": ', '"Paris"}']
    sent = chat_body(fake_openai)
    assert sent["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city.",
        "parameters": WEATHER["parameters"]}}]
    assert sent["tool_choice"] == "required"


async def test_named_tool_choice_is_sent_in_chat_form(
    proxy: Proxy, fake_openai: FakeOpenAI
) -> None:
    reply = await proxy.client().responses.create(
        model="mistral", input="weather?", tools=[WEATHER, CLOCK],
        tool_choice={"type": "function", "name": "get_weather"},
    )
    assert reply.output[0].type == "function_call"
    assert chat_body(fake_openai)["tool_choice"] == {
        "type": "function", "function": {"name": "get_weather"}}


async def test_parallel_calls_are_two_items_with_their_own_ids_and_arguments(
    proxy: Proxy, fake_openai: FakeOpenAI
) -> None:
    fake_openai.mode = "parallel_tools"
    body = {"model": "mistral", "input": "weather and time?", "tools": [WEATHER, CLOCK]}
    final, raw = await stream_final(proxy, body)
    calls = [(o["call_id"], o["name"], o["arguments"]) for o in final["output"]]
    assert calls == [("call_one", "get_weather", '{"city": "Paris"}'),
                     ("call_two", "get_time", '{"tz": "CET"}')]
    added = [d["item"] for _, d in parse_sse(raw).events
             if d["type"] == "response.output_item.added"]
    assert [a["call_id"] for a in added] == ["call_one", "call_two"]
    status, _, sync_raw = await post_raw(proxy, body)
    assert status == 200
    assert comparable(orjson.loads(sync_raw)) == comparable(final)


async def test_function_call_output_round_trip_rebuilds_tool_calls_and_tool_messages(
    proxy: Proxy, fake_openai: FakeOpenAI
) -> None:
    client = proxy.client()
    first = await client.responses.create(
        model="mistral", input="weather in Paris?", tools=[WEATHER])
    call = first.output[0]
    assert call.type == "function_call"
    second = await client.responses.create(
        model="mistral", tools=[WEATHER],
        input=[
            {"role": "user", "content": "weather in Paris?"},
            call.model_dump(exclude_none=True),
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
        ],
    )
    assert second.output_text == "The weather is sunny."
    messages = chat_body(fake_openai)["messages"]
    assert messages[0] == {"role": "user", "content": "weather in Paris?"}
    assert messages[1]["role"] == "assistant"
    assert messages[1]["tool_calls"] == [{"id": "call_abc123", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    assert messages[2] == {"role": "tool", "tool_call_id": "call_abc123", "content": "sunny"}


async def test_an_agents_sdk_agent_runs_its_tool_loop_through_the_proxy(
    proxy: Proxy, fake_openai: FakeOpenAI
) -> None:
    import agents  # the dev extra's openai-agents

    agents.set_tracing_disabled(True)
    ran: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        ran.append(city)
        return "sunny"

    model = agents.OpenAIResponsesModel(model="mistral", openai_client=proxy.client())
    agent = agents.Agent(name="forecaster", instructions="Answer about weather.",
                         tools=[get_weather], model=model)
    result = await agents.Runner.run(agent, "What is the weather in Paris?")
    assert ran == ["Paris"]
    assert result.final_output == "The weather is sunny."
    # The second model call carried the tool's output back as a chat `tool` message.
    messages = chat_body(fake_openai)["messages"]
    assert messages[-1] == {"role": "tool", "tool_call_id": "call_abc123", "content": "sunny"}
    assert messages[0] == {"role": "system", "content": "Answer about weather."}


async def test_an_agents_sdk_tool_returning_an_image_reaches_the_model_after_the_tool_messages(
    proxy: Proxy, fake_openai: FakeOpenAI
) -> None:
    import agents

    agents.set_tracing_disabled(True)
    fake_openai.mode = "parallel_tools"
    png = "data:image/png;base64,iVBORw0KGgo="

    @agents.function_tool
    def get_weather(city: str) -> Any:  # a ToolOutputImage; Any, as the SDK resolves hints
        """A satellite picture of a city."""
        return agents.ToolOutputImage(image_url=png)

    @agents.function_tool
    def get_time(tz: str) -> str:
        """The time in a time zone."""
        return "12:00"

    model = agents.OpenAIResponsesModel(model="mistral", openai_client=proxy.client())
    agent = agents.Agent(name="looker", tools=[get_weather, get_time], model=model)
    # The fake calls the tools again while the last message is not a tool result: the
    # second model call is the one to look at.
    with pytest.raises(agents.MaxTurnsExceeded):
        await agents.Runner.run(agent, "Paris: picture and time?", max_turns=2)
    second = fake_openai.received[1].body
    assert second is not None
    messages = second["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool", "user"]
    assert [c["id"] for c in messages[1]["tool_calls"]] == ["call_one", "call_two"]
    assert {m["tool_call_id"]: m["content"] for m in messages[2:4]} == {
        "call_one": "", "call_two": "12:00"}
    assert messages[4]["content"] == [{"type": "image_url", "image_url": {"url": png}}]


async def test_a_codex_style_history_reaches_the_upstream_as_equivalent_chat_messages(
    proxy: Proxy, fake_openai: FakeOpenAI
) -> None:
    # As Codex CLI sends it: no item ids, a developer message beside the instructions,
    # reasoning with encrypted content, parallel calls answered in another order, nulls.
    await proxy.client().responses.create(
        model="mistral", instructions="You are a coding agent.", tools=[WEATHER, CLOCK],
        input=[
            {"type": "message", "role": "developer",
             "content": [{"type": "input_text", "text": "Sandbox: read-only."}]},
            {"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": "Weather and time?"}]},
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Two calls."}],
             "content": None, "encrypted_content": "gAAAAB..."},
            {"type": "message", "role": "assistant", "phase": "commentary",
             "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]},
            {"type": "function_call", "name": "get_weather", "arguments": '{"city":"Oslo"}',
             "call_id": "call_w", "id": None, "status": None},
            {"type": "function_call", "name": "get_time", "arguments": "{}", "call_id": "call_t"},
            {"type": "function_call_output", "call_id": "call_t", "output": "09:00"},
            {"type": "function_call_output", "call_id": "call_w",
             "output": [{"type": "input_text", "text": "rain"}]},
            {"type": "message", "role": "assistant",
             "content": [{"type": "refusal", "refusal": "I will not guess."}]},
            {"role": "user", "content": "ok"},
        ],
    )
    assert chat_body(fake_openai)["messages"] == [
        {"role": "system", "content": "You are a coding agent.\n\nSandbox: read-only."},
        {"role": "user", "content": "Weather and time?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_w", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}},
            {"id": "call_t", "type": "function",
             "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_t", "content": "09:00"},
        {"role": "tool", "tool_call_id": "call_w", "content": "rain"},
        {"role": "assistant", "content": "I will not guess."},
        {"role": "user", "content": "ok"},
    ]


@pytest.mark.parametrize(
    ("items", "param"),
    [
        ([{"role": "user", "content": "q"},
          {"type": "function_call_output", "call_id": "call_gone", "output": "18C"}],
         "input[1].call_id"),
        ([{"role": "user", "content": "q"},
          {"type": "function_call", "call_id": "call_open", "name": "get_weather",
           "arguments": "{}"}], "input[1].call_id"),
    ],
    ids=["output-without-call", "call-without-output"],
)
async def test_a_call_and_output_that_do_not_pair_are_a_400_before_the_upstream(
    proxy: Proxy, fake_openai: FakeOpenAI, items: list[Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await proxy.client().responses.create(model="mistral", input=items, tools=[WEATHER])
    assert info.value.param == param
    assert fake_openai.received == []


async def test_an_empty_call_id_is_a_400_before_the_upstream(
    proxy: Proxy, fake_openai: FakeOpenAI
) -> None:
    """A call and its output both with call_id "" would pair, but name no call: refused."""
    items = [{"role": "user", "content": "q"},
             {"type": "function_call", "call_id": "", "name": "get_weather", "arguments": "{}"},
             {"type": "function_call_output", "call_id": "", "output": "18C"}]
    with pytest.raises(openai.BadRequestError) as info:
        await proxy.client().responses.create(model="mistral", input=items, tools=[WEATHER])
    assert info.value.param == "input[1].call_id"
    assert info.value.code == "empty_string"
    assert fake_openai.received == []


# -- how a response ends -------------------------------------------------------------------


async def test_length_stop_is_response_incomplete_in_stream_and_sync(
    proxy: Proxy, fake_openai: FakeOpenAI
) -> None:
    fake_openai.mode = "length"
    body = {"model": "mistral", "input": "cut me short", "max_output_tokens": 3}
    final, raw = await stream_final(proxy, body)
    assert parse_sse(raw).events[-1][1]["type"] == "response.incomplete"
    assert final["status"] == "incomplete"
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    reply = await proxy.client().responses.create(model="mistral", input="cut me short")
    assert reply.status == "incomplete"
    assert reply.incomplete_details is not None
    assert reply.incomplete_details.reason == "max_output_tokens"


@pytest.mark.parametrize("mode", ["stream_error_event", "midstream_drop"])
async def test_upstream_failure_after_the_commit_is_response_failed_then_done(
    proxy: Proxy, fake_openai: FakeOpenAI, mode: str
) -> None:
    fake_openai.mode = mode
    status, _, raw = await post_raw(
        proxy, {"model": "mistral", "input": "one two three", "stream": True})
    assert status == 200
    final = assert_responses_stream(raw)
    kinds = [d["type"] for _, d in parse_sse(raw).events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.failed"
    assert "response.output_text.delta" in kinds
    assert final["status"] == "failed"
    assert final["error"]["code"] == "server_error"
    assert "'fake'" in final["error"]["message"]
    assert raw.endswith(b"data: [DONE]\n\n")


async def test_the_sdk_reads_a_failed_stream_to_its_failed_event(
    proxy: Proxy, fake_openai: FakeOpenAI
) -> None:
    fake_openai.mode = "stream_error_event"
    async with proxy.client().responses.stream(model="mistral", input="x y") as stream:
        events = [event async for event in stream]
        with pytest.raises(RuntimeError, match=r"response\.completed"):
            await stream.get_final_response()
    assert events[0].type == "response.created"
    last = events[-1]
    assert last.type == "response.failed"
    assert last.response.error is not None and "model crashed" in last.response.error.message


async def test_upstream_error_before_the_commit_is_an_http_error(
    proxy: Proxy, fake_openai: FakeOpenAI
) -> None:
    fake_openai.mode = "error400"
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            await proxy.client().responses.create(model="mistral", input="x", stream=stream)
        assert info.value.code == "context_length_exceeded"


async def test_unreachable_upstream_is_a_502_not_a_stream(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(f"""
upstreams:
  gone: {{kind: openai, url: "http://127.0.0.1:{closed_port()}/v1"}}
models:
  m: {{upstream: gone}}
""")
    status, headers, raw = await post_raw(proxy, {"model": "m", "input": "x", "stream": True})
    assert status == 502 and headers["Content-Type"].startswith("application/json")
    assert b'"code":"upstream_unavailable"' in raw


# -- state the stateless routes refuse -------------------------------------------------------

STATE_FIELDS = [
    pytest.param("previous_response_id", {"previous_response_id": "resp_abc"},
                 id="previous_response_id"),
    pytest.param("conversation", {"conversation": "conv_123"}, id="conversation"),
    pytest.param("background", {"background": True}, id="background"),
]


@pytest.mark.parametrize("model", ["mistral", "echo"])
@pytest.mark.parametrize(("param", "extra"), STATE_FIELDS)
async def test_stateless_routes_refuse_state_before_any_upstream_call(
    proxy: Proxy, fake_openai: FakeOpenAI, model: str, param: str, extra: dict[str, Any]
) -> None:
    for stream in (False, True):
        status, _, raw = await post_raw(
            proxy, {"model": model, "input": "hi", "stream": stream, **extra})
        assert status == 400
        error = orjson.loads(raw)["error"]
        assert error["param"] == param
        assert "`input`" in error["message"]
    assert fake_openai.received == []


@pytest.mark.parametrize("model", ["mistral", "echo"])
@pytest.mark.parametrize("kind", [{}, []], ids=["object", "array"])
async def test_a_content_part_type_that_is_not_a_string_is_a_400_naming_it(
    proxy: Proxy, fake_openai: FakeOpenAI, model: str, kind: Any
) -> None:
    for stream in (False, True):
        status, _, raw = await post_raw(proxy, {
            "model": model, "stream": stream,
            "input": [{"role": "user", "content": [{"type": kind, "text": "x"}]}]})
        assert status == 400, raw
        error = orjson.loads(raw)["error"]
        assert (error["type"], error["param"]) == (
            "invalid_request_error", "input[0].content[0].type")
    assert fake_openai.received == []


async def test_the_sdk_sees_the_refusal_as_a_bad_request(proxy: Proxy) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await proxy.client().responses.create(
            model="echo", input="hi", previous_response_id="resp_abc")
    assert info.value.param == "previous_response_id"


# -- nothing is stored -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/responses/resp_abc"),
        ("DELETE", "/v1/responses/resp_abc"),
        ("POST", "/v1/responses/resp_abc/cancel"),
        ("GET", "/v1/responses/resp_abc/input_items"),
        ("GET", "/responses/resp_abc"),
        ("DELETE", "/responses/resp_abc"),
    ],
)
async def test_stored_response_endpoints_are_a_404_saying_nothing_is_stored(
    proxy: Proxy, method: str, path: str
) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.request(method, proxy.url + path,
                                headers={"Authorization": f"Bearer {KEY}"}) as resp:
            assert resp.status == 404
            error = (await resp.json())["error"]
        async with http.request(method, proxy.url + path) as anonymous:
            assert anonymous.status == 401
    assert error["code"] == "not_found"
    assert "stores no responses" in error["message"]


async def test_the_sdk_gets_not_found_for_a_stored_response(proxy: Proxy) -> None:
    with pytest.raises(openai.NotFoundError):
        await proxy.client().responses.retrieve("resp_abc")
    with pytest.raises(openai.NotFoundError):
        await proxy.client().responses.delete("resp_abc")


# -- token streams read from a template ----------------------------------------------------------

THINKING = [" Let", " me", ' "think"', "\n", " — ok"]
ANSWER = ["The", " café", " is", " at", ' "Rue\\Nord"', "\n\n", " 🦜", "."]


def token_events() -> bytes:
    """A model server's token stream: reasoning then answer, with texts that need escapes
    among plain ones, and one token written with an escape JSON does not need."""

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        data = {"id": "chatcmpl-tok", "object": "chat.completion.chunk", "created": 1,
                "model": "m", "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                           "finish_reason": finish}], "usage": None}
        return b"data: " + orjson.dumps(data) + b"\n\n"

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"reasoning_content": t}) for t in THINKING]
    events += [chunk({"content": t}) for t in ANSWER]
    events[-3] = events[-3].replace(" 🦜".encode(), b" \\ud83e\\udd9c")
    events.append(chunk({}, "stop"))
    return b"".join(events) + b"data: [DONE]\n\n"


@pytest.mark.parametrize("one_write", [True, False], ids=["one-write", "write-per-event"])
async def test_a_token_stream_reaches_the_client_exactly_in_one_read_or_many(
    make_proxy: ProxyFactory, one_write: bool
) -> None:
    body = token_events()

    async def chat(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for part in [body] if one_write else [e + b"\n\n" for e in body.split(b"\n\n")[:-1]]:
            await resp.write(part)
        return resp

    async with proxy_before(make_proxy, chat, "tok") as proxy:
        final, _ = await stream_final(proxy, {"model": "tok", "input": "hi"})
        async with proxy.client().responses.stream(model="tok", input="hi") as stream:
            answer = await stream.get_final_response()
    assert output_text(final) == "".join(ANSWER) == answer.output_text
    reasoning = [item for item in final["output"] if item["type"] == "reasoning"]
    assert [p["text"] for p in reasoning[0]["content"]] == ["".join(THINKING)]


async def test_an_event_split_at_a_line_end_is_decoded_as_one_event_after_the_template(
    make_proxy: ProxyFactory,
) -> None:
    """The decode path's shortcut for a read that is one token event of the stream's
    template must not take a read that ends the decoder's unfinished event: here its second
    data line, which on its own looks like a token event. The two lines are one event whose
    data is no JSON, so the response fails after "b" and no "d" is ever a delta."""

    def token(text: str) -> bytes:
        return (b'data: {"choices":[{"index":0,"delta":{"content":"%s"},"finish_reason":null}]}'
                % text.encode())

    role = b'data: {"choices":[{"index":0,"delta":{"role":"assistant"},"finish_reason":null}]}'
    finish = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}'
    writes = [role + b"\n\n" + token("a") + b"\n\n", token("b") + b"\n\n" + token("c") + b"\n",
              token("d") + b"\n\n", finish + b"\n\ndata: [DONE]\n\n"]
    seen = [asyncio.Event() for _ in writes[1:]]
    chat = stepped_stream(writes, seen)

    deltas: list[str] = []
    types: list[str] = []
    async with proxy_before(make_proxy, chat, "split") as proxy, aiohttp.ClientSession(
    ) as http, http.post(
        proxy.url + "/v1/responses", json={"model": "split", "input": "x", "stream": True},
        headers={"Authorization": f"Bearer {KEY}"},
    ) as resp:
        try:
            async with asyncio.timeout(10):
                while not resp.content.at_eof():
                    event = await resp.content.readuntil(b"\n\n")
                    if not event.startswith(b"event: "):
                        continue
                    data = orjson.loads(event.split(b"\ndata: ", 1)[1])
                    types.append(data["type"])
                    if data["type"] == "response.output_text.delta":
                        deltas.append(data["delta"])
                    if deltas == ["a"]:
                        seen[0].set()
                    elif deltas == ["a", "b"] and not seen[1].is_set():
                        seen[1].set()
                    elif seen[1].is_set():
                        seen[2].set()
        finally:
            for step in seen:
                step.set()
    assert deltas == ["a", "b"]
    assert types[-1] == "response.failed"


BROKEN_COMPLETIONS = {
    "content-number": {"choices": [{"message": {"content": 5}}]},
    "choice-not-object": {"choices": ["hi"]},
    "arguments-object": {"choices": [{"message": {"tool_calls": [
        {"id": "c", "function": {"name": "f", "arguments": {"x": 1}}}]}}]},
    "huge-usage": {"choices": [{"message": {"content": "ok"}}],
                   "usage": {"prompt_tokens": 1.8e19, "completion_tokens": 2**64 - 1}},
}


@pytest.mark.parametrize("name", list(BROKEN_COMPLETIONS))
async def test_a_completion_with_wrong_types_is_a_502_and_the_next_request_is_served(
    make_proxy: ProxyFactory, name: str
) -> None:
    answers = [BROKEN_COMPLETIONS[name], {"choices": [{"message": {"content": "fine"}}]}]

    async def chat(request: web.Request) -> web.Response:
        return web.json_response(answers.pop(0))

    async with proxy_before(make_proxy, chat) as proxy:
        client = proxy.client()
        if name == "huge-usage":  # counts beyond what a client reads exactly are capped
            reply = await client.responses.create(model="odd", input="hi")
            assert reply.usage is not None and reply.usage.input_tokens == 2**53
            assert reply.usage.total_tokens == 2**53
        else:
            with pytest.raises(openai.APIStatusError) as info:
                await client.responses.create(model="odd", input="hi")
            assert info.value.status_code == 502
            assert "types a chat completion has" in info.value.message
        reply = await client.responses.create(model="odd", input="hi")
    assert reply.output_text == "fine"


BROKEN_CHUNKS = {
    "content-number": {"choices": [{"index": 0, "delta": {"content": 5}, "finish_reason": None}]},
    "choice-not-object": {"choices": ["hi"]},
    "no-delta": {"choices": [{"index": 0, "finish_reason": None}]},
    "finish-list": {"choices": [{"index": 0, "delta": {}, "finish_reason": ["stop"]}]},
    "usage-string": {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                     "usage": "lots"},
    "usage-list": {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                   "usage": [1, 2]},
    "arguments-object": {"choices": [{"index": 0, "finish_reason": None, "delta": {
        "tool_calls": [{"index": 0, "id": "c",
                        "function": {"name": "f", "arguments": {"x": 1}}}]}}]},
}


@pytest.mark.parametrize("name", list(BROKEN_CHUNKS))
async def test_a_stream_chunk_of_the_wrong_shape_ends_cleanly_after_the_text(
    make_proxy: ProxyFactory, name: str
) -> None:
    def event(chunk: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps({"id": "c", "object": "chat.completion.chunk",
                                         "created": 1, "model": "m", **chunk}) + b"\n\n"

    async def chat(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(event({"choices": [{"index": 0, "delta": {"content": "so far"},
                                             "finish_reason": None}]}))
        await resp.write(event(BROKEN_CHUNKS[name]) + b"data: [DONE]\n\n")
        return resp

    async with proxy_before(make_proxy, chat) as proxy:
        status, _, raw = await post_raw(proxy, {"model": "odd", "input": "hi", "stream": True})
    assert status == 200
    final = assert_responses_stream(raw)  # the order, the ids, [DONE] last
    if name.startswith("usage"):  # usage of another type counts as none
        assert final["status"] == "completed" and final["usage"]["total_tokens"] == 0
        assert output_text(final) == "so far"
        return
    assert b'"delta":5' not in raw
    assert parse_sse(raw).events[-1][1]["type"] == "response.failed"
    assert final["error"]["code"] == "server_error"
    assert "chat completion chunk" in final["error"]["message"]
    assert output_text(final) == "so far"


# -- chunks an upstream got wrong: its failure, told as such -------------------------------------


def chunk_event(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1,
                                     "model": "m", **chunk}) + b"\n\n"


def text_event(text: str) -> bytes:
    return chunk_event({"choices": [{"index": 0, "delta": {"content": text},
                                     "finish_reason": None}]})


def finish_event(reason: str) -> bytes:
    return chunk_event({"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})


def tools_event(*calls: dict[str, Any]) -> bytes:
    return chunk_event({"choices": [{"index": 0, "delta": {"tool_calls": list(calls)},
                                     "finish_reason": None}]})


@asynccontextmanager
async def proxy_answering(
    make_proxy: ProxyFactory, stream: bytes, completion: dict[str, Any] | None = None
) -> AsyncIterator[Proxy]:
    """A proxy before an upstream that streams `stream` and answers sync with `completion`."""

    async def chat(request: web.Request) -> web.Response:
        if (await request.json()).get("stream"):
            return web.Response(body=stream, content_type="text/event-stream")
        return web.json_response(completion)

    async with proxy_before(make_proxy, chat) as proxy:
        yield proxy


FIRST_CHUNKS = {
    "no-delta": {"choices": [{"index": 0}]},
    "null-delta": {"choices": [{"index": 0, "delta": None}]},
    "string-delta": {"choices": [{"index": 0, "delta": "s"}]},
    "null-choice": {"choices": [None]},
    "number-choice": {"choices": [1]},
}


@pytest.mark.parametrize("name", list(FIRST_CHUNKS))
async def test_a_first_chunk_of_the_wrong_shape_is_the_upstreams_failure_not_the_proxys(
    make_proxy: ProxyFactory, name: str
) -> None:
    body = chunk_event(FIRST_CHUNKS[name]) + finish_event("stop") + b"data: [DONE]\n\n"
    async with proxy_answering(make_proxy, body) as proxy:
        final, _ = await stream_final(proxy, {"model": "odd", "input": "hi"})
        # Chat relays the chunks as they came, and the stream ends as the upstream's did.
        status, _, raw = await post_raw(
            proxy, {"model": "odd", "stream": True, "messages": [{"role": "user", "content": "x"}]},
            path="/v1/chat/completions",
        )
    assert final["status"] == "failed"
    assert final["error"]["type"] == "upstream_error", final["error"]
    assert "chat completion chunk" in final["error"]["message"]
    assert status == 200 and raw == body


OPENROUTER_ERROR = chunk_event({
    "provider": "p",
    "error": {"code": "server_error", "message": "Provider disconnected unexpectedly"},
    "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
})


async def test_an_error_beside_the_choices_fails_the_response_with_the_upstreams_message(
    make_proxy: ProxyFactory,
) -> None:
    stream = text_event("so far") + OPENROUTER_ERROR + b"data: [DONE]\n\n"
    completion = {"id": "gen-1", "object": "chat.completion", "created": 1, "model": "m",
                  "error": {"code": 502, "message": "Provider returned error"},
                  "choices": [{"index": 0, "finish_reason": "error",
                               "message": {"role": "assistant", "content": "partial"}}]}
    async with proxy_answering(make_proxy, stream, completion) as proxy:
        final, _ = await stream_final(proxy, {"model": "odd", "input": "hi"})
        with pytest.raises(openai.APIStatusError) as info:
            await proxy.client().responses.create(model="odd", input="hi")
    assert final["status"] == "failed" and output_text(final) == "so far"
    assert final["error"]["type"] == "upstream_error"
    assert "Provider disconnected unexpectedly" in final["error"]["message"]
    assert info.value.status_code == 502 and info.value.code == "upstream_error"
    assert "Provider returned error" in info.value.message


NAMELESS_CALLS = {
    "no-name": [tools_event({"index": 0, "id": "call_1", "function": {"arguments": "{}"}})],
    # A continuation for a call that was never opened: the proxy must not invent one.
    "index-jump": [
        tools_event({"index": 5, "id": "call_5", "function": {"name": "f", "arguments": "{}"}}),
        tools_event({"index": 2, "function": {"arguments": "{}"}}),
    ],
}


@pytest.mark.parametrize("name", list(NAMELESS_CALLS))
async def test_a_streamed_tool_call_without_a_name_fails_the_response(
    make_proxy: ProxyFactory, name: str
) -> None:
    body = b"".join(NAMELESS_CALLS[name]) + finish_event("tool_calls") + b"data: [DONE]\n\n"
    async with proxy_answering(make_proxy, body) as proxy:
        final, _ = await stream_final(proxy, {"model": "odd", "input": "hi"})
    assert final["status"] == "failed"
    assert final["error"]["type"] == "upstream_error"
    assert "without a function name" in final["error"]["message"]


@pytest.mark.parametrize("function", [None, {"arguments": "{}"}], ids=["null", "no-name"])
async def test_a_completed_tool_call_without_a_name_is_a_502(
    make_proxy: ProxyFactory, function: dict[str, Any] | None
) -> None:
    completion = {"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": function}]
    }}]}
    async with proxy_answering(make_proxy, b"", completion) as proxy:
        with pytest.raises(openai.APIStatusError) as info:
            await proxy.client().responses.create(model="odd", input="hi")
    assert info.value.status_code == 502 and info.value.code == "upstream_error"
    assert "without a function name" in info.value.message
