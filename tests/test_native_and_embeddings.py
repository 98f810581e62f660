"""What openai upstreams serve beside chat: `responses: native` (their own `/responses`,
relayed) and `/v1/embeddings` (passed through, `model` rewritten both ways)."""

from __future__ import annotations

import asyncio
import base64
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress

import openai
import orjson
import pytest
from aiohttp import web
from openai.types.responses import ResponseFailedEvent

from tests.conftest import KEY, Proxy, ProxyFactory, answering, closed_port
from tests.fake_openai import LETTA_CODE, FakeOpenAI, embedding_of
from tests.responses_assert import assert_responses_stream, parse_sse
from tests.responses_client import post_raw

UPSTREAM_MODEL = "letta-code-agent"


def native_routes(fake: FakeOpenAI, extra: str = "") -> str:
    return f"""
upstreams:
  code:
    kind: openai
    url: {fake.url}/v1
    api_key: upstream-secret
    responses: native
  plain:
    kind: openai
    url: {fake.url}/v1
  demo:
    kind: echo
{extra}
models:
  coder:
    upstream: code
    model: {UPSTREAM_MODEL}
  mistral:
    upstream: plain
    model: mistralai/Mistral-7B-Instruct-v0.2
  echo:
    upstream: demo
"""


@pytest.fixture
async def proxy(make_proxy: ProxyFactory, fake_openai: FakeOpenAI) -> Proxy:
    return await make_proxy(native_routes(fake_openai))


def captured_events() -> bytes:
    return (LETTA_CODE / "responses_stream.sse").read_bytes()


# -- responses: native -----------------------------------------------------------------------


async def test_native_stream_relays_the_upstreams_events_as_they_were_then_done(
    proxy: Proxy, fake_openai: FakeOpenAI
) -> None:
    status, headers, raw = await post_raw(
        proxy, {"model": "coder", "input": "responses stream hi", "stream": True})
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    assert headers["X-Upstream-Note"] == "native"
    assert raw == captured_events() + b"data: [DONE]\n\n"
    seen = fake_openai.received[-1]
    assert seen.path == "/v1/responses"
    assert seen.body == {"model": UPSTREAM_MODEL, "input": "responses stream hi",
                         "stream": True, "store": False}
    assert seen.headers["Authorization"] == "Bearer upstream-secret"
    assert KEY not in str(seen.headers)


async def test_the_sdk_reads_a_native_stream_to_its_final_response(proxy: Proxy) -> None:
    async with proxy.client().responses.stream(model="coder", input="hi") as stream:
        final = await stream.get_final_response()
    assert final.status == "completed"
    assert final.output_text.endswith("responses stream hi")


async def test_native_sync_answer_is_the_upstreams_body(
    proxy: Proxy, fake_openai: FakeOpenAI
) -> None:
    status, _, raw = await post_raw(proxy, {"model": "coder", "input": "responses api hi"})
    assert status == 200
    assert raw == (LETTA_CODE / "responses_sync.json").read_bytes()
    reply = await proxy.client().responses.create(model="coder", input="hi")
    assert reply.output_text.endswith("responses api hi")
    assert fake_openai.received[-1].body["model"] == UPSTREAM_MODEL  # type: ignore[index]


async def test_an_upstream_done_is_not_doubled(proxy: Proxy, fake_openai: FakeOpenAI) -> None:
    fake_openai.mode = "native_done"
    _, _, raw = await post_raw(proxy, {"model": "coder", "input": "x", "stream": True})
    assert raw.count(b"data: [DONE]") == 1 and raw.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize("mode", ["stream_error_event", "midstream_drop"])
async def test_a_native_stream_that_breaks_ends_with_response_failed_then_done(
    proxy: Proxy, fake_openai: FakeOpenAI, mode: str
) -> None:
    fake_openai.mode = mode
    status, _, raw = await post_raw(proxy, {"model": "coder", "input": "x", "stream": True})
    assert status == 200
    parsed = parse_sse(raw)
    assert parsed.done == 1
    events = parsed.events
    assert [d["type"] for _, d in events[:2]] == ["response.created", "response.in_progress"]
    name, failed = events[-1]
    assert name == failed["type"] == "response.failed"
    assert failed["sequence_number"] == 5 == len(events) - 1
    response = failed["response"]
    assert response["id"] == events[0][1]["response"]["id"]
    assert response["status"] == "failed" and response["error"]["code"] == "server_error"
    assert "'code'" in response["error"]["message"]


