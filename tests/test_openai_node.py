"""The official openai-node SDK against the proxy: `responses.create` and `responses.stream`
on echo, openai, Letta and custom routes, function tools both ways, Letta chaining, and the
refusals of stateless routes, as a Node.js client sees them (tests/node/client.mjs; skipped
without the Node.js clients installed, tests/node_clients.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import KEY, Proxy, ProxyFactory
from tests.custom_e2e import DIFY, custom_env, serve_api
from tests.fake_letta import FakeLetta
from tests.fake_openai import FakeOpenAI
from tests.node_clients import requires_node, run_node
from tests.responses_client import CLOCK, WEATHER, comparable, post_raw
from tests.test_e2e_responses import routes_for
from tests.test_responses_letta import SECRET
from tests.test_responses_letta import routes as letta_routes

__all__ = ["custom_env"]

pytestmark = requires_node
CHAT = {"X-Session-Id": "node-0"}


async def node_client(proxy: Proxy, *steps: dict[str, Any], key: str = KEY) -> list[Any]:
    """Runs `steps` (see tests/node/client.mjs) with openai-node against `proxy`."""
    return await run_node("client.mjs", proxy.url + "/v1", key, list(steps))


def create(params: dict[str, Any], **step: Any) -> dict[str, Any]:
    return {"op": "create", "params": params, **step}


def stream(params: dict[str, Any], **step: Any) -> dict[str, Any]:
    return {"op": "stream", "params": params, **step}


def assert_node_stream(result: dict[str, Any]) -> dict[str, Any]:
    """The events openai-node read, in the order and numbering of a Responses stream; its
    accumulated text is the final object's. Returns the final object."""
    assert "error" not in result, result
    types = [t for t, _ in result["events"]]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] in ("response.completed", "response.incomplete")
    assert [n for _, n in result["events"]] == list(range(len(types)))
    final: dict[str, Any] = result["final"]
    assert final["id"].startswith("resp_")
    text = "".join(
        part["text"] for item in final["output"] if item["type"] == "message"
        for part in item["content"] if part["type"] == "output_text"
    )
    assert result["text"] == text
    return final


async def assert_node_agrees_with_python(
    proxy: Proxy, params: dict[str, Any], headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """openai-node's sync answer, its stream's final object and openai-python's sync answer
    are one response (but for ids and times). Returns node's sync answer."""
    step = {"headers": headers} if headers else {}
    made, streamed = await node_client(proxy, create(params, **step), stream(params, **step))
    assert "error" not in made, made
    final = assert_node_stream(streamed)
    status, _, raw = await post_raw(proxy, params, headers=headers)
    assert status == 200
    response: dict[str, Any] = made["response"]
    assert as_sent(response) == as_sent(final) == comparable(orjson.loads(raw))
    return response


def as_sent(response: dict[str, Any]) -> dict[str, Any]:
    """A response openai-node returned, without what the SDK adds to the object it read
    (`output_text`, and the stream helper's `output_parsed` and parts' `parsed`)."""
    out = comparable({k: v for k, v in response.items()
                      if k not in ("output_text", "output_parsed")})
    for item in out["output"]:
        if item["type"] == "message":
            item["content"] = [{k: v for k, v in part.items() if k != "parsed"}
                               for part in item["content"]]
    return out


async def test_openai_node_creates_and_streams_on_an_echo_route(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    proxy = await make_proxy(routes_for(fake_openai))
    response = await assert_node_agrees_with_python(proxy, {"model": "echo", "input": "hi"})
    assert response["status"] == "completed" and response["output"][0]["id"].startswith("msg_")


async def test_openai_node_creates_and_streams_on_an_openai_route(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    proxy = await make_proxy(routes_for(fake_openai))
    response = await assert_node_agrees_with_python(
        proxy, {"model": "mistral", "input": "one two three"})
    assert response["output"][0]["content"][0]["text"] == "one two three"
    assert response["store"] is False


async def test_openai_node_streams_function_calls_and_sends_their_outputs_back(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    proxy = await make_proxy(routes_for(fake_openai))
    asked = {"model": "mistral", "input": "weather in Paris?", "tools": [WEATHER, CLOCK]}
    [called] = await node_client(proxy, stream(asked))
    [call] = assert_node_stream(called)["output"]
    assert call["type"] == "function_call" and call["id"].startswith("fc_")
    assert (call["call_id"], call["name"], call["arguments"]) == (
        "call_abc123", "get_weather", '{"city": "Paris"}')
    types = [t for t, _ in called["events"]]
    assert types.count("response.function_call_arguments.delta") == 2
    # The call and its output go back in `input`, as the SDK's tool loop sends them.
    answered = {"model": "mistral", "tools": [WEATHER, CLOCK], "input": [
        {"role": "user", "content": "weather in Paris?"},
        {"type": "function_call", "call_id": call["call_id"], "name": call["name"],
         "arguments": call["arguments"]},
        {"type": "function_call_output", "call_id": call["call_id"], "output": "sunny"},
    ]}
    [done] = await node_client(proxy, stream(answered))
    assert assert_node_stream(done)["output"][0]["content"][0]["text"] == (
        "The weather is sunny.")
    messages = fake_openai.received[-1].body["messages"]  # type: ignore[index]
    assert messages[1]["tool_calls"][0]["id"] == "call_abc123"
    assert messages[2] == {"role": "tool", "tool_call_id": "call_abc123", "content": "sunny"}


@pytest.mark.parametrize("param", ["previous_response_id", "conversation", "background"])
async def test_openai_node_gets_a_400_naming_state_a_stateless_route_cannot_keep(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI, param: str
) -> None:
    proxy = await make_proxy(routes_for(fake_openai))
    value: Any = {"previous_response_id": "resp_abc", "conversation": "conv_abc",
                  "background": True}[param]
    [refused] = await node_client(proxy, create({"model": "mistral", "input": "hi",
                                                 param: value}))
    assert refused["error"]["status"] == 400
    assert refused["error"]["name"] == "BadRequestError"
    assert refused["error"]["param"] == param
    assert "input" in refused["error"]["message"]
    assert fake_openai.received == []


async def test_openai_node_chains_letta_responses_and_a_forged_id_is_not_found(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTPROXY_ID_SECRET", SECRET)
    state, url = letta
    proxy = await make_proxy(letta_routes(url))
    first, second, forged = await node_client(
        proxy,
        create({"model": "support", "input": "first"}),
        stream({"model": "support", "input": "second"}, previous=0),
        create({"model": "support", "input": "x", "previous_response_id": "resp_forged"}),
    )
    assert first["response"]["store"] is True
    final = assert_node_stream(second)
    assert final["id"] != first["response"]["id"]
    # The continuation forked the first response's conversation: both turns are in it.
    conversation = state.message_posts()[-1].path.split("/")[3]
    assert [m["content"] for m in state.history[conversation]][:1] == ["first"]
    assert forged["error"]["status"] == 400
    assert (forged["error"]["code"], forged["error"]["param"]) == (
        "previous_response_not_found", "previous_response_id")


async def test_openai_node_creates_and_streams_on_a_custom_route(tmp_path: Path) -> None:
    async with serve_api(DIFY, tmp_path) as served:
        response = await assert_node_agrees_with_python(
            served.proxy, {"model": DIFY.model, "input": "Hello"}, CHAT)
    assert response["output"][0]["content"][0]["text"] == DIFY.text
