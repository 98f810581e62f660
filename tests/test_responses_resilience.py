"""Resilience of `/v1/responses`: keep-alives, timeouts, failover before the commit, and
clients that leave, tested as the chat tests do (tests/test_resilience.py), over the same
shared relay."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from proxy import json_body
from proxy.ingress import responses_writer
from proxy.ingress.responses_object import response_base
from tests.conftest import KEY, ProxyFactory, closed_port, wait_for
from tests.fake_letta import FakeLetta
from tests.fake_openai import FakeOpenAI
from tests.raw_http import DEADLINE, connect, read_answer
from tests.responses_assert import assert_responses_stream, output_text, parse_sse
from tests.responses_client import post_raw
from tests.test_resilience import FIRST_EVENT, openai_routes, pair_routes, readyz

BODY = {"model": "m", "input": "one two three"}


async def test_keepalive_comments_flow_while_the_upstream_is_silent_mid_stream(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    proxy = await make_proxy(openai_routes(fake_openai, keepalive=0.05))
    fake_openai.mode, fake_openai.delay = "silence_mid_stream", 0.5
    status, _, raw = await post_raw(proxy, {**BODY, "stream": True})
    assert status == 200
    parsed = parse_sse(raw)
    assert parsed.comments >= 2
    assert output_text(assert_responses_stream(parsed)) == "one two three"
    async with proxy.client().responses.stream(model="m", input="one two three") as stream:
        assert (await stream.get_final_response()).output_text == "one two three"


async def test_a_keepalive_commits_the_200_before_the_first_event_without_starting_early(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    proxy = await make_proxy(openai_routes(fake_openai, keepalive=0.05))
    fake_openai.mode, fake_openai.delay = "slow_first_event", 0.5
    status, _, raw = await post_raw(proxy, {**BODY, "stream": True})
    assert status == 200
    assert raw.startswith(b": keep-alive\n\n")
    assert_responses_stream(raw)


async def test_idle_timeout_after_the_commit_is_response_failed_naming_it(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    proxy = await make_proxy(
        openai_routes(fake_openai, keepalive=0.05, timeouts="{idle: 0.2}"))
    fake_openai.mode, fake_openai.delay = "silence_mid_stream", 5.0
    status, _, raw = await post_raw(proxy, {**BODY, "stream": True})
    assert status == 200
    final = assert_responses_stream(raw)
    assert final["status"] == "failed"
    assert "(timeouts.idle)" in final["error"]["message"]
    async with asyncio.timeout(1):
        await fake_openai.disconnected.wait()


@pytest.mark.parametrize("stream", [False, True], ids=["sync", "stream"])
async def test_first_event_timeout_before_the_commit_is_a_504(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI, stream: bool
) -> None:
    proxy = await make_proxy(
        openai_routes(fake_openai, keepalive=5, timeouts="{first_event: 0.2}"))
    fake_openai.mode = "slow_first_event" if stream else "slow_headers"
    fake_openai.delay = 5.0
    with pytest.raises(openai.APIStatusError) as info:
        await proxy.client().responses.create(model="m", input="x", stream=stream)
    assert info.value.status_code == 504 and info.value.code == "upstream_timeout"


@pytest.mark.parametrize(
    ("mode", "options", "stream"),
    [
        pytest.param("refused", "", False, id="refused-sync"),
        pytest.param("refused", "", True, id="refused-stream"),
        pytest.param("error500", "", True, id="answers-500-stream"),
        pytest.param("slow_headers", FIRST_EVENT, False, id="no-answer-in-time-sync"),
        pytest.param("error_event_first", "", True, id="error-event-before-anything"),
    ],
)
async def test_the_next_upstream_serves_when_the_first_fails_before_the_commit(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI, second_openai: FakeOpenAI,
    mode: str, options: str, stream: bool,
) -> None:
    a_url = f"http://127.0.0.1:{closed_port()}" if mode == "refused" else fake_openai.url
    fake_openai.mode, fake_openai.delay = mode, 5.0
    proxy = await make_proxy(pair_routes(a_url, second_openai, options))
    if stream:
        async with proxy.client().responses.stream(model="m", input="one two three") as events:
            answer = await events.get_final_response()
    else:
        answer = await proxy.client().responses.create(model="m", input="one two three")
    assert answer.output_text == "one two three"
    assert len(second_openai.received) == 1


async def test_nothing_is_retried_once_the_response_stream_was_committed(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI, second_openai: FakeOpenAI
) -> None:
    proxy = await make_proxy(
        pair_routes(fake_openai.url, second_openai, "    timeouts: {idle: 0.2}"))
    fake_openai.mode, fake_openai.delay = "silence_mid_stream", 5.0
    status, _, raw = await post_raw(proxy, {**BODY, "stream": True})
    assert status == 200 and assert_responses_stream(raw)["status"] == "failed"
    assert second_openai.received == []


@pytest.mark.parametrize("stream", [False, True], ids=["sync", "stream"])
async def test_a_client_leaving_drops_the_upstream_request_within_a_second(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI, stream: bool
) -> None:
    proxy = await make_proxy(openai_routes(fake_openai))
    fake_openai.mode = "stream_hang" if stream else "hang"
    async with aiohttp.ClientSession() as http:
        request = asyncio.create_task(http.post(
            proxy.url + "/v1/responses", json={**BODY, "stream": stream},
            headers={"Authorization": f"Bearer {KEY}"},
        ))
        await wait_for(lambda: len(fake_openai.received) == 1)
        if stream:
            resp = await request
            await resp.content.readline()
            resp.close()
        else:
            request.cancel()
        left = time.monotonic()
        await fake_openai.disconnected.wait()
        assert time.monotonic() - left < 1.0
        with contextlib.suppress(asyncio.CancelledError):
            await request


# -- what the proxy cannot encode ----------------------------------------------------------

def nested_lists(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


# 250 levels: with the levels above it, a body nested 254 deep, which orjson still writes;
# the proxy's translations add a level or two, which it does not.
DEEP = nested_lists(250)
TOO_DEEP = nested_lists(300)
DEEP_FIELDS: dict[str, dict[str, Any]] = {
    "tools": {"tools": [{"type": "function", "name": "f", "parameters": {"x": DEEP}}]},
    "text-format": {"text": {"format": {"type": "json_schema", "name": "n",
                                        "schema": {"x": DEEP}}}},
}


def three_routes(fake: FakeOpenAI, letta_url: str) -> str:
    return f"""
