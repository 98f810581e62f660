"""End to end: the official OpenAI SDK -> agentproxy -> a fake OpenAI-compatible upstream."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from tests.conftest import (
    KEY,
    Proxy,
    ProxyFactory,
    answering,
    closed_port,
    stepped_stream,
    wait_for,
)
from tests.fake_openai import FakeOpenAI
from tests.raw_http import connect

WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def routes_for(fake: FakeOpenAI, extra: str = "") -> str:
    return f"""
upstreams:
  fake:
    kind: openai
    url: {fake.url}/v1
    api_key: upstream-secret
    headers:
      X-Extra: configured
    forward_headers: [X-Session-Id]
  demo:
    kind: echo
models:
  mistral:
    upstream: fake
    model: mistralai/Mistral-7B-Instruct-v0.2
  "local/*":
    upstream: fake
  echo:
    upstream: demo
{extra}
"""


@pytest.fixture
async def proxy(make_proxy: ProxyFactory, fake_openai: FakeOpenAI) -> Proxy:
    """The proxy with the routes of `routes_for`, as most tests here need it."""
    return await make_proxy(routes_for(fake_openai))


async def test_models_list_in_file_order_with_wildcard_expansion(proxy: Proxy) -> None:
    models = await proxy.client().models.list()
    ids = [m.id for m in models.data]
    assert ids == ["mistral", "local/llama-3-8b", "local/qwen-2.5", "echo"]
    assert all(m.object == "model" and m.created > 0 and m.owned_by for m in models.data)


async def test_an_upstream_model_with_an_empty_id_is_not_listed(
    proxy: Proxy, fake_openai: FakeOpenAI
) -> None:
    fake_openai.models = ["", "qwen-2.5"]
    ids = [m.id for m in (await proxy.client().models.list()).data]
    assert ids == ["mistral", "local/qwen-2.5", "echo"]


async def test_model_retrieve_accepts_ids_with_slash(proxy: Proxy) -> None:
    model = await proxy.client().models.retrieve("local/qwen-2.5")
    assert model.id == "local/qwen-2.5"
    with pytest.raises(openai.NotFoundError):
        await proxy.client().models.retrieve("local/nope")


async def test_sync_chat_rewrites_model_and_injects_upstream_key(
    proxy: Proxy, fake_openai: FakeOpenAI
) -> None:
    reply = await proxy.client().chat.completions.create(
        model="mistral",
        messages=[{"role": "user", "content": "hello there"}],
        extra_headers={"X-Session-Id": "s-1", "X-Not-Forwarded": "x"},
    )
    assert reply.choices[0].message.content == "hello there"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.total_tokens == 13
    seen = fake_openai.received[-1]
    assert seen.body is not None
    assert seen.body["model"] == "mistralai/Mistral-7B-Instruct-v0.2"
    assert seen.headers["Authorization"] == "Bearer upstream-secret"
    assert KEY not in str(seen.headers)
    assert seen.headers["X-Extra"] == "configured"
    assert seen.headers["X-Session-Id"] == "s-1"
    assert "X-Not-Forwarded" not in seen.headers


async def test_stream_chat_delivers_every_chunk_then_done(proxy: Proxy) -> None:
    stream = await proxy.client().chat.completions.create(
        model="mistral", messages=[{"role": "user", "content": "one two three"}], stream=True
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)
    assert len({c.id for c in chunks}) == 1


async def test_stream_include_usage_adds_a_final_usage_chunk(proxy: Proxy) -> None:
    stream = await proxy.client().chat.completions.create(
        model="mistral",
        messages=[{"role": "user", "content": "a b"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2
    assert chunks[-2].choices[0].finish_reason == "stop"


async def test_tool_call_round_trip_sync(proxy: Proxy, fake_openai: FakeOpenAI) -> None:
    client = proxy.client()
    messages: list[Any] = [{"role": "user", "content": "weather in Paris?"}]
    first = await client.chat.completions.create(
        model="mistral", messages=messages, tools=[WEATHER_TOOL]
    )
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert first.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert call.function.arguments == '{"city": "Paris"}'  # type: ignore[union-attr]
    messages += [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    second = await client.chat.completions.create(
        model="mistral", messages=messages, tools=[WEATHER_TOOL]
    )
    assert second.choices[0].message.content == "The weather is sunny."
    sent = fake_openai.received[-1].body
    assert sent is not None
    assert sent["messages"][-1] == {"role": "tool", "tool_call_id": "call_abc123",
                                    "content": "sunny"}
    assert sent["messages"][-2]["tool_calls"][0]["id"] == "call_abc123"


async def test_tool_call_round_trip_stream_keeps_tool_call_deltas_intact(proxy: Proxy) -> None:
    client = proxy.client()
    stream = await client.chat.completions.create(
        model="mistral",
        messages=[{"role": "user", "content": "weather?"}],
        tools=[WEATHER_TOOL],
        stream=True,
    )
    chunks = [c async for c in stream]
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert [d.index for d in deltas] == [0, 0, 0]
    assert deltas[0].id == "call_abc123" and deltas[0].function.name == "get_weather"  # type: ignore[union-attr]
    assert "".join(d.function.arguments or "" for d in deltas) == '{"city": "Paris"}'  # type: ignore[union-attr]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    final = await client.chat.completions.create(
        model="mistral",
        messages=[
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "tool_calls": [{"id": "call_abc123", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_abc123", "content": "rainy"},
        ],
        tools=[WEATHER_TOOL],
        stream=True,
    )
    text = "".join([c.choices[0].delta.content or "" async for c in final if c.choices])
    assert text == "The weather is rainy."


async def test_wildcard_route_forwards_the_upstream_model_id(
    proxy: Proxy, fake_openai: FakeOpenAI
) -> None:
    client = proxy.client()
    await client.chat.completions.create(
        model="local/qwen-2.5", messages=[{"role": "user", "content": "hi"}]
    )
    assert fake_openai.received[-1].body["model"] == "qwen-2.5"  # type: ignore[index]


async def test_upstream_400_keeps_status_and_openai_error_fields(
    proxy: Proxy, fake_openai: FakeOpenAI
) -> None:
    client = proxy.client()
    fake_openai.mode = "error400"
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(
                model="mistral", messages=[{"role": "user", "content": "x"}], stream=stream
            )
        assert info.value.code == "context_length_exceeded"
        assert info.value.param == "messages"
        assert "maximum context length" in info.value.message


async def test_upstream_down_is_502_upstream_unavailable(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(f"""
upstreams:
  gone: {{kind: openai, url: "http://127.0.0.1:{closed_port()}/v1"}}
