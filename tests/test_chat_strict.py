"""Every chat completion and chunk the proxy builds itself (echo, letta, custom) validates
strictly against openai-python's own types, with no key the type does not know and the
fields OpenAI always sends present, on the raw SSE and through the SDK."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pydantic
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.conftest import KEY, Proxy, ProxyFactory
from tests.custom_e2e import API_IDS, APIS, Api, custom_env, serve_api
from tests.fake_agents import Reply
from tests.fake_letta import FakeLetta, Scenario
from tests.fake_openai import FakeOpenAI

__all__ = ["custom_env"]

# The proxy's one documented extension to OpenAI's message and delta.
EXTENSIONS = frozenset({"reasoning_content"})
FINISH = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})
HI = [{"role": "user", "content": "Hello"}]


def unknown_keys(model: Any, data: Any, where: str = "") -> list[str]:
    """The keys of `data` that the pydantic `model` parsed from it does not declare."""
    found: list[str] = []
    if isinstance(model, pydantic.BaseModel):
        assert isinstance(data, dict), where
        fields = type(model).model_fields
        dumped = model.model_dump(exclude_unset=True)
        assert set(dumped) == set(data), f"{where}: {set(dumped) ^ set(data)}"
        for key, value in data.items():
            if key not in fields:
                if key not in EXTENSIONS:
                    found.append(f"{where}.{key}")
                continue
            found += unknown_keys(getattr(model, key), value, f"{where}.{key}")
    elif isinstance(model, list):
        for n, (item, value) in enumerate(zip(model, data, strict=True)):
            found += unknown_keys(item, value, f"{where}[{n}]")
    return found


def check_completion(data: dict[str, Any], model: str) -> ChatCompletion:
    completion = ChatCompletion.model_validate(data, strict=True)
    assert unknown_keys(completion, data) == []
    assert data["id"].startswith("chatcmpl-")
    assert data["object"] == "chat.completion"
    assert isinstance(data["created"], int)
    assert data["model"] == model
    usage = data["usage"]
    assert {"prompt_tokens", "completion_tokens", "total_tokens"} <= set(usage)
    for n, choice in enumerate(data["choices"]):
        assert choice["index"] == n
        assert choice["finish_reason"] in FINISH
        assert "logprobs" in choice and choice["logprobs"] is None
        message = choice["message"]
        assert message["role"] == "assistant"
        if message.get("tool_calls"):
            assert message["content"] is None
        else:
            assert isinstance(message["content"], str)
    return completion


def check_chunks(
    events: list[Any], model: str, include_usage: bool, *, relayed: bool = False
) -> None:
    """The data events of one stream, `[DONE]` last: each a valid chunk or the error end.
    A `relayed` stream may have its upstream's finish chunk before the proxy's error end
    (the upstream finished, then never ended its stream)."""
    assert events and events[-1] == "[DONE]"
    events = events[:-1]
    error = None
    if events and "error" in events[-1]:
        error = events.pop()
        assert set(error) == {"error"}
        assert set(error["error"]) == {"message", "type", "param", "code"}
        assert isinstance(error["error"]["message"], str) and error["error"]["message"]
    ids = {e["id"] for e in events}
    created = {e["created"] for e in events}
    assert len(ids) <= 1 and len(created) <= 1, (ids, created)
    finishes = 0
    calls_seen: set[int] = set()
    for n, data in enumerate(events):
        assert "error" not in data
        chunk = ChatCompletionChunk.model_validate(data, strict=True)
        assert unknown_keys(chunk, data) == [], data
        assert data["id"].startswith("chatcmpl-")
        assert data["object"] == "chat.completion.chunk"
        assert data["model"] == model
        if not data["choices"]:
            # The usage chunk: only when asked for, and last.
            assert include_usage and n == len(events) - 1, data
            usage = data["usage"]
            assert {"prompt_tokens", "completion_tokens", "total_tokens"} <= set(usage)
            continue
        assert data.get("usage") is None, data
        for index, choice in enumerate(data["choices"]):
            assert choice["index"] == index
            if not relayed:
                # The chunks the proxy makes carry it as OpenAI's do; relayed ones are as sent.
                assert "logprobs" in choice and choice["logprobs"] is None, data
            delta = choice["delta"]
            assert ("role" in delta) == (n == 0), data
            if "role" in delta:
                assert delta["role"] == "assistant"
            for call in delta.get("tool_calls") or ():
                assert isinstance(call.get("index"), int)
                if call["index"] not in calls_seen:
                    calls_seen.add(call["index"])
                    assert call.get("id") and call.get("type") == "function"
                    assert call["function"].get("name")
            if choice["finish_reason"] is not None:
                assert choice["finish_reason"] in FINISH
                finishes += 1
    assert finishes == (0 if error and not relayed else 1) or (relayed and finishes == 0), events
    if error is None:
        assert (events[-1]["choices"] == []) == include_usage


async def raw_stream(
    url: str, body: dict[str, Any], headers: dict[str, str], comments: list[str] | None = None
) -> list[Any]:
    """The data events of a stream, after checking every line of the raw SSE; its comment
    blocks go to `comments`."""
    async with aiohttp.ClientSession() as http, http.post(
        url + "/v1/chat/completions", json=body,
        headers={"Authorization": f"Bearer {KEY}", **headers},
    ) as resp:
        assert resp.status == 200, await resp.text()
        raw = await resp.read()
    assert raw.endswith(b"\n\ndata: [DONE]\n\n") or raw == b"data: [DONE]\n\n", raw[-200:]
    events: list[Any] = []
    for block in raw.decode().split("\n\n")[:-1]:
        lines = block.split("\n")
        assert block and all(line.startswith(("data: ", ":")) for line in lines), block
        data = [line[6:] for line in lines if line.startswith("data: ")]
        assert len(data) <= 1, block
        if not data and comments is not None:
            comments.append(block)
        if data:
            events.append(data[0] if data[0] == "[DONE]" else orjson.loads(data[0]))
    return events


async def check_all(
    url: str, client: Any, model: str, headers: dict[str, str] | None = None,
    *, error: bool = False, sync: bool = True,
) -> None:
    """Sync and streamed (with and without usage), raw and through the SDK."""
    headers = headers or {}
    body: dict[str, Any] = {"model": model, "messages": HI}
    if sync and not error:
        async with aiohttp.ClientSession() as http, http.post(
            url + "/v1/chat/completions", json=body,
            headers={"Authorization": f"Bearer {KEY}", **headers},
        ) as resp:
            assert resp.status == 200, await resp.text()
            check_completion(orjson.loads(await resp.read()), model)
        answer = await client.chat.completions.create(
            model=model, messages=HI, extra_headers=headers
        )
        assert answer.choices[0].message.role == "assistant"
    elif sync:
        async with aiohttp.ClientSession() as http, http.post(
            url + "/v1/chat/completions", json=body,
            headers={"Authorization": f"Bearer {KEY}", **headers},
        ) as resp:
            assert resp.status == 502, await resp.text()
            failed = orjson.loads(await resp.read())
        assert set(failed) == {"error"}
        assert set(failed["error"]) == {"message", "type", "param", "code"}
        assert failed["error"]["code"] == "upstream_error"
    for include_usage in (False, True):
        streamed = {**body, "stream": True}
        if include_usage:
            streamed["stream_options"] = {"include_usage": True}
        comments: list[str] = []
        events = await raw_stream(url, streamed, headers, comments)
        assert set(comments) <= {": keep-alive"}, comments
        check_chunks(events, model, include_usage)
        assert ("error" in events[-2]) == error if len(events) > 1 else error
        chunks = []
        stream = await client.chat.completions.create(
            model=model, messages=HI, stream=True, extra_headers=headers,
            stream_options={"include_usage": include_usage},
        )
        try:
            async for chunk in stream:
                chunks.append(chunk)
        except Exception:
            assert error
        assert chunks


async def test_echo_answers_are_strict_openai_objects(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(
        "upstreams:\n  echo: {kind: echo}\nmodels:\n  parrot: {upstream: echo}\n"
    )
    await check_all(proxy.url, proxy.client(), "parrot")


async def test_echo_stream_chunks_carry_null_logprobs_in_openai_order(
    make_proxy: ProxyFactory,
) -> None:
    """Every choice of every chunk has `"logprobs":null` between delta and finish_reason,
    as OpenAI sends it, on the raw bytes."""
    proxy = await make_proxy(
        "upstreams:\n  echo: {kind: echo}\nmodels:\n  parrot: {upstream: echo}\n"
    )
    body = {"model": "parrot", "stream": True, "messages": [
        {"role": "user", "content": "Hello there, world"}
    ]}
    async with aiohttp.ClientSession() as http, http.post(
        proxy.url + "/v1/chat/completions", json=body,
        headers={"Authorization": f"Bearer {KEY}"},
    ) as resp:
        assert resp.status == 200, await resp.text()
        raw = await resp.read()
    events = [
        line[6:] for line in raw.split(b"\n") if line.startswith(b"data: ")
    ]
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(event) for event in events[:-1]]
    assert len(chunks) == 5  # role, three words, finish
    for event, chunk in zip(events, chunks, strict=False):
        (choice,) = chunk["choices"]
        assert list(choice) == ["index", "delta", "logprobs", "finish_reason"], event
        assert choice["logprobs"] is None
        assert b',"logprobs":null,"finish_reason":' in event


def letta_routes(url: str, show: str) -> str:
    return (
        f"upstreams:\n  letta: {{kind: letta, url: '{url}'}}\n"
        f"models:\n  support: {{upstream: letta, agent: support-bot, show: {show}}}\n"
    )


def _event(payload: dict[str, Any], name: str | None = None) -> str:
    head = f"event: {name}\n" if name else ""
    return head + "data: " + orjson.dumps(payload).decode() + "\n\n"


RUN = "run-4dae6558-db20-460d-8171-c713f5bb0d62"
PING = _event({"message_type": "ping", "run_id": RUN})
APPROVAL = PING + "".join([
    _event({"message_type": "assistant_message", "otid": "a", "content": "Let me check."}),
    _event({"message_type": "approval_request_message", "otid": "b",
            "tool_call": {"name": "delete_all", "arguments": "{}", "tool_call_id": "c9"}}),
    _event({"message_type": "stop_reason", "stop_reason": "requires_approval"}),
    _event({"message_type": "usage_statistics", "prompt_tokens": 5, "completion_tokens": 2,
            "total_tokens": 7}),
    "data: [DONE]\n\n",
])
ERROR_MIDWAY = PING + "".join([
    _event({"message_type": "assistant_message", "otid": "a", "content": "Half an ans"}),
    _event({"message_type": "stop_reason", "stop_reason": "llm_api_error"}),
    _event({"message_type": "error_message", "run_id": RUN, "error_type": "llm_error",
            "message": "An error occurred with the LLM request."}, "error"),
])

LETTA_CASES = [
    ("stream_tokens", "[]", False),
    ("stream_steps", "[reasoning, tools]", False),
    ("stream_slow_keepalive", "[reasoning, tools]", False),
    ("stream_via_messages_streaming_true", "[reasoning, tools]", False),
    ("stream_tokens_tool_filtered_assistant_only", "[tools]", False),
    ("conversation_stream", "[reasoning, tools]", False),
    ("stream_tokens_think_tool", "[]", False),
    ("stream_tokens_think_tool", "[reasoning]", False),
    ("stream_tokens_think_tool", "[reasoning, tools]", False),
    ("stream_tokens_tool", "[tools]", False),
    (APPROVAL, "[tools]", False),
    (APPROVAL, "[]", False),
    ("stream_llm_error", "[reasoning, tools]", True),
    (ERROR_MIDWAY, "[reasoning]", True),
]


@pytest.mark.parametrize(("sse", "show", "error"), LETTA_CASES)
async def test_letta_answers_are_strict_openai_objects(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str], tmp_path: Path,
    sse: str, show: str, error: bool,
) -> None:
    state, url = letta
    if sse.startswith("data:"):
        # A written stream: an absolute path is read as it is.
        path = tmp_path / "written.sse"
        path.write_text(sse)
        sse = str(path)
    state.default_scenario = Scenario(sse=sse)
    proxy: Proxy = await make_proxy(letta_routes(url, show))
    await check_all(proxy.url, proxy.client(), "support", error=error)


@pytest.mark.parametrize("api", APIS, ids=API_IDS)
async def test_custom_answers_are_strict_openai_objects(api: Api, tmp_path: Path) -> None:
    async with serve_api(api, tmp_path) as served:
        await check_all(
            served.proxy.url, served.client(), api.model, {"X-Session-Id": "chat-0"}
        )


CUSTOM_ERRORS = [
    (APIS[0], "dify/error_stream.sse"),
    (APIS[1], "flowise/error_llm_500_stream.response.sse"),
    (APIS[2], "langflow/error_llm_500_stream.response.ndjson"),
    (APIS[3], "n8n/error_stream.ndjson"),
    (APIS[4], "langgraph/error_llm_500_thread_runs_stream.response.sse"),
]


@pytest.mark.parametrize(("api", "name"), CUSTOM_ERRORS, ids=API_IDS)
async def test_custom_error_streams_are_strict_openai_objects(
    api: Api, name: str, tmp_path: Path
) -> None:
    async with serve_api(api, tmp_path, route_keys={"show": ["reasoning"]}) as served:
        served.fake.replies.extend(Reply(name) for _ in range(5))
        await check_all(served.proxy.url, served.client(), api.model,
                        {"X-Session-Id": "chat-0"}, error=True)


@pytest.mark.parametrize("api", APIS, ids=API_IDS)
async def test_custom_answers_with_reasoning_shown_are_strict(api: Api, tmp_path: Path) -> None:
    async with serve_api(api, tmp_path, route_keys={"show": ["reasoning"]}) as served:
        await check_all(
            served.proxy.url, served.client(), api.model, {"X-Session-Id": "chat-0"}
        )


OTHER_STREAMS = [
    (APIS[0], "dify/agent_stream.sse"),
    (APIS[1], "flowise/prediction_stream_streaming_false.response.json"),
    (APIS[2], "langflow/agent_run_stream.response.ndjson"),
    (APIS[3], "n8n/last_node.response.json"),
    (APIS[3], "n8n/stream_text_chunk.ndjson"),
    (APIS[4], "langgraph/thread_runs_stream_tool_call_multi_mode.response.sse"),
]


@pytest.mark.parametrize(("api", "name"), OTHER_STREAMS, ids=[n for _, n in OTHER_STREAMS])
async def test_custom_other_streams_are_strict_openai_objects(
    api: Api, name: str, tmp_path: Path
) -> None:
    async with serve_api(api, tmp_path, route_keys={"show": ["reasoning"]}) as served:
        served.fake.replies.extend(Reply(name) for _ in range(4))
        await check_all(served.proxy.url, served.client(), api.model,
                        {"X-Session-Id": "chat-0"}, sync=False)


@pytest.mark.parametrize(
    "mode", ["no_done", "no_finish", "midstream_drop", "stream_error_event", "silence_mid_stream"]
)
async def test_openai_kind_additions_are_well_formed(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI, mode: str
) -> None:
    """The relayed chunks are the upstream's; the proxy's error end and keep-alives are
    checked with them (the fake's chunks are valid, and its model is the client's)."""
    fake_openai.mode = mode
    fake_openai.delay = 0.3
    proxy = await make_proxy(
        f"upstreams:\n  vllm: {{kind: openai, url: '{fake_openai.url}/v1', keepalive: 0.05}}\n"
        "models:\n  mistral: {upstream: vllm}\n"
    )
    body = {"model": "mistral", "stream": True, "messages": HI}
    comments: list[str] = []
    events = await raw_stream(proxy.url, body, {}, comments)
    check_chunks(events, "mistral", False, relayed=True)
    assert ("error" in events[-2]) == (mode != "silence_mid_stream")
    assert set(comments) <= {": keep-alive"}
    assert comments or mode != "silence_mid_stream"
