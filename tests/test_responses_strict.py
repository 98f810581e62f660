"""Every Responses object and event the proxy writes is one openai-python's own types parse,
with no field they do not know, on every route kind and every way a response ends.

Streams go through `assert_responses_stream` (which parses each event with the types, see
tests/responses_assert.py), sync bodies through `assert_response_types`; a natively relayed
stream's events are the upstream's, so there only the proxy's framing and its own end are held
to the rules.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from proxy.errors import UpstreamFailed
from proxy.ingress.responses_writer import ResponsesWriter
from proxy.response_ids import ENV_SECRET
from tests.conftest import Proxy, ProxyFactory, answering
from tests.custom_e2e import API_IDS, APIS, DIFY, custom_env, serve_api
from tests.fake_agents import Reply
from tests.fake_letta import FakeLetta, Scenario
from tests.fake_openai import FakeOpenAI
from tests.responses_assert import assert_response_types, assert_responses_stream, parse_sse
from tests.responses_client import WEATHER, post_raw

__all__ = ["custom_env"]

CALL = {"index": 0, "id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
# name -> (chat deltas in order, finish reason, usage sent)
SCRIPTS: dict[str, tuple[list[dict[str, Any]], str, bool]] = {
    "text": ([{"role": "assistant", "content": "Hello "}, {"content": "world"}], "stop", True),
    "text-no-usage": ([{"content": "Hello"}], "stop", False),
    "reasoning": ([{"reasoning_content": "Think."}, {"content": "Done."}], "stop", True),
    "tool-calls": ([{"content": "Let me see."}, {"tool_calls": [CALL]},
                    {"tool_calls": [{**CALL, "index": 1, "id": "call_2"}]}], "tool_calls", True),
    "refusal": ([{"refusal": "I cannot."}], "stop", True),
    "length": ([{"content": "cut"}], "length", True),
    "content-filter": ([{"content": "filtered"}], "content_filter", False),
    "empty": ([], "stop", False),
    "namespaced-call": ([{"tool_calls": [{**CALL, "function": {
        "name": "crm__lookup", "arguments": '{"id":7}'}}]}], "tool_calls", True),
}
USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
         "prompt_tokens_details": {"cached_tokens": 1},
         "completion_tokens_details": {"reasoning_tokens": 2}}


def scripted(name: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A chat upstream answering every request with the script `name`, streamed or whole."""
    deltas, finish, usage = SCRIPTS[name]

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        head = {"id": "chatcmpl-s", "created": 1, "model": "m"}
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": None}
            for delta in deltas:
                for key, value in delta.items():
                    if key == "tool_calls":
                        message.setdefault("tool_calls", []).extend(
                            {k: v for k, v in c.items() if k != "index"} for c in value)
                    elif key != "role":
                        message[key] = (message.get(key) or "") + value
            return web.json_response({
                **head, "object": "chat.completion",
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                **({"usage": USAGE} if usage else {}),
            })
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk = {**head, "object": "chat.completion.chunk"}
        for delta, reason in [*((d, None) for d in deltas), ({}, finish)]:
            choice = {"index": 0, "delta": delta, "finish_reason": reason}
            await response.write(b"data: " + orjson.dumps({**chunk, "choices": [choice]})
                                 + b"\n\n")
        if usage:
            await response.write(
                b"data: " + orjson.dumps({**chunk, "choices": [], "usage": USAGE}) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response

    return chat


@asynccontextmanager
async def scripted_proxy(make_proxy: ProxyFactory, name: str) -> AsyncIterator[Proxy]:
    async with answering("/v1/chat/completions", scripted(name)) as url:
        yield await make_proxy(
            f"upstreams:\n  s: {{kind: openai, url: '{url}/v1'}}\n"
            "models:\n  m: {upstream: s}\n"
        )


async def stream_and_sync(proxy: Proxy, body: dict[str, Any], **kw: Any) -> dict[str, Any]:
    """Both answers to `body` pass the strict checks; returns the stream's final object."""
    status, _, raw = await post_raw(proxy, {**body, "stream": True}, **kw)
    assert status == 200, raw
    final = assert_responses_stream(raw)
    status, _, raw = await post_raw(proxy, body, **kw)
    assert status == 200, raw
    assert_response_types(orjson.loads(raw))
    return final


@pytest.mark.parametrize("name", list(SCRIPTS))
async def test_a_translated_chat_answer_is_strictly_openai_typed_streamed_and_sync(
    make_proxy: ProxyFactory, name: str
) -> None:
    async with scripted_proxy(make_proxy, name) as proxy:
        final = await stream_and_sync(
            proxy, {"model": "m", "input": "hi", "tools": [WEATHER], "metadata": {"k": "v"}})
    finish = SCRIPTS[name][1]
    assert final["status"] == ("incomplete" if finish in ("length", "content_filter")
                               else "completed")


async def test_an_echo_answer_is_strictly_openai_typed_streamed_and_sync(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy("upstreams:\n  e: {kind: echo}\nmodels:\n  echo: {upstream: e}\n")
    await stream_and_sync(proxy, {"model": "echo", "input": "hello there",
                                  "instructions": "Be brief.", "temperature": 0.5})


@pytest.mark.parametrize("mode", ["stream_error_event", "midstream_drop"])
async def test_a_failure_after_the_commit_is_a_strictly_typed_response_failed(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI, mode: str
) -> None:
    fake_openai.mode = mode
    proxy = await make_proxy(
        f"upstreams:\n  f: {{kind: openai, url: '{fake_openai.url}/v1'}}\n"
        "models:\n  m: {upstream: f}\n")
    status, _, raw = await post_raw(proxy, {"model": "m", "input": "one two", "stream": True})
    assert status == 200
    assert assert_responses_stream(raw)["status"] == "failed"


@pytest.mark.parametrize("stream", [False, True], ids=["sync", "stream"])
async def test_an_upstream_error_before_the_commit_is_an_openai_shaped_http_error(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI, stream: bool
) -> None:
    fake_openai.mode = "error500"
    proxy = await make_proxy(
        f"upstreams:\n  f: {{kind: openai, url: '{fake_openai.url}/v1'}}\n"
        "models:\n  m: {upstream: f}\n")
    status, _, raw = await post_raw(proxy, {"model": "m", "input": "x", "stream": stream})
    assert status == 502
    error = orjson.loads(raw)["error"]
    assert error["code"] == "upstream_error" and error["message"]


LETTA_ROUTES = """
upstreams:
  letta: {{kind: letta, url: "{url}"}}
models:
  support:
    upstream: letta
    agent: support-bot
{show}
"""


@pytest.mark.parametrize(("sse", "sync", "show"), [
    ("stream_tokens", "sync_message.response.json", ""),
    ("stream_tokens_think_tool", "sync_message_think_tool.response.json",
     "    show: [reasoning, tools]"),
    ("stream_tokens_tool", "sync_message_tool.response.json", "    show: [tools]"),
    ("stream_tokens_think_tool", "sync_message_think_tool.response.json", ""),
], ids=["text", "reasoning-and-tools-shown", "tools-shown", "hidden"])
async def test_a_letta_answer_is_strictly_openai_typed_streamed_and_sync(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str], monkeypatch: pytest.MonkeyPatch,
    sse: str, sync: str, show: str,
) -> None:
    monkeypatch.setenv(ENV_SECRET, "s" * 16 + "-strict-test")
    state, url = letta
    state.default_conversation_scenario = Scenario(sse=sse, sync=sync)
    state.default_scenario = Scenario(sse=sse, sync=sync)
    proxy = await make_proxy(LETTA_ROUTES.format(url=url, show=show))
    await stream_and_sync(proxy, {"model": "support", "input": "use a tool"})


async def test_a_letta_error_is_a_strictly_typed_response_failed(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENV_SECRET, "s" * 16 + "-strict-test")
    state, url = letta
    state.default_conversation_scenario = Scenario(sse="stream_llm_error")
    proxy = await make_proxy(LETTA_ROUTES.format(url=url, show=""))
    status, _, raw = await post_raw(proxy, {"model": "support", "input": "x", "stream": True})
    assert status == 200
    assert assert_responses_stream(raw)["status"] == "failed"


@pytest.mark.parametrize("api", APIS, ids=API_IDS)
async def test_a_custom_answer_is_strictly_openai_typed_streamed_and_sync(
    api: Any, tmp_path: Path
) -> None:
    async with serve_api(api, tmp_path) as served:
        await stream_and_sync(served.proxy, {"model": api.model, "input": "Hello"},
                              headers={"X-Session-Id": "chat-0"})


async def test_a_custom_upstream_error_event_is_a_strictly_typed_response_failed(
    tmp_path: Path,
) -> None:
    async with serve_api(DIFY, tmp_path) as served:
        served.fake.replies.append(Reply("dify/error_stream.sse"))
        status, _, raw = await post_raw(
            served.proxy, {"model": DIFY.model, "input": "Hello", "stream": True},
            headers={"X-Session-Id": "chat-0"})
    assert status == 200
    failed = assert_responses_stream(raw)
    assert failed["status"] == "failed"
    assert "Rate limit reached" in failed["error"]["message"]


@pytest.mark.parametrize("mode", ["", "stream_error_event", "midstream_drop"],
                         ids=["whole", "error-event", "drop"])
async def test_a_native_relay_keeps_the_framing_and_its_own_end_is_strictly_typed(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI, mode: str
) -> None:
    fake_openai.mode = mode
    proxy = await make_proxy(
        f"upstreams:\n  n: {{kind: openai, url: '{fake_openai.url}/v1', responses: native}}\n"
        "models:\n  coder: {upstream: n}\n")
    status, _, raw = await post_raw(proxy, {"model": "coder", "input": "hi", "stream": True})
    assert status == 200
    parsed = parse_sse(raw)
    assert parsed.done == 1 and parsed.after_done == 0 and raw.endswith(b"data: [DONE]\n\n")
    for n, (name, data) in enumerate(parsed.events):
        assert name == data["type"] and data["sequence_number"] == n, (n, name)
    name, last = parsed.events[-1]
    if mode:
        assert name == "response.failed"
        assert_response_types(last, "the proxy's response.failed")


def test_the_bare_failure_of_an_unencodable_echo_is_strictly_openai_typed() -> None:
    too_deep: Any = 1
    for _ in range(300):
        too_deep = [too_deep]
    writer = ResponsesWriter("resp_deep", "m", 0, {"metadata": {"x": too_deep}})
    parsed = parse_sse(writer.fail(UpstreamFailed("The upstream broke.")))
    assert [data["type"] for _, data in parsed.events] == [
        "response.created", "response.in_progress", "response.failed"]
    for n, (_, data) in enumerate(parsed.events):
        assert_response_types(data, f"event {n}")
