"""Resilience of `/v1/responses`: keep-alives, timeouts, failover before the commit, and
clients that leave, tested as the chat tests do (tests/test_resilience.py), over the same
shared relay."""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
import openai
import pytest

from tests.conftest import KEY, ProxyFactory, closed_port, wait_for
from tests.fake_openai import FakeOpenAI
from tests.responses_assert import assert_responses_stream, output_text, parse_sse
from tests.responses_client import post_raw
from tests.test_resilience import FIRST_EVENT, openai_routes, pair_routes

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
