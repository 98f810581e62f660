"""The AI SDK (`ai` with `@ai-sdk/openai`) against the proxy, through the Responses API (its
provider's default) and chat completions: generateText and streamText on echo, openai, Letta
and custom routes, and its tool loop (a call, the SDK runs the tool, the answer) through
the proxy (tests/node/ai-sdk.mjs; skipped without the Node.js clients, tests/node_clients.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import KEY, Proxy, ProxyFactory
from tests.custom_e2e import DIFY, custom_env, serve_api
from tests.fake_letta import FakeLetta
from tests.fake_openai import FakeOpenAI
from tests.node_clients import requires_node, run_node
from tests.test_e2e_responses import routes_for
from tests.test_responses_letta import SECRET
from tests.test_responses_letta import routes as letta_routes

__all__ = ["custom_env"]

pytestmark = requires_node


async def ai_sdk(proxy: Proxy, *steps: dict[str, Any]) -> list[Any]:
    return await run_node("ai-sdk.mjs", proxy.url + "/v1", KEY, list(steps))


def both(api: str, model: str, prompt: str, **step: Any) -> list[dict[str, Any]]:
    """generateText and streamText of one prompt."""
    return [{"op": op, "api": api, "model": model, "prompt": prompt, **step}
            for op in ("generate", "stream")]


@pytest.mark.parametrize("api", ["responses", "chat"])
async def test_the_ai_sdk_generates_and_streams_text_on_an_openai_route(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI, api: str
) -> None:
    proxy = await make_proxy(routes_for(fake_openai))
    for result in await ai_sdk(proxy, *both(api, "mistral", "one two three")):
        assert "error" not in result, result
        assert (result["text"], result["finishReason"]) == ("one two three", "stop")
        usage = result["usage"]
        assert usage["outputTokens"] == 3
        assert usage["totalTokens"] == usage["inputTokens"] + 3 > 3
    assert result["deltas"] == ["one", " two", " three"]
    assert [r.path for r in fake_openai.received] == ["/v1/chat/completions"] * 2


@pytest.mark.parametrize("api", ["responses", "chat"])
async def test_the_ai_sdk_runs_its_tool_loop_through_the_proxy(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI, api: str
) -> None:
    proxy = await make_proxy(routes_for(fake_openai))
    for result in await ai_sdk(proxy, *both(api, "mistral", "weather in Paris?", tool=True)):
        assert "error" not in result, result
        called, answered = result["steps"]
        assert called["finishReason"] == "tool-calls"
        assert called["toolCalls"] == [
            {"id": "call_abc123", "name": "get_weather", "input": {"city": "Paris"}}]
        assert called["toolResults"] == [{"id": "call_abc123", "output": "sunny"}]
        assert answered["finishReason"] == "stop"
        assert result["text"] == "The weather is sunny."
    # Each loop's second request carried the call and the tool's output back, as chat.
    second = fake_openai.received[-1].body
    assert second is not None
    assert second["messages"][1]["tool_calls"][0]["id"] == "call_abc123"
    assert second["messages"][2] == {
        "role": "tool", "tool_call_id": "call_abc123", "content": "sunny"}


async def same_text_as_python(
    proxy: Proxy, model: str, prompt: str, headers: dict[str, str] | None = None
) -> str:
    """The AI SDK's text, generated and streamed through the Responses API, is what
    openai-python reads from the same route; returns it."""
    step = {"headers": headers} if headers else {}
    expected = (await proxy.client().responses.create(
        model=model, input=prompt, extra_headers=headers)).output_text
    assert expected
    for result in await ai_sdk(proxy, *both("responses", model, prompt, **step)):
        assert "error" not in result, result
        assert (result["text"], result["finishReason"]) == (expected, "stop")
    assert "".join(result["deltas"]) == expected
    return expected


async def test_the_ai_sdk_reads_an_echo_route(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    await same_text_as_python(await make_proxy(routes_for(fake_openai)), "echo", "hello there")


async def test_the_ai_sdk_reads_a_letta_route(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTPROXY_ID_SECRET", SECRET)
    _, url = letta
    await same_text_as_python(await make_proxy(letta_routes(url)), "support", "hello")


async def test_the_ai_sdk_reads_a_custom_route(tmp_path: Path) -> None:
    async with serve_api(DIFY, tmp_path) as served:
        text = await same_text_as_python(
            served.proxy, DIFY.model, "Hello", {"X-Session-Id": "ai-sdk-0"})
    assert text == DIFY.text