async def test_a_native_upstreams_refusal_is_an_http_error_before_the_commit(
    proxy: Proxy, fake_openai: FakeOpenAI
) -> None:
    fake_openai.mode = "error400"
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            await proxy.client().responses.create(model="coder", input="x", stream=stream)
        assert info.value.param == "input"


async def test_a_native_upstreams_redirect_is_not_followed(
    proxy: Proxy, fake_openai: FakeOpenAI
) -> None:
    fake_openai.mode = "redirect"
    status, _, raw = await post_raw(proxy, {"model": "coder", "input": "x", "stream": True})
    assert status == 502 and b"redirect" in raw
    assert len(fake_openai.received) == 1


async def test_native_routes_refuse_state_before_any_upstream_call(
    proxy: Proxy, fake_openai: FakeOpenAI
) -> None:
    status, _, raw = await post_raw(
        proxy, {"model": "coder", "input": "x", "previous_response_id": "resp_1"})
    assert status == 400 and orjson.loads(raw)["error"]["param"] == "previous_response_id"
    assert fake_openai.received == []


async def test_a_native_upstream_down_fails_over_to_one_that_translates(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    proxy = await make_proxy(f"""
upstreams:
  gone: {{kind: openai, url: "http://127.0.0.1:{closed_port()}/v1", responses: native}}
  plain: {{kind: openai, url: "{fake_openai.url}/v1"}}
models:
  m: {{upstream: [gone, plain]}}
""")
    reply = await proxy.client().responses.create(model="m", input="translated instead")
    assert reply.output_text == "translated instead"
    assert fake_openai.received[-1].path == "/v1/chat/completions"


@asynccontextmanager
async def native_before(
    make_proxy: ProxyFactory, answer: Callable[[web.Request], Awaitable[web.StreamResponse]],
    options: str = "",
) -> AsyncIterator[Proxy]:
    """A proxy whose model `m` is relayed natively to an upstream answering with `answer`."""
    async with answering("/v1/responses", answer) as url:
        yield await make_proxy(
            f"upstreams:\n  n: {{kind: openai, url: '{url}/v1', responses: native{options}}}\n"
            "models:\n  m: {upstream: n}\n"
        )


# openai-python's own models serialise an event with `type` last, after the response object;
# such a server writes no `event:` lines.
SORTED_EVENTS = (
    b'data: {"response":{"id":"resp_1","object":"response","status":"in_progress",'
    b'"output":[]},"sequence_number":0,"type":"response.created"}\n\n'
    b'data: {"response":{"id":"resp_1","object":"response","status":"completed",'
    b'"output":[]},"sequence_number":1,"type":"response.completed"}\n\n'
)


@pytest.mark.parametrize("held_open", [False, True], ids=["closed", "held-open"])
async def test_a_terminal_event_with_its_type_last_ends_the_native_stream(
    make_proxy: ProxyFactory, held_open: bool
) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(SORTED_EVENTS)
        if held_open:  # no [DONE] and no end: until the proxy hangs up
            await asyncio.Event().wait()
        return resp

    # Without the terminal event seen, a held stream would end at `idle` with a failure.
    async with native_before(make_proxy, answer, ", timeouts: {idle: 2}") as proxy:
        status, _, raw = await post_raw(proxy, {"model": "m", "input": "x", "stream": True})
    assert status == 200
    assert raw == SORTED_EVENTS + b"data: [DONE]\n\n"


async def test_a_native_stream_failing_before_any_event_still_opens_with_response_created(
    make_proxy: ProxyFactory,
) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await asyncio.Event().wait()  # silent until the proxy hangs up
        return resp

    options = ", keepalive: 0.05, timeouts: {first_event: 0.3}"
    async with native_before(make_proxy, answer, options) as proxy:
        status, _, raw = await post_raw(
            proxy, {"model": "m", "input": "x", "stream": True, "instructions": "Be brief."})
        async with proxy.client().responses.stream(model="m", input="x") as stream:
            events = [event async for event in stream]
    assert status == 200 and raw.startswith(b": keep-alive\n\n")
    final = assert_responses_stream(raw)  # created, in_progress, failed: 0, 1, 2; [DONE]
    assert len(parse_sse(raw).events) == 3
    assert final["status"] == "failed" and final["instructions"] == "Be brief."
    assert "(timeouts.first_event)" in final["error"]["message"]
    # The SDK reads the failure itself, not a complaint about the stream's order.
    assert [e.type for e in events] == [
        "response.created", "response.in_progress", "response.failed"]
    failed = events[-1]
    assert isinstance(failed, ResponseFailedEvent) and failed.response.error is not None
    assert "(timeouts.first_event)" in failed.response.error.message


async def test_a_native_stream_announcing_a_response_too_deep_to_repeat_still_fails_cleanly(
    make_proxy: ProxyFactory,
) -> None:
    # orjson reads 1024 levels but writes 255: the announced object cannot be repeated.
    deep = b"[" * 300 + b"]" * 300

    async def answer(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(
            b'data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_1",'
            b'"object":"response","status":"in_progress","output":[],"metadata":{"x":'
            + deep + b"}}}\n\n"
        )
        assert request.transport is not None
        request.transport.close()  # broken after the commit
        return resp

    async with native_before(make_proxy, answer) as proxy:
        status, _, raw = await post_raw(proxy, {"model": "m", "input": "x", "stream": True})
    assert status == 200
    parsed = parse_sse(raw)
    assert parsed.done == 1
    name, failed = parsed.events[-1]
    assert name == failed["type"] == "response.failed" and failed["sequence_number"] == 1
    assert failed["response"]["id"] == "resp_1"
    assert failed["response"]["status"] == "failed"


# -- embeddings ------------------------------------------------------------------------------


async def test_embeddings_base64_by_default_decodes_and_the_model_is_rewritten_both_ways(
    proxy: Proxy, fake_openai: FakeOpenAI
) -> None:
    reply = await proxy.client().embeddings.create(model="mistral", input=["a", "bbb"])
    assert [d.embedding for d in reply.data] == [embedding_of("a"), embedding_of("bbb")]
    assert reply.model == "mistral"
    seen = fake_openai.received[-1]
    assert seen.path == "/v1/embeddings"
    assert seen.body == {"model": "mistralai/Mistral-7B-Instruct-v0.2", "input": ["a", "bbb"],
                         "encoding_format": "base64"}


async def test_embeddings_encoding_format_goes_through_untouched(
    proxy: Proxy, fake_openai: FakeOpenAI
) -> None:
    for fmt in ("float", "base64"):
        status, _, raw = await post_raw(
            proxy, {"model": "mistral", "input": "four", "encoding_format": fmt},
            path="/embeddings")
        assert status == 200
        answer = orjson.loads(raw)
        assert answer["model"] == "mistral"
        assert fake_openai.received[-1].body["encoding_format"] == fmt  # type: ignore[index]
        vector = answer["data"][0]["embedding"]
        if fmt == "base64":
            vector = list(struct.unpack("<3f", base64.b64decode(vector)))
        assert vector == embedding_of("four")


async def test_embeddings_on_a_route_that_cannot_embed_is_a_400_naming_model(
    proxy: Proxy, fake_openai: FakeOpenAI
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await proxy.client().embeddings.create(model="echo", input="x")
    assert info.value.param == "model"
    assert "model echo does not support embeddings" in info.value.message
    assert fake_openai.received == []


async def test_embeddings_without_input_is_a_400_naming_input(proxy: Proxy) -> None:
    status, _, raw = await post_raw(proxy, {"model": "mistral"}, path="/v1/embeddings")
    assert status == 400 and orjson.loads(raw)["error"]["param"] == "input"


async def test_embeddings_fail_over_like_chat(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI, second_openai: FakeOpenAI
) -> None:
    proxy = await make_proxy(f"""
upstreams:
  a: {{kind: openai, url: "{fake_openai.url}/v1", circuit: {{failures: 1, cooldown: 60}}}}
  b: {{kind: openai, url: "{second_openai.url}/v1"}}
models:
  e: {{upstream: [a, b], model: embedder}}
""")
    fake_openai.mode = "error500"
    client = proxy.client()
    for _ in range(2):
        reply = await client.embeddings.create(model="e", input="x")
        assert reply.data[0].embedding == embedding_of("x") and reply.model == "e"
    assert len(fake_openai.received) == 1, "the open circuit skips the failing upstream"
    assert len(second_openai.received) == 2


async def test_embeddings_a_200_reporting_an_error_is_a_502_and_fails_over(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    async def reports_error(request: web.Request) -> web.Response:
        # OpenRouter's way: a 200 whose body is an error, with no vectors.
        return web.json_response({"error": {"message": "No endpoints found"}, "data": []})

    async with answering("/embeddings", reports_error) as url:
        proxy = await make_proxy(f"""
upstreams:
  flaky: {{kind: openai, url: "{url}"}}
  good: {{kind: openai, url: "{fake_openai.url}/v1"}}
models:
  alone: {{upstream: flaky}}
  both: {{upstream: [flaky, good], model: embedder}}
""")
        client = proxy.client()
        with pytest.raises(openai.InternalServerError) as info:
            await client.embeddings.create(model="alone", input="x")
        assert info.value.status_code == 502
        assert "No endpoints found" in info.value.message
        reply = await client.embeddings.create(model="both", input="x")
        assert reply.data[0].embedding == embedding_of("x") and reply.model == "both"


async def test_embeddings_nested_deeper_than_the_proxy_writes_are_a_502(
    make_proxy: ProxyFactory,
) -> None:
    # orjson reads 1024 levels but writes 255: the answer parses, and renaming its model
    # must not turn it into the proxy's own 500.
    deep = b"[" * 300 + b"]" * 300

    async def nested(request: web.Request) -> web.Response:
        return web.Response(
            body=b'{"object":"list","data":[],"model":"raw-name","extra":' + deep + b"}",
            content_type="application/json",
        )

    async with answering("/embeddings", nested) as url:
        proxy = await make_proxy(
            f'upstreams:\n  u: {{kind: openai, url: "{url}"}}\nmodels:\n  e: {{upstream: u}}\n')
        status, _, raw = await post_raw(proxy, {"model": "e", "input": "x"}, path="/v1/embeddings")
    assert status == 502
    assert orjson.loads(raw)["error"]["code"] == "upstream_error"


# -- hostile upstreams and clients on both pass-through paths ---------------------------------


def one_route(url: str, options: str = "") -> str:
    return (f"upstreams:\n  u: {{kind: openai, url: '{url}/v1'{options}}}\n"
            "models:\n  m: {upstream: u, model: upstream-secret-id}\n")


def assert_upstream_error(status: int, raw: bytes, leaked: bytes) -> None:
    assert status == 502
    error = orjson.loads(raw)["error"]
    assert error["type"] == "upstream_error" and error["code"] == "upstream_error"
    assert leaked not in raw


NOT_AN_OBJECT = {
    "html": (b"<html><body>upstream-secret-id gateway</body></html>", "text/html"),
    "empty": (b"", "application/json"),
    "array": (b'[{"object": "response"}]', "application/json"),
    "string": (b'"upstream-secret-id"', "application/json"),
}


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/embeddings"])
@pytest.mark.parametrize("body", list(NOT_AN_OBJECT), ids=list(NOT_AN_OBJECT))
async def test_a_200_that_is_not_a_json_object_is_a_502_never_relayed(
    make_proxy: ProxyFactory, path: str, body: str
) -> None:
    data, ctype = NOT_AN_OBJECT[body]

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=data, content_type=ctype)

    async with answering(path, answer) as url:
        proxy = await make_proxy(one_route(url, ", responses: native"))
        status, _, raw = await post_raw(proxy, {"model": "m", "input": "x"}, path=path)
    assert_upstream_error(status, raw, b"upstream-secret-id")


@pytest.mark.parametrize("data", [b"{}", b'{"data": null}', b'{"data": {"0": [1.0]}}',
                                  b'{"data": "x"}'])
async def test_embeddings_whose_data_is_not_a_list_are_a_502(
    make_proxy: ProxyFactory, data: bytes
) -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=data, content_type="application/json")

    async with answering("/v1/embeddings", answer) as url:
        proxy = await make_proxy(one_route(url))
        status, _, raw = await post_raw(proxy, {"model": "m", "input": "x"}, path="/v1/embeddings")
    assert_upstream_error(status, raw, b"upstream-secret-id")


async def test_a_native_stream_answered_with_html_is_a_502_before_the_commit(
    make_proxy: ProxyFactory,
) -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=b"<html>upstream-secret-id</html>", content_type="text/html")

    async with answering("/v1/responses", answer) as url:
        proxy = await make_proxy(one_route(url, ", responses: native"))
        status, _, raw = await post_raw(proxy, {"model": "m", "input": "x", "stream": True})
    assert_upstream_error(status, raw, b"upstream-secret-id")
    assert b"text/html" in raw


CREATED = (b'event: response.created\ndata: {"type":"response.created","sequence_number":0,'
           b'"response":{"id":"resp_up","object":"response","status":"in_progress",'
           b'"output":[]}}\n\n')


@pytest.mark.parametrize("ending", [b"", b"data: [DONE]\n\n"], ids=["closed", "done"])
async def test_a_native_stream_without_a_terminal_event_ends_with_response_failed(
    make_proxy: ProxyFactory, ending: bytes
) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(CREATED + ending)
        return resp

    async with native_before(make_proxy, answer) as proxy:
        status, _, raw = await post_raw(proxy, {"model": "m", "input": "x", "stream": True})
    assert status == 200
    parsed = parse_sse(raw)
    assert parsed.done == 1 and raw.endswith(b"data: [DONE]\n\n")
    name, failed = parsed.events[-1]
    assert name == failed["type"] == "response.failed" and failed["sequence_number"] == 1
    assert failed["response"]["id"] == "resp_up"
    assert failed["response"]["error"]["code"] == "server_error"
    assert "without a terminal event" in failed["response"]["error"]["message"]


async def test_a_native_event_over_the_event_limit_ends_the_stream_with_response_failed(
    make_proxy: ProxyFactory,
) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(CREATED)
        with suppress(ConnectionResetError):  # the proxy may hang up while it is written
            await resp.write(b'data: {"type":"response.output_text.delta","delta":"'
                             + b"x" * (5 * 1024 * 1024) + b'"}\n\n')
        return resp

    async with native_before(make_proxy, answer) as proxy:
        status, _, raw = await post_raw(proxy, {"model": "m", "input": "x", "stream": True})
    assert status == 200 and len(raw) < 64 * 1024
    name, failed = parse_sse(raw).events[-1]
    assert name == "response.failed" and failed["response"]["id"] == "resp_up"
    assert raw.endswith(b"data: [DONE]\n\n")


@asynccontextmanager
async def raw_upstream(reply: bytes) -> AsyncIterator[str]:
    """An upstream that answers any request with `reply`, bytes aiohttp would not send."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/embeddings"])
async def test_a_body_announced_past_the_answer_limit_is_a_502(
    make_proxy: ProxyFactory, path: str
) -> None:
    reply = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
             b"Content-Length: 100000000000\r\n\r\n{\"data\": [")
    async with raw_upstream(reply) as url:
        proxy = await make_proxy(one_route(url, ", responses: native"))
        status, _, raw = await post_raw(proxy, {"model": "m", "input": "x"}, path=path)
    assert_upstream_error(status, raw, b"upstream-secret-id")
    assert b"over the proxy's limit" in raw


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/embeddings"])
async def test_a_redirect_on_either_path_is_a_502_and_not_followed(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI, path: str
) -> None:
    calls: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        calls.append(request.path)
        raise web.HTTPTemporaryRedirect(f"{fake_openai.url}{path}")

    async with answering(path, answer) as url:
        proxy = await make_proxy(one_route(url, ", responses: native"))
        status, _, raw = await post_raw(proxy, {"model": "m", "input": "x"}, path=path)
    assert_upstream_error(status, raw, b"upstream-secret-id")
    assert b"redirect" in raw
    assert calls == [path] and fake_openai.received == []


@pytest.mark.parametrize("model", [None, 7, ""], ids=["missing", "number", "empty"])
async def test_embeddings_without_a_model_name_is_a_400_naming_model(
    proxy: Proxy, fake_openai: FakeOpenAI, model: object
) -> None:
    body: dict[str, object] = {"input": "x"}
    if model is not None:
        body["model"] = model
    status, _, raw = await post_raw(proxy, body, path="/v1/embeddings")
    assert status == 400 and orjson.loads(raw)["error"]["param"] == "model"
    assert fake_openai.received == []


async def test_an_embeddings_input_past_max_body_is_a_413_before_any_upstream_call(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    proxy = await make_proxy(native_routes(fake_openai), max_body=64 * 1024)
    status, _, raw = await post_raw(
        proxy, {"model": "mistral", "input": ["x" * 1024] * 100}, path="/v1/embeddings")
    assert status == 413 and orjson.loads(raw)["error"]["type"] == "invalid_request_error"
    assert fake_openai.received == []


async def test_a_client_leaving_a_native_stream_closes_the_upstream_request(
    make_proxy: ProxyFactory,
) -> None:
    gone = asyncio.Event()

    async def answer(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(CREATED)
        try:
            await asyncio.Event().wait()  # until the proxy hangs up
        finally:
            gone.set()
        return resp

    async with native_before(make_proxy, answer) as proxy:
        stream = await proxy.client().responses.create(model="m", input="x", stream=True)
        async for event in stream:
            assert event.type == "response.created"
            break
        await stream.close()
        await asyncio.wait_for(gone.wait(), 5)


@pytest.mark.parametrize("stream", [False, True], ids=["sync", "stream"])
async def test_a_native_upstream_failing_before_the_commit_fails_over_to_the_next(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI, stream: bool
) -> None:
    async def fails(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "GPU on fire"}}, status=500)

    async with answering("/v1/responses", fails) as url:
        proxy = await make_proxy(f"""
upstreams:
  a: {{kind: openai, url: "{url}/v1", responses: native}}
  b: {{kind: openai, url: "{fake_openai.url}/v1", responses: native}}
models:
  m: {{upstream: [a, b], model: {UPSTREAM_MODEL}}}
""")
        status, _, raw = await post_raw(proxy, {"model": "m", "input": "x", "stream": stream})
    assert status == 200
    assert [r.path for r in fake_openai.received] == ["/v1/responses"]
    if stream:
        assert raw == captured_events() + b"data: [DONE]\n\n"
    else:
        assert raw == (LETTA_CODE / "responses_sync.json").read_bytes()


@pytest.mark.parametrize(
    ("data", "message"),
    [(b"{}", b"not a response object"),
     (b'{"error": {"message": "No endpoints found"}}', b"No endpoints found")],
    ids=["empty-object", "reported-error"],
)
async def test_a_native_sync_200_that_is_no_response_object_is_a_502(
    make_proxy: ProxyFactory, data: bytes, message: bytes
) -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=data, content_type="application/json")

    async with native_before(make_proxy, answer) as proxy:
        status, _, raw = await post_raw(proxy, {"model": "m", "input": "x"})
    assert_upstream_error(status, raw, b"upstream-secret-id")
    assert message in raw


async def test_a_native_sync_failed_response_is_relayed_as_the_upstream_sent_it(
    make_proxy: ProxyFactory,
) -> None:
    failed = (b'{"id":"resp_up","object":"response","status":"failed","output":[],'
              b'"error":{"code":"server_error","message":"model crashed"}}')

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=failed, content_type="application/json")

    async with native_before(make_proxy, answer) as proxy:
        status, _, raw = await post_raw(proxy, {"model": "m", "input": "x"})
    assert status == 200 and raw == failed