models:
  m: {{upstream: gone}}
""")
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as info:
            await proxy.client().chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}], stream=stream
            )
        assert info.value.status_code == 502
        assert info.value.code == "upstream_unavailable"
        assert "gone" in info.value.message


async def test_upstream_list_falls_over_to_the_next_that_accepts(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    proxy = await make_proxy(f"""
upstreams:
  gone: {{kind: openai, url: "http://127.0.0.1:{closed_port()}/v1"}}
  fake: {{kind: openai, url: "{fake_openai.url}/v1"}}
models:
  m: {{upstream: [gone, fake]}}
""")
    reply = await proxy.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "still here"}]
    )
    assert reply.choices[0].message.content == "still here"


@pytest.mark.parametrize(
    ("mode", "status", "code"),
    [
        pytest.param("html500", 502, "upstream_error", id="html-500-becomes-502"),
        pytest.param("auth401", 502, "upstream_error", id="upstream-401-is-not-the-clients"),
        pytest.param("ratelimit", 429, "rate_limit_exceeded", id="429-kept"),
    ],
)
async def test_upstream_failures_map_to_openai_errors(
    proxy: Proxy, fake_openai: FakeOpenAI, mode: str, status: int, code: str
) -> None:
    client = proxy.client()
    fake_openai.mode = mode
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(
            model="mistral", messages=[{"role": "user", "content": "x"}]
        )
    assert info.value.status_code == status
    assert info.value.code == code
    assert "<html>" not in info.value.message


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param("no_done", id="without-done"),
        pytest.param("no_finish", id="without-finish-chunk"),
        pytest.param("midstream_drop", id="connection-dropped"),
        pytest.param("stream_error_event", id="upstream-error-event"),
    ],
)
async def test_truncated_upstream_stream_ends_with_an_error_event(
    proxy: Proxy, fake_openai: FakeOpenAI, mode: str
) -> None:
    client = proxy.client()
    fake_openai.mode = mode
    stream = await client.chat.completions.create(
        model="mistral", messages=[{"role": "user", "content": "a b c"}], stream=True
    )
    got = []
    with pytest.raises(openai.APIError) as info:
        async for chunk in stream:
            got.append(chunk)
    assert "fake" in info.value.message
    assert got and got[0].choices[0].delta.role == "assistant"


async def test_truncated_stream_sends_done_after_the_error_event(
    proxy: Proxy, fake_openai: FakeOpenAI
) -> None:
    fake_openai.mode = "no_done"
    async with aiohttp.ClientSession() as http, http.post(
        proxy.url + "/v1/chat/completions",
        json={"model": "mistral", "stream": True, "messages": [{"role": "user", "content": "x"}]},
        headers={"Authorization": f"Bearer {KEY}"},
    ) as resp:
        text = await resp.text()
    events = [e for e in text.split("\n\n") if e]
    assert events[-2].startswith('data: {"error":')
    assert events[-1] == "data: [DONE]"


async def test_unknown_model_is_not_found(proxy: Proxy) -> None:
    client = proxy.client()
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "x"}]
        )
    assert info.value.code == "model_not_found"
    assert info.value.param == "model"


async def test_an_unknown_model_of_any_length_is_named_short_in_its_404(proxy: Proxy) -> None:
    client = proxy.client()
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(
            model="x" * 100_000, messages=[{"role": "user", "content": "x"}]
        )
    assert f"`{'x' * 256}…`" in info.value.message
    assert len(info.value.message) < 400


async def test_wrong_key_is_an_authentication_error(proxy: Proxy) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        await proxy.client("sk-wrong-key-000000000").models.list()
    assert info.value.body["message"].startswith("Incorrect API key provided")  # type: ignore[index]
    assert info.value.code == "invalid_api_key"


async def test_key_globs_filter_models_and_hide_forbidden_ones(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIMITED_KEY", "sk-limited-000000000000")
    proxy = await make_proxy(
        routes_for(fake_openai, 'auth:\n  keys:\n    - key: ${LIMITED_KEY}\n'
                                '      models: ["local/*", "echo"]\n')
    )
    limited = proxy.client("sk-limited-000000000000")
    ids = [m.id for m in (await limited.models.list()).data]
    assert ids == ["local/llama-3-8b", "local/qwen-2.5", "echo"]
    with pytest.raises(openai.NotFoundError):
        await limited.chat.completions.create(
            model="mistral", messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(openai.NotFoundError):
        await limited.models.retrieve("mistral")


async def test_x_api_key_header_and_any_case_bearer_are_accepted(proxy: Proxy) -> None:
    async with aiohttp.ClientSession() as http:
        for headers in ({"X-Api-Key": KEY}, {"Authorization": f"bEaReR {KEY}"}):
            async with http.get(proxy.url + "/v1/models", headers=headers) as resp:
                assert resp.status == 200


async def test_a_wrong_key_is_refused_after_the_right_one_was_accepted(proxy: Proxy) -> None:
    # The right header is remembered once accepted: a near miss must still be checked.
    async with aiohttp.ClientSession() as http:
        for key, status in ((KEY, 200), (KEY[:-1] + "x", 401), (KEY + "x", 401), (KEY, 200)):
            headers = {"Authorization": f"Bearer {key}"}
            async with http.get(proxy.url + "/v1/models", headers=headers) as resp:
                assert resp.status == status, key


async def test_generated_request_ids_differ_from_request_to_request(proxy: Proxy) -> None:
    async with aiohttp.ClientSession() as http:
        ids = set()
        for _ in range(20):
            async with http.get(proxy.url + "/healthz") as resp:
                ids.add(resp.headers["X-Request-Id"])
    assert len(ids) == 20
    assert all(re.fullmatch(r"req_[0-9a-f]{24,}", i) for i in ids)


async def test_echo_model_answers_sync_and_stream_with_usage(proxy: Proxy) -> None:
    client = proxy.client()
    reply = await client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "hello echo world"}]
    )
    assert reply.choices[0].message.content == "hello echo world"
    assert reply.usage is not None and reply.usage.completion_tokens == 3
    stream = await client.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "hello echo world"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    pieces = [c.choices[0].delta.content for c in chunks[1:] if c.choices and
              c.choices[0].delta.content]
    assert len(pieces) == 3 and "".join(pieces) == "hello echo world"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 6


async def test_every_response_carries_request_id_and_server_timing(proxy: Proxy) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            proxy.url + "/v1/chat/completions",
            json={"model": "mistral", "messages": [{"role": "user", "content": "x"}]},
            headers={"Authorization": f"Bearer {KEY}", "X-Request-Id": "abc-123"},
        ) as resp:
            assert resp.headers["X-Request-Id"] == "abc-123"
            assert resp.headers["Server-Timing"].startswith("upstream;dur=")
        async with http.get(proxy.url + "/v1/models") as resp:
            assert resp.status == 401
            assert resp.headers["X-Request-Id"].startswith("req_")
            assert "Server-Timing" in resp.headers
        async with http.post(
            proxy.url + "/v1/chat/completions",
            json={"model": "mistral", "stream": True,
                  "messages": [{"role": "user", "content": "x"}]},
            headers={"Authorization": f"Bearer {KEY}"},
        ) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            assert resp.headers["Cache-Control"] == "no-cache"
            assert resp.headers["X-Accel-Buffering"] == "no"
            assert resp.headers["X-Request-Id"]
            assert "Server-Timing" in resp.headers
            assert "Content-Encoding" not in resp.headers
            await resp.read()


async def test_client_disconnect_mid_stream_closes_the_upstream_request(
    proxy: Proxy, fake_openai: FakeOpenAI
) -> None:
    fake_openai.mode = "stream_hang"
    async with aiohttp.ClientSession() as http:
        resp = await http.post(
            proxy.url + "/v1/chat/completions",
            json={"model": "mistral", "stream": True,
                  "messages": [{"role": "user", "content": "x"}]},
            headers={"Authorization": f"Bearer {KEY}"},
        )
        await resp.content.readline()
        resp.close()
    async with asyncio.timeout(5):
        await fake_openai.disconnected.wait()


async def test_a_client_that_half_closes_after_its_request_is_taken_as_gone(
    proxy: Proxy, fake_openai: FakeOpenAI
) -> None:
    # docs/http.md: a FIN after the request is a client that left, as nginx takes it; the
    # upstream request is cancelled rather than answered into a socket nobody may read.
    fake_openai.mode = "hang"
    reader, writer = await connect(proxy.url)
    body = orjson.dumps({"model": "mistral", "messages": [{"role": "user", "content": "x"}]})
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer "
        + KEY.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        % len(body) + body
    )
    await writer.drain()
    await wait_for(lambda: bool(fake_openai.received))
    async with asyncio.timeout(5):
        writer.write_eof()
        await fake_openai.disconnected.wait()
        assert await reader.read() == b""
    writer.close()



async def test_an_event_split_at_a_line_end_reaches_the_client_as_one_event(
    make_proxy: ProxyFactory,
) -> None:
    """An upstream sends a two-line event's first line at the end of one read and its
    second, which on its own looks like a whole token event of the stream, in the next: the
    relay must read the second as the rest of the decoder's event, not pass it on alone,
    though the stream's token events taught it their template."""
    seen = [asyncio.Event() for _ in range(4)]

    def token(text: str) -> bytes:
        return (b'data: {"choices":[{"index":0,"delta":{"content":"%s"},"finish_reason":null}]}'
                % text.encode())

    role = b'data: {"choices":[{"index":0,"delta":{"role":"assistant"},"finish_reason":null}]}'
    finish = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}'
    writes = [role + b"\n\n", token("a") + b"\n\n", token("b") + b"\n\n" + token("c") + b"\n",
              token("d") + b"\n\n", finish + b"\n\ndata: [DONE]\n\n"]
    chat = stepped_stream(writes, seen)

    async with answering("/v1/chat/completions", chat) as url:
        proxy = await make_proxy(f"""
upstreams:
  split: {{kind: openai, url: {url}/v1}}
models:
  m: {{upstream: split}}
""")
        async with aiohttp.ClientSession() as http, http.post(
            proxy.url + "/v1/chat/completions",
            json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]},
            headers={"Authorization": f"Bearer {KEY}"},
        ) as resp:
            events = []
            for step in seen:
                events.append(await resp.content.readuntil(b"\n\n"))
                step.set()
            rest = await resp.content.read()
    assert events == [role + b"\n\n", token("a") + b"\n\n", token("b") + b"\n\n",
                      token("c") + b"\n" + token("d") + b"\n\n"]
    assert rest == finish + b"\n\ndata: [DONE]\n\n"
