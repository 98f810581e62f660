"""openai-python's helpers end to end: parse, stream helpers, raw and streaming responses,
models, stored-response calls, embeddings, sync and async clients, retries and timeouts.

Each test drives the SDK as an application would and checks that the helper works through
the proxy, or fails with the OpenAI-shaped error the docs promise.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import openai
import pytest
from aiohttp import web
from pydantic import BaseModel

from tests.conftest import KEY, Proxy, ProxyFactory, answering, wait_for
from tests.fake_letta import FakeLetta
from tests.fake_openai import CREATED, FakeOpenAI, embedding_of
from tests.test_e2e_openai import routes_for

WEATHER_JSON = '{"city": "Paris", "temperature": 21}'


class Weather(BaseModel):
    city: str
    temperature: int


@pytest.fixture
async def proxy(make_proxy: ProxyFactory, fake_openai: FakeOpenAI) -> Proxy:
    return await make_proxy(routes_for(fake_openai))


def last_body(fake: FakeOpenAI) -> dict[str, Any]:
    body = fake.received[-1].body
    assert body is not None
    return body


# -- structured outputs ------------------------------------------------------------------------


async def test_chat_parse_passes_the_schema_upstream_and_parses_its_json(
    proxy: Proxy, fake_openai: FakeOpenAI
) -> None:
    reply = await proxy.client().chat.completions.parse(
        model="mistral", messages=[{"role": "user", "content": WEATHER_JSON}],
        response_format=Weather,
    )
    assert reply.choices[0].message.parsed == Weather(city="Paris", temperature=21)
    sent = last_body(fake_openai)["response_format"]
    assert sent["type"] == "json_schema"
    assert sent["json_schema"]["name"] == "Weather"
    assert sent["json_schema"]["strict"] is True


async def test_chat_parse_on_an_echo_route_is_a_400_naming_response_format(proxy: Proxy) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await proxy.client().chat.completions.parse(
            model="echo", messages=[{"role": "user", "content": WEATHER_JSON}],
            response_format=Weather,
        )
    assert info.value.status_code == 400
    assert info.value.param == "response_format"
    assert info.value.type == "invalid_request_error"
    assert "JSON" in info.value.message
    with pytest.raises(openai.BadRequestError) as streamed:
        async with proxy.client().chat.completions.stream(
            model="echo", messages=[{"role": "user", "content": WEATHER_JSON}],
            response_format=Weather,
        ):
            pass
    assert streamed.value.param == "response_format"


async def test_chat_parse_on_a_letta_route_is_a_400_before_any_letta_call(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    state, url = letta
    proxy = await make_proxy(
        f"upstreams:\n  letta: {{kind: letta, url: '{url}'}}\n"
        "models:\n  support: {upstream: letta, agent: support-bot}\n"
    )
    with pytest.raises(openai.BadRequestError) as info:
        await proxy.client().chat.completions.parse(
            model="support", messages=[{"role": "user", "content": "hi"}],
            response_format=Weather,
        )
    assert info.value.param == "response_format"
    assert state.message_posts() == []


async def test_responses_parse_with_text_format_parses_the_upstream_json(
    proxy: Proxy, fake_openai: FakeOpenAI
) -> None:
    reply = await proxy.client().responses.parse(
        model="mistral", input=WEATHER_JSON, text_format=Weather
    )
    assert reply.output_parsed == Weather(city="Paris", temperature=21)
    sent = last_body(fake_openai)["response_format"]
    assert sent["type"] == "json_schema"
    assert sent["json_schema"]["name"] == "Weather"


async def test_responses_parse_on_an_echo_route_is_a_400_naming_text_format(
    proxy: Proxy,
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await proxy.client().responses.parse(model="echo", input=WEATHER_JSON,
                                             text_format=Weather)
    assert info.value.param == "text.format"
    assert info.value.type == "invalid_request_error"


# -- the chat stream helper ----------------------------------------------------------------------


@pytest.mark.parametrize("model", ["mistral", "echo"])
async def test_chat_stream_helper_gives_the_final_completion(proxy: Proxy, model: str) -> None:
    async with proxy.client().chat.completions.stream(
        model=model, messages=[{"role": "user", "content": "one two three"}],
        stream_options={"include_usage": True},
    ) as stream:
        deltas = [e.delta async for e in stream if e.type == "content.delta"]
        final = await stream.get_final_completion()
    assert "".join(deltas) == "one two three"
    assert final.choices[0].message.content == "one two three"
    assert final.choices[0].finish_reason == "stop"
    assert final.usage is not None and final.usage.total_tokens > 0


async def test_chat_stream_helper_parses_a_response_format_model(proxy: Proxy) -> None:
    async with proxy.client().chat.completions.stream(
        model="mistral", messages=[{"role": "user", "content": WEATHER_JSON}],
        response_format=Weather,
    ) as stream:
        final = await stream.get_final_completion()
    assert final.choices[0].message.parsed == Weather(city="Paris", temperature=21)


# -- raw and streaming responses ---------------------------------------------------------------


async def test_with_raw_response_carries_the_request_id_on_chat_responses_and_models(
    proxy: Proxy,
) -> None:
    client = proxy.client()
    hi: Any = [{"role": "user", "content": "hi"}]
    chat = await client.chat.completions.with_raw_response.create(model="mistral", messages=hi)
    resp = await client.responses.with_raw_response.create(model="mistral", input="hi")
    models = await client.models.with_raw_response.list()
    card = await client.models.with_raw_response.retrieve("mistral")
    for raw in (chat, resp, models, card):
        assert raw.status_code == 200
        assert raw.headers["x-request-id"].startswith("req_")
        assert "proxy;dur=" in raw.headers["server-timing"]
    assert chat.parse().choices[0].message.content == "hi"
    assert resp.parse().output_text == "hi"
    assert models.parse().data[0].id == "mistral"
    assert card.parse().id == "mistral"


async def test_a_client_request_id_comes_back_on_the_raw_response(proxy: Proxy) -> None:
    raw = await proxy.client().chat.completions.with_raw_response.create(
        model="echo", messages=[{"role": "user", "content": "hi"}],
        extra_headers={"X-Request-Id": "my-trace-1"},
    )
    assert raw.headers["x-request-id"] == "my-trace-1"
    assert raw.request_id == "my-trace-1"


async def test_with_streaming_response_streams_chat_and_responses_with_headers(
    proxy: Proxy,
) -> None:
    client = proxy.client()
    async with client.chat.completions.with_streaming_response.create(
        model="mistral", messages=[{"role": "user", "content": "a b"}], stream=True
    ) as chat:
        assert chat.headers["x-request-id"]
        assert chat.headers["content-type"].startswith("text/event-stream")
        chunks = [c async for c in await chat.parse()]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "a b"
    async with client.responses.with_streaming_response.create(
        model="echo", input="c d", stream=True
    ) as resp:
        assert resp.headers["x-request-id"]
        events = [e async for e in await resp.parse()]
    assert events[-1].type == "response.completed"
    async with client.models.with_streaming_response.list() as models:
        assert models.headers["x-request-id"]
        page = await models.parse()
    assert "echo" in [m.id for m in page.data]


# -- models --------------------------------------------------------------------------------------


async def test_models_retrieve_a_plain_and_a_wildcard_model(proxy: Proxy) -> None:
    client = proxy.client()
    plain = await client.models.retrieve("mistral")
    assert (plain.id, plain.object) == ("mistral", "model")
    assert plain.owned_by == "fake" and plain.created > 0
    wild = await client.models.retrieve("local/llama-3-8b")
    assert (wild.id, wild.created, wild.owned_by) == ("local/llama-3-8b", CREATED, "fake")


async def test_models_retrieve_of_an_unknown_model_is_a_404_model_not_found(
    proxy: Proxy,
) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await proxy.client().models.retrieve("gpt-nope")
    assert info.value.code == "model_not_found"
    assert info.value.status_code == 404
    assert "gpt-nope" in info.value.message


async def test_models_list_is_one_page_that_auto_pagination_walks(proxy: Proxy) -> None:
    client = proxy.client()
    page = await client.models.list()
    assert page.object == "list"
    assert not page.has_next_page()
    ids = [m.id async for m in client.models.list()]
    assert ids == ["mistral", "local/llama-3-8b", "local/qwen-2.5", "echo"]
    assert ids == [m.id for m in page.data]


# -- nothing stored ----------------------------------------------------------------------------


async def test_stored_response_calls_are_404s_saying_nothing_is_stored(proxy: Proxy) -> None:
    client = proxy.client()
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: client.responses.retrieve("resp_abc"),
        lambda: client.responses.delete("resp_abc"),
        lambda: client.responses.cancel("resp_abc"),
        lambda: client.responses.input_items.list("resp_abc"),
    ]
    for call in calls:
        with pytest.raises(openai.NotFoundError) as info:
            await call()
        assert info.value.code == "not_found"
        assert "stores no responses" in info.value.message


@pytest.mark.parametrize(("endpoint", "says"), [
    ("compact", "does not compact conversations"), ("input_tokens", "does not count input tokens"),
])
async def test_compaction_and_token_counting_are_404s_saying_why(
    proxy: Proxy, endpoint: str, says: str
) -> None:
    client = proxy.client()
    with pytest.raises(openai.NotFoundError) as info:
        if endpoint == "compact":
            await client.responses.compact(model="echo", input="hi")
        else:
            await client.responses.input_tokens.count(model="echo", input="hi")
    assert info.value.code == "not_found"
    assert says in info.value.message


# -- embeddings ----------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", [openai.NOT_GIVEN, "float"], ids=["default", "float"])
async def test_embeddings_decode_to_the_upstream_floats(
    proxy: Proxy, fake_openai: FakeOpenAI, encoding: Any
) -> None:
    reply = await proxy.client().embeddings.create(
        model="mistral", input=["four", "sixteen"], encoding_format=encoding
    )
    assert [d.embedding for d in reply.data] == [embedding_of("four"), embedding_of("sixteen")]
    assert reply.model == "mistral"
    # The SDK asks for base64 unless told otherwise, and decodes it itself.
    expected = "base64" if encoding is openai.NOT_GIVEN else "float"
    assert last_body(fake_openai)["encoding_format"] == expected


# -- sync client ---------------------------------------------------------------------------------


async def test_the_sync_client_works_from_a_thread(proxy: Proxy) -> None:
    def run() -> tuple[str | None, list[str], str]:
        with openai.OpenAI(base_url=proxy.url + "/v1", api_key=KEY, max_retries=0) as client:
            chat = client.chat.completions.create(
                model="mistral", messages=[{"role": "user", "content": "sync hi"}])
            with client.chat.completions.stream(
                model="echo", messages=[{"role": "user", "content": "x y"}]
            ) as stream:
                final = stream.get_final_completion()
            ids = [m.id for m in client.models.list()]
            return chat.choices[0].message.content, ids, final.choices[0].message.content or ""

    content, ids, streamed = await asyncio.to_thread(run)
    assert content == "sync hi"
    assert streamed == "x y"
    assert ids[0] == "mistral"


# -- client timeouts -----------------------------------------------------------------------------


def impatient_client(proxy: Proxy) -> openai.AsyncOpenAI:
    """A client that gives up after half a second and does not retry."""
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=KEY, max_retries=0,
                                timeout=0.5)
    proxy.clients.append(client)
    return client


async def test_an_sdk_timeout_on_a_stalled_stream_cancels_the_upstream_request(
    proxy: Proxy, fake_openai: FakeOpenAI
) -> None:
    fake_openai.mode = "stream_hang"
    client = impatient_client(proxy)
    stream = await client.chat.completions.create(
        model="mistral", messages=[{"role": "user", "content": "a b"}], stream=True
    )
    with pytest.raises(openai.APITimeoutError):
        async for _ in stream:
            pass
    await stream.close()
    await wait_for(fake_openai.disconnected.is_set)


async def test_an_sdk_timeout_before_the_answer_cancels_the_upstream_request(
    proxy: Proxy, fake_openai: FakeOpenAI
) -> None:
    fake_openai.mode = "hang"
    client = impatient_client(proxy)
    with pytest.raises(openai.APITimeoutError):
        await client.chat.completions.create(
            model="mistral", messages=[{"role": "user", "content": "a b"}])
    await wait_for(fake_openai.disconnected.is_set)


async def test_an_sdk_timeout_on_a_stalled_responses_stream_cancels_the_upstream_request(
    proxy: Proxy, fake_openai: FakeOpenAI
) -> None:
    fake_openai.mode = "stream_hang"
    client = impatient_client(proxy)
    with pytest.raises(openai.APITimeoutError):
        async with client.responses.stream(model="mistral", input="a b") as stream:
            async for _ in stream:
                pass
    await wait_for(fake_openai.disconnected.is_set)


# -- more helpers ------------------------------------------------------------------------------


async def test_responses_stream_helper_parses_text_format_into_the_final_response(
    proxy: Proxy,
) -> None:
    async with proxy.client().responses.stream(
        model="mistral", input=WEATHER_JSON, text_format=Weather
    ) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert final.output_parsed == Weather(city="Paris", temperature=21)


class GetWeather(BaseModel):
    city: str


async def test_chat_parse_with_a_strict_pydantic_tool_parses_the_call_arguments(
    proxy: Proxy, fake_openai: FakeOpenAI
) -> None:
    reply = await proxy.client().chat.completions.parse(
        model="mistral", messages=[{"role": "user", "content": "weather?"}],
        tools=[openai.pydantic_function_tool(GetWeather, name="get_weather")],
    )
    call = reply.choices[0].message.tool_calls
    assert call is not None and call[0].function.parsed_arguments == GetWeather(city="Paris")
    assert last_body(fake_openai)["tools"][0]["function"]["strict"] is True


async def test_error_answers_carry_the_request_id_the_sdk_reports(proxy: Proxy) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await proxy.client().models.retrieve("gpt-nope",
                                             extra_headers={"X-Request-Id": "trace-404"})
    assert info.value.request_id == "trace-404"


@pytest.mark.parametrize("header", [
    "Retry-After",
    # The SDKs read `retry-after-ms` first (Azure OpenAI sends it): without it passed on, the
    # SDK falls back to its own half-second backoff and retries too early.
    "retry-after-ms",
])
@pytest.mark.parametrize("stream", [False, True], ids=["sync", "stream"])
async def test_the_sdk_retries_a_429_after_the_wait_the_upstream_asked_and_succeeds(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI, header: str, stream: bool
) -> None:
    calls: list[float] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        calls.append(time.monotonic())
        if len(calls) == 1:
            wait = "1" if header == "Retry-After" else "1000"
            return web.json_response(
                {"error": {"message": "Slow down.", "type": "rate_limit_error"}},
                status=429, headers={header: wait},
            )
        if stream:
            return await fake_openai.stream(request, body, fake_openai.answer_chunks(body))
        return web.json_response(fake_openai.completion(body, fake_openai.answer_chunks(body)))

    async with answering("/v1/chat/completions", chat) as url:
        proxy = await make_proxy(
            f"upstreams:\n  busy:\n    kind: openai\n    url: {url}/v1\n"
            "models:\n  busy:\n    upstream: busy\n"
        )
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=KEY, max_retries=2)
        proxy.clients.append(client)
        messages: list[Any] = [{"role": "user", "content": "x y"}]
        if stream:
            chunks = await client.chat.completions.create(
                model="busy", messages=messages, stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
        else:
            reply = await client.chat.completions.create(model="busy", messages=messages)
            text = reply.choices[0].message.content or ""
    assert text == "x y"
    assert len(calls) == 2
    # Waiting the second the upstream asked, not the SDK's own half-second backoff.
    assert calls[1] - calls[0] >= 0.9


async def test_leaving_the_stream_helper_early_cancels_the_upstream_request(
    proxy: Proxy, fake_openai: FakeOpenAI
) -> None:
    fake_openai.mode = "stream_hang"
    async with proxy.client().chat.completions.stream(
        model="mistral", messages=[{"role": "user", "content": "a b"}]
    ) as stream:
        async for event in stream:
            if event.type == "content.delta":
                break
    await wait_for(fake_openai.disconnected.is_set)


async def test_a_sync_client_timeout_in_a_thread_cancels_the_upstream_request(
    proxy: Proxy, fake_openai: FakeOpenAI
) -> None:
    fake_openai.mode = "hang"

    def run() -> None:
        with openai.OpenAI(base_url=proxy.url + "/v1", api_key=KEY, max_retries=0,
                           timeout=0.5) as client:
            client.chat.completions.create(
                model="mistral", messages=[{"role": "user", "content": "a b"}])

    with pytest.raises(openai.APITimeoutError):
        await asyncio.to_thread(run)
    await wait_for(fake_openai.disconnected.is_set)


async def test_embeddings_on_an_echo_route_are_a_400_naming_model(proxy: Proxy) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await proxy.client().embeddings.create(model="echo", input="hi")
    assert info.value.param == "model"
    assert info.value.type == "invalid_request_error"
