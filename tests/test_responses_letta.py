"""The Responses API on Letta routes: real chaining through Letta conversations, no database.

A response id is signed over (model, Letta conversation, key fingerprint, time); continuing
from it forks that conversation, so every id is a fixed branch point. The fake Letta keeps
each conversation's messages and copies them on a fork, so branches can be told apart.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.response_ids import ENV_SECRET
from tests.conftest import KEY, Proxy, ProxyFactory, wait_for
from tests.fake_letta import FakeLetta, Scenario
from tests.processes import ROOT, serve_process
from tests.responses_assert import assert_responses_stream, output_text
from tests.responses_client import comparable, post_raw, stream_final

AGENT = "agent-ef37cb35-73b3-4511-b1bb-1c9635553e28"
OTHER_KEY = "sk-other-0000000000000000"
SECRET = "s" * 16 + "-responses-test"
ECHO = "Echo: hello from alice thread"


def routes(url: str, model_extra: str = "") -> str:
    return f"""
upstreams:
  letta: {{kind: letta, url: "{url}"}}
models:
  support:
    upstream: letta
    agent: support-bot
{model_extra}
  "letta/*":
    upstream: letta
"""


@pytest.fixture(autouse=True)
def id_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_SECRET, SECRET)


async def make(make_proxy: ProxyFactory, url: str, model_extra: str = "") -> Proxy:
    return await make_proxy(routes(url, model_extra), keys=(KEY, OTHER_KEY))


def conversation_of(state: FakeLetta) -> str:
    """The conversation the last message went to."""
    path = state.message_posts()[-1].path
    assert path.startswith("/v1/conversations/conv-"), path
    return path.split("/")[3]


def user_texts(messages: list[Any]) -> list[str]:
    return [m["content"] for m in messages]


async def test_a_response_runs_in_a_new_conversation_and_its_id_can_continue_it(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    state, url = letta
    client = (await make(make_proxy, url)).client()
    reply = await client.responses.create(model="support", input="first")
    assert reply.output_text == ECHO
    assert reply.store is True and reply.id.startswith("resp_")
    created = state.requests_to("POST", "/v1/conversations/")
    assert len(created) == 1 and created[0].query == {"agent_id": AGENT}
    first = conversation_of(state)
    assert state.history[first] == [{"role": "user", "content": "first"}]
    # Nothing went to the agent's default thread, which no id could name.
    assert state.requests_to("POST", f"/v1/agents/{AGENT}/messages") == []
    await client.responses.create(model="support", input="second")
    assert conversation_of(state) != first, "each new response starts its own conversation"


@pytest.mark.parametrize("stream", [False, True], ids=["sync", "stream"])
async def test_two_continuations_of_one_id_are_two_branches(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str], stream: bool
) -> None:
    state, url = letta
    proxy = await make(make_proxy, url)

    async def ask(text: str, previous: str | None = None) -> str:
        body: dict[str, Any] = {"model": "support", "input": text}
        if previous is not None:
            body["previous_response_id"] = previous
        if stream:
            final, _ = await stream_final(proxy, body)
        else:
            status, _, raw = await post_raw(proxy, body)
            assert status == 200, raw
            final = orjson.loads(raw)
        assert output_text(final) == ECHO
        assert final["previous_response_id"] == previous
        return str(final["id"])

    root = await ask("first")
    root_conv = conversation_of(state)
    left = await ask("left", root)
    left_conv = conversation_of(state)
    right = await ask("right", root)
    right_conv = conversation_of(state)
    assert len({root_conv, left_conv, right_conv}) == 3
    assert len(state.requests_to("POST", f"/v1/conversations/{root_conv}/fork")) == 2
    assert user_texts(state.history[root_conv]) == ["first"], "the branch point never changes"
    assert user_texts(state.history[left_conv]) == ["first", "left"]
    assert user_texts(state.history[right_conv]) == ["first", "right"]
    # Only the new turn goes to Letta.
    assert state.message_posts()[-1].json["messages"] == [{"role": "user", "content": "right"}]
    deeper = await ask("deeper", left)
    assert user_texts(state.history[conversation_of(state)]) == ["first", "left", "deeper"]
    assert deeper not in (root, left, right)


async def test_sdk_stream_on_a_letta_route_continues_a_chain(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    state, url = letta
    client = (await make(make_proxy, url)).client()
    async with client.responses.stream(model="support", input="first") as stream:
        first = await stream.get_final_response()
    async with client.responses.stream(
        model="support", input="next", previous_response_id=first.id
    ) as stream:
        second = await stream.get_final_response()
    assert second.output_text == ECHO and second.previous_response_id == first.id
    assert user_texts(state.history[conversation_of(state)]) == ["first", "next"]


def tampered(token: str) -> str:
    i = len(token) // 2
    return token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1:]


BAD_IDS = [
    pytest.param(lambda t: tampered(t), KEY, "support", id="tampered"),
    pytest.param(lambda t: t, OTHER_KEY, "support", id="another-key"),
    pytest.param(lambda t: t, KEY, "letta/support-bot", id="another-model"),
    pytest.param(lambda t: "resp_garbage", KEY, "support", id="garbage"),
    pytest.param(lambda t: t + "x", KEY, "support", id="appended"),
]


@pytest.mark.parametrize(("bad", "key", "model"), BAD_IDS)
@pytest.mark.parametrize("stream", [False, True], ids=["sync", "stream"])
async def test_a_bad_previous_response_id_is_refused_before_any_upstream_call(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str], bad: Any, key: str, model: str,
    stream: bool,
) -> None:
    state, url = letta
    proxy = await make(make_proxy, url)
    reply = await proxy.client().responses.create(model="support", input="first")
    seen = len(state.requests)
    status, _, raw = await post_raw(proxy, {
        "model": model, "input": "next", "stream": stream,
        "previous_response_id": bad(reply.id),
    }, key=key)
    assert status == 400
    error = orjson.loads(raw)["error"]
    assert (error["code"], error["param"]) == (
        "previous_response_not_found", "previous_response_id")
    assert len(state.requests) == seen, "the upstream saw the request"


async def test_a_restarted_proxy_with_the_same_secret_continues_and_another_secret_does_not(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    state, url = letta
    first = await (await make(make_proxy, url)).client().responses.create(
        model="support", input="before the restart")
    restarted = await make(make_proxy, url)
    reply = await restarted.client().responses.create(
        model="support", input="after", previous_response_id=first.id)
    assert reply.output_text == ECHO
    assert user_texts(state.history[conversation_of(state)]) == ["before the restart", "after"]
    monkeypatch.setenv(ENV_SECRET, "o" * 16 + "-another-secret")
    other = await make(make_proxy, url)
    seen = len(state.requests)
    status, _, raw = await post_raw(
        other, {"model": "support", "input": "x", "previous_response_id": first.id})
    assert status == 400 and b"previous_response_not_found" in raw
    assert len(state.requests) == seen


async def test_a_conversation_gone_from_letta_is_previous_response_not_found(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    state, url = letta
    proxy = await make(make_proxy, url)
    first = await proxy.client().responses.create(model="support", input="first")
    state.conversations.clear()
    status, _, raw = await post_raw(
        proxy, {"model": "support", "input": "x", "previous_response_id": first.id})
    assert status == 400 and b"previous_response_not_found" in raw
    assert len(state.message_posts()) == 1


async def test_a_session_hint_selects_the_conversation_and_the_id_continues_it(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    state, url = letta
    client = (await make(make_proxy, url)).client()
    hint = {"X-Session-Id": "chat-7"}
    first = await client.responses.create(model="support", input="a", extra_headers=hint)
    hinted = conversation_of(state)
    await client.responses.create(model="support", input="b", extra_headers=hint)
    assert conversation_of(state) == hinted
    await client.responses.create(
        model="support", input="c", previous_response_id=first.id, extra_headers=hint)
    assert conversation_of(state) != hinted
    assert len(state.requests_to("POST", f"/v1/conversations/{hinted}/fork")) == 1


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"conversation": "conv_1"}, "conversation"), ({"background": True}, "background")],
)
async def test_letta_routes_still_refuse_conversation_and_background(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str], extra: dict[str, Any], param: str
) -> None:
    state, url = letta
    proxy = await make(make_proxy, url)
    status, _, raw = await post_raw(proxy, {"model": "support", "input": "x", **extra})
    assert status == 400 and orjson.loads(raw)["error"]["param"] == param
    assert state.requests == []


INPUT_THE_AGENT_CANNOT_TAKE = [
    pytest.param(
        {"instructions": "Be brief.", "input": [
            {"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}]},
        "input[0].content[0].type", id="file-after-instructions"),
    pytest.param(
        {"input": [{"role": "user", "content": [
            {"type": "input_text", "text": "what is this?"},
            {"type": "input_image", "image_url": "ftp://x/y.png"}]}]},
        "input[0].content[1].image_url", id="image-not-http"),
    pytest.param(
        {"instructions": "Be brief.", "input": [
            {"role": "user", "content": "a"},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": [
                {"type": "input_text", "text": "and this?"},
                {"type": "input_image", "image_url": "data:text/plain;base64,aGk="}]}]},
        "input[3].content[1].image_url", id="image-of-a-later-turn"),
    pytest.param(
        {"input": [
            {"role": "user", "content": "weather?"},
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c", "output": "18C"}]},
        "input", id="ends-with-a-tool-output"),
    pytest.param(
        {"input": [
            {"role": "user", "content": "chart?"},
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c", "output": [
                {"type": "input_text", "text": "here:"},
                {"type": "input_image", "image_url": "ftp://x/y.png"}]}]},
        "input[2].output[1].image_url", id="image-in-a-tool-output"),
    pytest.param(
        {"input": [
            {"role": "user", "content": "charts?"},
            {"type": "function_call", "call_id": "a", "name": "f", "arguments": "{}"},
            {"type": "function_call", "call_id": "b", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "a", "output": [
                {"type": "input_image", "image_url": "https://x/a.png"}]},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "function_call_output", "call_id": "b", "output": [
                {"type": "input_text", "text": "and:"},
                {"type": "input_file", "file_id": "file-1"}]}]},
        "input[5].output[1].type", id="file-in-a-later-tool-output"),
]


@pytest.mark.parametrize(("body", "param"), INPUT_THE_AGENT_CANNOT_TAKE)
@pytest.mark.parametrize("stream", [False, True], ids=["sync", "stream"])
async def test_input_a_letta_agent_cannot_take_is_a_400_naming_the_input_the_client_sent(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str], body: dict[str, Any], param: str,
    stream: bool,
) -> None:
    state, url = letta
    proxy = await make(make_proxy, url)
    status, _, raw = await post_raw(proxy, {"model": "support", "stream": stream, **body})
    assert status == 400, raw
    error = orjson.loads(raw)["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    # Worded in neither API's field names: the client sent input_file, never a `file` part.
    assert "'file'" not in error["message"] and "messages" not in error["message"]
    assert state.message_posts() == []


@pytest.mark.parametrize(
    ("show", "items"),
    # The capture has text, then a tool call and its return, then more text; shown, the tool
    # is summarised as reasoning (a `reasoning` item), never a function_call item.
    [("", ["message"]), ("    show: [reasoning]", ["message"]),
     ("    show: [reasoning, tools]", ["message", "reasoning", "message"])],
    ids=["hidden", "reasoning", "reasoning-and-tools"],
)
async def test_agent_tool_calls_never_become_function_calls_and_reasoning_follows_show(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str], show: str, items: list[str]
) -> None:
    state, url = letta
    state.default_conversation_scenario = Scenario(sse="stream_tokens_think_tool")
    proxy = await make(make_proxy, url, show)
    final, _ = await stream_final(proxy, {"model": "support", "input": "use a tool"})
    assert [o["type"] for o in final["output"]] == items
    status, _, raw = await post_raw(proxy, {"model": "support", "input": "use a tool"})
    assert status == 200
    assert [o["type"] for o in orjson.loads(raw)["output"]] == items


async def test_a_letta_sync_answer_equals_the_streams_final_object(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    state, url = letta
    state.default_conversation_scenario = Scenario(sse="stream_tokens_think_tool")
    proxy = await make(make_proxy, url, "    show: [reasoning, tools]")
    body = {"model": "support", "input": "use a tool", "instructions": "Be brief."}
    final, _ = await stream_final(proxy, body)
    status, _, raw = await post_raw(proxy, body)
    assert status == 200
    # Text, tool summary, text: the order the stream had, not one message rebuilt from it.
    assert comparable(orjson.loads(raw)) == comparable(final)


async def test_a_letta_error_mid_stream_is_response_failed(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    state, url = letta
    state.default_conversation_scenario = Scenario(sse="stream_llm_error")
    proxy = await make(make_proxy, url)
    status, _, raw = await post_raw(proxy, {"model": "support", "input": "x", "stream": True})
    assert status == 200
    final = assert_responses_stream(raw)
    assert final["status"] == "failed" and "Letta" in final["error"]["message"]


@pytest.mark.parametrize("stream", [False, True], ids=["sync", "stream"])
async def test_a_letta_turn_answered_with_a_web_page_is_a_502_upstream_error(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str], stream: bool
) -> None:
    state, url = letta
    state.default_conversation_scenario = Scenario(page="<html>Sign in to continue</html>")
    proxy = await make(make_proxy, url)
    status, _, raw = await post_raw(proxy, {"model": "support", "input": "x", "stream": stream})
    assert status == 502
    error = orjson.loads(raw)["error"]
    assert error["code"] == "upstream_error" and "without an event stream" in error["message"]


async def test_responses_client_leaving_cancels_the_letta_run(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    state, url = letta
    held = Scenario(sse="conversation_stream", hold_after=2)
    state.scenarios.append(held)
    proxy = await make(make_proxy, url)
    async with aiohttp.ClientSession() as http:
        resp = await http.post(
            proxy.url + "/v1/responses", json={"model": "support", "input": "x", "stream": True},
            headers={"Authorization": f"Bearer {KEY}"},
        )
        await resp.content.readline()
        await held.held.wait()
        resp.close()
    await wait_for(lambda: "run-65dac7f6-d84a-47d2-afb5-d9061bfa2f78" in state.cancelled_run_ids)


# -- one secret for every worker -------------------------------------------------------------


async def test_workers_without_a_secret_share_one_made_at_start(
    tmp_path: Path, letta: tuple[FakeLetta, str]
) -> None:
    _, url = letta
    path = tmp_path / "routes.yaml"
    path.write_text(routes(url))
    port = _free_port()
    async with serve_process(path, port=port, workers=2) as served:
        async def post(body: dict[str, Any]) -> dict[str, Any]:
            # A session of its own each time: a new connection, which either worker may take.
            async with aiohttp.ClientSession() as http, http.post(
                served.url + "/v1/responses", json=body,
                headers={"Authorization": f"Bearer {KEY}"},
            ) as resp:
                assert resp.status == 200, await resp.text()
                answer: dict[str, Any] = await resp.json()
                return answer

        first = await post({"model": "support", "input": "first"})
        for _ in range(12):
            await post({"model": "support", "input": "n", "previous_response_id": first["id"]})
        pids = {line.split("pid ")[1].rstrip(")") for line in served.output().splitlines()
                if "listening on" in line}
        assert len(pids) == 2
        assert served.output().count(f"{ENV_SECRET} is not set") == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_refuses_an_unusable_secret(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text("upstreams:\n  demo: {kind: echo}\nmodels:\n  echo: {upstream: demo}\n")
    env = {"PATH": "/usr/bin:/bin", ENV_SECRET: "short", "AGENTPROXY_API_KEYS": KEY}
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--routes", str(path), "--port", "0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 1
    assert f"{ENV_SECRET}: the secret of key id '0' is shorter than" in done.stderr