upstreams:
  fake: {{kind: openai, url: "{fake.url}/v1"}}
  demo: {{kind: echo}}
  letta: {{kind: letta, url: "{letta_url}"}}
models:
  m: {{upstream: fake}}
  echo: {{upstream: demo}}
  support: {{upstream: letta, agent: support-bot}}
"""


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "sync"])
@pytest.mark.parametrize("field", list(DEEP_FIELDS))
@pytest.mark.parametrize("model", ["echo", "m", "support"])
async def test_a_body_too_deep_to_write_back_is_a_400_before_anything_is_committed(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI, letta: tuple[FakeLetta, str],
    model: str, field: str, stream: bool,
) -> None:
    state, letta_url = letta
    proxy = await make_proxy(three_routes(fake_openai, letta_url))
    client = proxy.client()
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(
            model=model, input="hi", stream=stream, **DEEP_FIELDS[field])
    assert "nested too deeply" in info.value.message
    assert fake_openai.received == [] and state.message_posts() == []
    circuits = (await readyz(proxy))["upstreams"]
    assert {name: c["consecutive_failures"] for name, c in circuits.items()} == {
        "fake": 0, "demo": 0, "letta": 0}
    answer = await client.responses.create(model=model, input="hi")
    assert answer.status == "completed"


@pytest.mark.parametrize("depth", [128, 129])
async def test_chat_and_embeddings_bodies_have_the_same_depth_limit(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI, depth: int
) -> None:
    proxy = await make_proxy(openai_routes(fake_openai))
    client = proxy.client()
    # The body object is the first level.
    extra = {"x": nested_lists(depth - 1)}
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], extra_body=extra),
        lambda: client.embeddings.create(model="m", input="hi", extra_body=extra),
    ]
    for call in calls:
        if depth <= 128:
            await call()
        else:
            with pytest.raises(openai.BadRequestError, match="nested too deeply"):
                await call()
    assert len(fake_openai.received) == (2 if depth <= 128 else 0)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "sync"])
async def test_a_chat_form_too_deep_to_encode_is_the_requests_fault_not_the_upstreams(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch,
    stream: bool,
) -> None:
    # The body limit leaves room for the level the chat tool form adds: without that room
    # (as before it), the translated request is what cannot be encoded.
    monkeypatch.setattr(json_body, "MAX_DEPTH", 254)
    proxy = await make_proxy(openai_routes(fake_openai))
    client = proxy.client()
    with pytest.raises(openai.BadRequestError, match="nested too deeply"):
        await client.responses.create(
            model="m", input="hi", stream=stream, **DEEP_FIELDS["tools"])
    assert fake_openai.received == []
    assert (await readyz(proxy))["upstreams"]["fake"]["consecutive_failures"] == 0


def unencodable_echo(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every Responses stream's object holds a value too deep to encode. No request reaches
    that any more (the body's depth limit): only a stand-in shows what would happen."""
    def deep_base(*args: Any) -> dict[str, Any]:
        return {**response_base(*args), "metadata": {"x": TOO_DEEP}}
    monkeypatch.setattr(responses_writer, "response_base", deep_base)


def stream_request() -> bytes:
    body = orjson.dumps({**BODY, "stream": True})
    return (b"POST /v1/responses HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


async def test_an_event_the_proxy_cannot_encode_ends_the_stream_with_response_failed(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    unencodable_echo(monkeypatch)
    proxy = await make_proxy(openai_routes(fake_openai))
    reader, writer = await connect(proxy.url)
    try:
        writer.write(stream_request())
        answer = await read_answer(reader)
        assert answer.status == 200
        assert b"HTTP/1." not in answer.body
        parsed = parse_sse(answer.body)
        assert (parsed.done, parsed.after_done) == (1, 0)
        assert [(name, data["type"], data["sequence_number"]) for name, data in parsed.events] \
            == [("response.created", "response.created", 0),
                ("response.in_progress", "response.in_progress", 1),
                ("response.failed", "response.failed", 2)]
        failed = parsed.events[-1][1]["response"]
        assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
        assert failed["error"]["message"].startswith("The proxy failed")
        assert "metadata" not in failed
        # The connection is still in step: the next request on it is answered.
        writer.write(stream_request())
        assert (await read_answer(reader)).status == 200
    finally:
        writer.close()
    # The proxy's own failure: the upstream's circuit does not count it.
    assert (await readyz(proxy))["upstreams"]["fake"]["consecutive_failures"] == 0


async def test_a_stream_whose_error_end_cannot_be_written_is_cut_never_given_a_second_head(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    unencodable_echo(monkeypatch)
    monkeypatch.setattr(responses_writer, "failure_error", lambda err: {"x": TOO_DEEP})
    proxy = await make_proxy(openai_routes(fake_openai))
    reader, writer = await connect(proxy.url)
    try:
        writer.write(stream_request())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        # Up to the end of the connection, which the proxy closes (a reset when it dropped
        # what it had not sent): a stream that stopped short.
        rest = b""
        with contextlib.suppress(ConnectionResetError):
            while data := await asyncio.wait_for(reader.read(1 << 16), DEADLINE):
                rest += data
    finally:
        writer.close()
    assert b"HTTP/1." not in rest
    assert not rest.endswith(b"0\r\n\r\n"), "a cut, not the end of the chunked body"
    assert any("after its stream was committed" in r.getMessage() for r in caplog.records)
    assert (await readyz(proxy))["upstreams"]["fake"]["consecutive_failures"] == 0
