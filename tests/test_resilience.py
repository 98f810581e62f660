"""Resilience: keep-alives, timeouts, failover, circuits, limits, and clients that leave.

Upstreams here misbehave on purpose (tests/fake_openai.py modes, tests/fake_letta.py
scenarios). The deliberately slow ones keep quiet for a fraction of a second against timeouts
a few times shorter, so each test stays fast; the tests themselves never sleep to wait for
something: they wait on events or poll a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from tests.conftest import (
    KEY,
    Proxy,
    ProxyFactory,
    answering,
    closed_port,
    serving_fake_letta,
    wait_for,
)
from tests.fake_letta import FakeLetta, Scenario, load_json
from tests.fake_openai import FakeOpenAI

AUTH = {"Authorization": f"Bearer {KEY}"}
HI: Any = [{"role": "user", "content": "one two three"}]
RUN_ID = "run-f4ded9a4-5697-46b8-80e3-18a12f6139d7"


@pytest.fixture
async def letta_pair() -> AsyncIterator[tuple[FakeLetta, str, FakeLetta, str]]:
    async with serving_fake_letta() as (a, url_a), serving_fake_letta() as (b, url_b):
        yield a, url_a, b, url_b


def openai_routes(fake: FakeOpenAI, **options: object) -> str:
    """Model `m` on the upstream `fake`; `options` are its keys, values written as YAML."""
    keys = "".join(f"    {key}: {value}\n" for key, value in options.items())
    return f"""
upstreams:
  fake:
    kind: openai
    url: {fake.url}/v1
{keys}
models:
  m:
    upstream: fake
"""


async def letta_holding(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str], hold_after: int, options: str = ""
) -> tuple[Proxy, Scenario]:
    """The proxy's model `support` in front of `letta`, whose next run stops after `hold_after`
    events until released; `options` continue the upstream's flow mapping."""
    state, url = letta
    scenario = Scenario(hold_after=hold_after)
    state.scenarios.append(scenario)
    proxy = await make_proxy(f"""
upstreams:
  letta: {{kind: letta, url: "{url}"{options}}}
models:
  support: {{upstream: letta, agent: support-bot}}
""")
    return proxy, scenario


async def post(
    proxy: Proxy, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], str]:
    async with aiohttp.ClientSession() as http, http.post(
        proxy.url + "/v1/chat/completions", json=body, headers={**AUTH, **(headers or {})}
    ) as resp:
        return resp.status, dict(resp.headers), await resp.text()


def events_of(text: str) -> list[str]:
    return [e for e in text.split("\n\n") if e]


async def committed_stream(proxy: Proxy, model: str = "m") -> list[str]:
    """The SSE events of a whole stream, which must have been committed with a 200."""
    status, _, text = await post(proxy, {"model": model, "stream": True, "messages": HI})
    assert status == 200
    return events_of(text)


@contextlib.asynccontextmanager
async def open_stream(proxy: Proxy, model: str = "m") -> AsyncIterator[aiohttp.ClientResponse]:
    """A stream the test reads at its own pace; it stays open for the block."""
    async with aiohttp.ClientSession() as http, http.post(
        proxy.url + "/v1/chat/completions",
        json={"model": model, "stream": True, "messages": HI},
        headers=AUTH,
    ) as resp:
        yield resp


async def leave_and_time_the_upstream(
    proxy: Proxy,
    model: str,
    stream: bool,
    reached: Callable[[], Awaitable[Any]],
    upstream_gone: asyncio.Event,
) -> None:
    """Leaves once the request `reached` the upstream, as clients do: a stream by closing it
    after its first line, a sync request by giving up; the upstream must see it within 1 s."""
    async with aiohttp.ClientSession() as http:
        request = asyncio.create_task(http.post(
            proxy.url + "/v1/chat/completions",
            json={"model": model, "stream": stream, "messages": HI},
            headers=AUTH,
        ))
        await reached()
        if stream:
            resp = await request
            await resp.content.readline()
            resp.close()
        else:
            request.cancel()
        left = time.monotonic()
        await upstream_gone.wait()
        assert time.monotonic() - left < 1.0
        with contextlib.suppress(asyncio.CancelledError):
            await request


async def readyz(proxy: Proxy) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(proxy.url + "/readyz") as resp:
        body: dict[str, Any] = await resp.json()
        return body


# -- keep-alives ---------------------------------------------------------------------------


async def test_keepalive_comment_is_written_while_the_upstream_is_silent_mid_stream(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    proxy = await make_proxy(openai_routes(fake_openai, keepalive=0.05))
    fake_openai.mode, fake_openai.delay = "silence_mid_stream", 0.5
    events = await committed_stream(proxy)
    silent_at = max(i for i, e in enumerate(events) if '" three"' in e)
    assert events[silent_at + 1] == ": keep-alive"
    assert '"finish_reason":"stop"' in events[-2]
    assert events[-1] == "data: [DONE]"


async def test_openai_sdk_reads_a_stream_with_keepalives_as_if_they_were_not_there(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    proxy = await make_proxy(openai_routes(fake_openai, keepalive=0.05))
    fake_openai.mode, fake_openai.delay = "silence_mid_stream", 0.3
    stream = await proxy.client().chat.completions.create(model="m", messages=HI, stream=True)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "one two three"
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_keepalive_commits_the_200_while_the_first_event_is_late(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    proxy = await make_proxy(openai_routes(fake_openai, keepalive=0.05))
    fake_openai.mode, fake_openai.delay = "slow_first_event", 0.5
    async with open_stream(proxy) as resp:
        assert resp.status == 200
        # The 200 and a comment arrive while the upstream still has not sent an event.
        assert await resp.content.readline() == b": keep-alive\n"
        assert not fake_openai.disconnected.is_set()
        events = events_of((b": keep-alive\n" + await resp.read()).decode())
    data = [e for e in events if e.startswith("data:")]
    assert '"role":"assistant"' in data[0]
    assert data[-1] == "data: [DONE]"


async def test_letta_stream_gets_keepalives_while_the_agent_is_silent(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    # The first ping, then silence until released.
    proxy, scenario = await letta_holding(make_proxy, letta, 1, ", keepalive: 0.05")
    comments = 0
    async with open_stream(proxy, "support") as resp:
        assert resp.status == 200
        # One comment stands for Letta's ping; the others are the proxy's own.
        while comments < 3:
            line = await resp.content.readline()
            comments += line == b": keep-alive\n"
        scenario.release.set()
        rest = (await resp.read()).decode()
    assert "Echo: " in rest and rest.endswith("data: [DONE]\n\n")


# -- timeouts ------------------------------------------------------------------------------


async def test_idle_timeout_mid_stream_ends_with_an_error_event_naming_it(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    proxy = await make_proxy(openai_routes(fake_openai, keepalive=0.05, timeouts="{idle: 0.2}"))
    fake_openai.mode, fake_openai.delay = "silence_mid_stream", 5.0
    events = await committed_stream(proxy)
    assert events[-1] == "data: [DONE]"
    assert events[-2].startswith('data: {"error":')
    assert "Upstream 'fake' sent nothing for 0.2 s (timeouts.idle)" in events[-2]
    assert '"code":"upstream_timeout"' in events[-2]
    assert ": keep-alive" in events
    async with asyncio.timeout(1):
        await fake_openai.disconnected.wait()


@pytest.mark.parametrize("stream", [False, True], ids=["sync", "stream"])
async def test_first_event_timeout_before_the_commit_is_a_504(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI, stream: bool
) -> None:
    # keepalive longer than first_event: nothing is committed before the timeout fires.
    proxy = await make_proxy(
        openai_routes(fake_openai, keepalive=5, timeouts="{first_event: 0.2}")
    )
    fake_openai.mode = "slow_first_event" if stream else "slow_headers"
    fake_openai.delay = 5.0
    with pytest.raises(openai.APIStatusError) as info:
        await proxy.client().chat.completions.create(model="m", messages=HI, stream=stream)
    assert info.value.status_code == 504
    assert info.value.code == "upstream_timeout"
    assert "'fake'" in info.value.message and "(timeouts.first_event)" in info.value.message
    async with asyncio.timeout(1):
        await fake_openai.disconnected.wait()


async def test_first_event_timeout_after_a_keepalive_commit_is_an_error_event(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    proxy = await make_proxy(
        openai_routes(fake_openai, keepalive=0.05, timeouts="{first_event: 0.3}")
    )
    fake_openai.mode, fake_openai.delay = "slow_first_event", 5.0
    events = await committed_stream(proxy)
    assert events[0] == ": keep-alive"
    assert "sent no event within 0.3 s (timeouts.first_event)" in events[-2]
    assert events[-1] == "data: [DONE]"


async def test_letta_run_silent_past_idle_ends_with_an_error_event_and_is_cancelled(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    state, _ = letta
    proxy, _ = await letta_holding(make_proxy, letta, 1, ", timeouts: {idle: 0.2}")
    events = await committed_stream(proxy, "support")
    assert "Upstream 'letta' sent nothing for 0.2 s (timeouts.idle)" in events[-2]
    assert events[-1] == "data: [DONE]"
    await wait_for(lambda: RUN_ID in state.cancelled_run_ids)


async def test_letta_sync_run_silent_past_first_event_is_a_504(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    state, _ = letta
    # The 200, then not even a ping.
    proxy, scenario = await letta_holding(make_proxy, letta, 0, ", timeouts: {first_event: 0.2}")
    with pytest.raises(openai.APIStatusError) as info:
        await proxy.client().chat.completions.create(model="support", messages=HI)
    assert info.value.status_code == 504
    assert "Upstream 'letta' sent no event within 0.2 s (timeouts.first_event)" in (
        info.value.message
    )
    # The proxy reads on for the run id in its first ping, to cancel the run.
    scenario.release.set()
    await wait_for(lambda: RUN_ID in state.cancelled_run_ids)


# -- failover ------------------------------------------------------------------------------


def pair_routes(a_url: str, b: FakeOpenAI, a_options: str = "", extra: str = "") -> str:
    return f"""
upstreams:
  a:
    kind: openai
    url: {a_url}/v1
{a_options}
  b:
    kind: openai
    url: {b.url}/v1
models:
  m:
    upstream: [a, b]
{extra}
"""


FIRST_EVENT = "    timeouts: {first_event: 0.2}"
FAILURES_BEFORE_COMMIT = [
    pytest.param(mode, options, stream, id=f"{name}-{'stream' if stream else 'sync'}")
    for mode, options, name, streams in [
        ("refused", "", "connection-refused", (False, True)),
        ("error500", "", "answers-500", (False, True)),
        ("ratelimit", "", "answers-429", (False, True)),
        ("slow_headers", FIRST_EVENT, "no-answer-in-time", (False, True)),
        # Failures of a stream's body, which a sync answer does not have:
        ("slow_first_event", "    keepalive: 5\n" + FIRST_EVENT, "headers-but-no-event", (True,)),
        ("error_event_first", "", "error-event-before-anything-was-sent", (True,)),
    ]
    for stream in streams
]


@pytest.mark.parametrize(("mode", "options", "stream"), FAILURES_BEFORE_COMMIT)
async def test_next_upstream_serves_when_the_first_fails_before_anything_was_sent(
    make_proxy: ProxyFactory,
    fake_openai: FakeOpenAI,
    second_openai: FakeOpenAI,
    mode: str,
    options: str,
    stream: bool,
) -> None:
    a_url = f"http://127.0.0.1:{closed_port()}" if mode == "refused" else fake_openai.url
    fake_openai.mode, fake_openai.delay = mode, 5.0
    proxy = await make_proxy(pair_routes(a_url, second_openai, options))
    client = proxy.client()
    if stream:
        events = await client.chat.completions.create(model="m", messages=HI, stream=True)
        chunks = [c async for c in events]
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "one two three"
    else:
        reply = await client.chat.completions.create(model="m", messages=HI)
        assert reply.choices[0].message.content == "one two three"
    assert len(fake_openai.received) == (0 if mode == "refused" else 1)
    assert len(second_openai.received) == 1


async def test_nothing_is_retried_once_the_stream_was_committed(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI, second_openai: FakeOpenAI
) -> None:
    proxy = await make_proxy(
        pair_routes(fake_openai.url, second_openai, "    timeouts: {idle: 0.2}")
    )
    fake_openai.mode, fake_openai.delay = "silence_mid_stream", 5.0
    assert "(timeouts.idle)" in (await committed_stream(proxy))[-2]
    assert second_openai.received == []


async def test_a_4xx_is_the_clients_fault_and_is_not_retried(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI, second_openai: FakeOpenAI
) -> None:
    proxy = await make_proxy(pair_routes(fake_openai.url, second_openai))
    fake_openai.mode = "error400"
    with pytest.raises(openai.BadRequestError):
        await proxy.client().chat.completions.create(model="m", messages=HI)
    assert second_openai.received == []


def letta_pair_routes(url_a: str, url_b: str) -> str:
    return f"""
upstreams:
  la: {{kind: letta, url: "{url_a}"}}
  lb: {{kind: letta, url: "{url_b}"}}
models:
  support: {{upstream: [la, lb], agent: support-bot}}
"""


@pytest.mark.parametrize("stream", [False, True], ids=["sync", "stream"])
async def test_letta_message_that_may_have_been_acted_on_is_never_sent_again(
    make_proxy: ProxyFactory,
    letta_pair: tuple[FakeLetta, str, FakeLetta, str],
    stream: bool,
) -> None:
    a, url_a, b, url_b = letta_pair
    proxy = await make_proxy(letta_pair_routes(url_a, url_b))
    # A 500 from the message POST: Letta may already have stored the message.
    a.scenarios.append(Scenario(status=500, body=load_json("sync_llm_error.response.json")))
    with pytest.raises(openai.APIStatusError) as info:
        await proxy.client().chat.completions.create(model="support", messages=HI, stream=stream)
    assert info.value.status_code == 502
    assert len(a.message_posts()) == 1
    assert b.message_posts() == []


async def test_letta_message_goes_to_the_next_server_when_the_first_refuses_the_connection(
    make_proxy: ProxyFactory, letta_pair: tuple[FakeLetta, str, FakeLetta, str]
) -> None:
    _, _, b, url_b = letta_pair
    proxy = await make_proxy(letta_pair_routes(f"http://127.0.0.1:{closed_port()}", url_b))
    reply = await proxy.client().chat.completions.create(model="support", messages=HI)
    assert reply.choices[0].message.content == "Echo: token streaming please"
    assert len(b.message_posts()) == 1


# -- circuit breaker -----------------------------------------------------------------------


async def test_circuit_opens_after_consecutive_failures_then_half_opens_for_one_probe(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI, second_openai: FakeOpenAI
) -> None:
    proxy = await make_proxy(pair_routes(
        fake_openai.url, second_openai, "    circuit: {failures: 2, cooldown: 0.2}"
    ))
    fake_openai.mode = "error500"
    client = proxy.client()
    for _ in range(2):
        await client.chat.completions.create(model="m", messages=HI)
    state = (await readyz(proxy))["upstreams"]
    assert state["a"]["state"] == "open"
    assert state["a"]["consecutive_failures"] == 2
    assert state["a"]["failovers"] == 2
    assert state["b"] == {"state": "closed", "consecutive_failures": 0, "active": 0,
                          "failovers": 0}

    await client.chat.completions.create(model="m", messages=HI)
    assert len(fake_openai.received) == 2, "an open circuit is skipped"

    await wait_for(lambda: circuit(proxy, "a") == "half-open")
    await client.chat.completions.create(model="m", messages=HI)
    assert len(fake_openai.received) == 3, "half-open lets one probe through"
    assert (await readyz(proxy))["upstreams"]["a"]["state"] == "open", "the probe failed"

    fake_openai.mode = "normal"
    await wait_for(lambda: circuit(proxy, "a") == "half-open")
    await client.chat.completions.create(model="m", messages=HI)
    assert len(fake_openai.received) == 4
    assert (await readyz(proxy))["upstreams"]["a"]["state"] == "closed"
    assert len(second_openai.received) == 4


def circuit(proxy: Proxy, name: str) -> str:
    return proxy.holder.current.upstreams[name].health.state(time.monotonic())


async def test_with_every_circuit_open_the_least_recently_failed_is_tried_anyway(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI, second_openai: FakeOpenAI
) -> None:
    proxy = await make_proxy(f"""
upstreams:
  a: {{kind: openai, url: "{fake_openai.url}/v1", circuit: {{failures: 1, cooldown: 60}}}}
  b: {{kind: openai, url: "{second_openai.url}/v1", circuit: {{failures: 1, cooldown: 60}}}}
models:
  m: {{upstream: [a, b]}}
""")
    fake_openai.mode = second_openai.mode = "error500"
    client = proxy.client()
    with pytest.raises(openai.APIStatusError):
        await client.chat.completions.create(model="m", messages=HI)
    states = (await readyz(proxy))["upstreams"]
    assert states["a"]["state"] == states["b"]["state"] == "open"
    # Both cooling down: a failed first, so a is tried (and only a).
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(model="m", messages=HI)
    assert info.value.status_code == 502
    assert (len(fake_openai.received), len(second_openai.received)) == (2, 1)


async def test_circuit_state_survives_a_reload_for_an_unchanged_upstream(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI, second_openai: FakeOpenAI
) -> None:
    routes = pair_routes(fake_openai.url, second_openai, "    circuit: {failures: 1}")
    proxy = await make_proxy(routes)
    fake_openai.mode = "error500"
    await proxy.client().chat.completions.create(model="m", messages=HI)
    assert (await readyz(proxy))["upstreams"]["a"]["state"] == "open"
    proxy.routes.write_text(routes + "  other:\n    upstream: b\n")
    assert proxy.holder.reload()
    assert (await readyz(proxy))["upstreams"]["a"]["state"] == "open"
    # A changed URL is another server: it starts with a clean record.
    proxy.routes.write_text(routes.replace(fake_openai.url, fake_openai.url + "/x"))
    assert proxy.holder.reload()
    assert (await readyz(proxy))["upstreams"]["a"]["state"] == "closed"


def keyed_upstream(fake: FakeOpenAI) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """`fake`'s answer for the right credentials (key `sk-good`, header `X-Tenant: t2`),
    a 401 for any other."""

    async def handle(request: web.Request) -> web.StreamResponse:
        if (request.headers.get("Authorization") != "Bearer sk-good"
                or request.headers.get("X-Tenant") != "t2"):
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        return await fake.chat(request)

    return handle


@pytest.mark.parametrize(
    ("wrong", "fixed"),
    [("api_key: sk-bad, headers: {X-Tenant: t2}", "api_key: sk-good, headers: {X-Tenant: t2}"),
     ("api_key: sk-good, headers: {X-Tenant: t1}", "api_key: sk-good, headers: {X-Tenant: t2}")],
    ids=["api_key", "headers"],
)
async def test_fixing_an_upstreams_credentials_in_a_reload_closes_its_circuit(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI, second_openai: FakeOpenAI,
    wrong: str, fixed: str,
) -> None:
    async with answering("/v1/chat/completions", keyed_upstream(fake_openai)) as url:
        routes = f"""
upstreams:
  a: {{kind: openai, url: "{url}/v1", {wrong}, circuit: {{failures: 1, cooldown: 60}}}}
  b: {{kind: openai, url: "{second_openai.url}/v1"}}
models:
  m: {{upstream: [a, b]}}
"""
        proxy = await make_proxy(routes)
        client = proxy.client()
        await client.chat.completions.create(model="m", messages=HI)
        assert (await readyz(proxy))["upstreams"]["a"]["state"] == "open"
        proxy.routes.write_text(routes.replace(wrong, fixed))
        assert proxy.holder.reload()
        # The 401s were about the credentials just replaced: `a` serves at once.
        assert (await readyz(proxy))["upstreams"]["a"]["state"] == "closed"
        reply = await client.chat.completions.create(model="m", messages=HI)
        assert reply.choices[0].message.content == "one two three"
        assert len(fake_openai.received) == 1
        assert len(second_openai.received) == 1


async def test_a_half_open_upstream_takes_one_probe_when_many_requests_reach_it_at_once(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    """Five requests plan the route [x, a] while `a` is half-open, and all reach `a` together,
    once `x` failed them: the first is the probe, the others must not follow it."""
    many = 5
    at_x: list[web.Request] = []
    all_at_x = asyncio.Event()

    async def failing_together(request: web.Request) -> web.StreamResponse:
        at_x.append(request)
        if len(at_x) == many:
            all_at_x.set()
        await all_at_x.wait()
        return web.json_response({"error": {"message": "down"}}, status=500)

    async with answering("/v1/chat/completions", failing_together) as x_url:
        proxy = await make_proxy(f"""
upstreams:
  x: {{kind: openai, url: "{x_url}/v1", circuit: {{failures: 100}}}}
  a: {{kind: openai, url: "{fake_openai.url}/v1", circuit: {{failures: 1, cooldown: 1.0}}}}
models:
  m: {{upstream: [x, a]}}
  direct: {{upstream: a}}
""")
        # The cool-down is also how long the hung probe keeps the others out: long enough
        # for five requests failed together to reach `a` on a slow machine.
        client = proxy.client()
        fake_openai.mode = "error500"
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="direct", messages=HI)
        await wait_for(lambda: circuit(proxy, "a") == "half-open")
        fake_openai.mode = "hang"  # the probe never answers
        requests = [asyncio.ensure_future(client.chat.completions.create(model="m", messages=HI))
                    for _ in range(many)]
        try:
            await wait_for(lambda: sum(r.done() for r in requests) == many - 1)
            for request in requests:
                if request.done():
                    assert isinstance(request.exception(), openai.InternalServerError)
            # One failed attempt (direct), one probe (whose request may still be on its way).
            await wait_for(lambda: len(fake_openai.received) >= 2)
            assert len(fake_openai.received) == 2
        finally:
            for request in requests:
                request.cancel()
            await asyncio.gather(*requests, return_exceptions=True)


async def test_a_hung_probe_lets_the_next_one_through_after_a_cool_down(
    make_proxy: ProxyFactory, second_openai: FakeOpenAI
) -> None:
    calls = 0
    forever = asyncio.Event()

    async def upstream(request: web.Request) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        if calls > 1:
            await forever.wait()  # every probe hangs, within its 300 s `first_event`
        return web.json_response({"error": {"message": "down"}}, status=500)

    async with answering("/v1/chat/completions", upstream) as url:
        proxy = await make_proxy(pair_routes(
            url, second_openai, "    circuit: {failures: 1, cooldown: 0.2}"))
        client = proxy.client()
        tasks: list[asyncio.Future[Any]] = []
        try:
            await client.chat.completions.create(model="m", messages=HI)  # opens `a`
            deadline = time.monotonic() + 5
            while calls < 3:
                assert time.monotonic() < deadline, "no second probe after the first hung"
                before = calls
                task = asyncio.ensure_future(client.chat.completions.create(model="m",
                                                                            messages=HI))
                tasks.append(task)
                # Served by `b`, or hung at `a`.
                await wait_for(lambda: task.done() or calls > before)  # noqa: B023
            assert sum(not t.done() for t in tasks) == 2, "one probe per cool-down, no more"
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            forever.set()


async def test_requests_queued_for_a_half_open_upstream_send_it_one_probe(
    make_proxy: ProxyFactory,
) -> None:
    """`a`'s three slots are held by two requests begun while it was closed and by a probe
    that hangs (a single-upstream route tries it anyway), old enough that `a` takes another.
    Three requests that `b` refuses queue for `a`; the two slow ones then end together: the
    first queued request is the probe, the others must not follow it."""
    ended = asyncio.Event()
    slow_done = asyncio.Event()
    seen: list[str] = []

    async def upstream(request: web.Request) -> web.StreamResponse:
        which = (await request.json())["messages"][0]["content"]
        seen.append(which)
        if which == "fail":
            return web.json_response({"error": {"message": "down"}}, status=500)
        await (slow_done if which == "slow" else ended).wait()
        return web.json_response({"error": {"message": "not this"}}, status=400)

    def ask(model: str, what: str) -> asyncio.Future[Any]:
        return asyncio.ensure_future(client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": what}]))

    tasks: list[asyncio.Future[Any]] = []
    async with answering("/v1/chat/completions", upstream) as url:
        proxy = await make_proxy(f"""
upstreams:
  a: {{kind: openai, url: "{url}/v1", max_concurrency: 3, queue_timeout: 30,
       circuit: {{failures: 1, cooldown: 0.3}}}}
  b: {{kind: openai, url: "http://127.0.0.1:{closed_port()}/v1", circuit: {{failures: 100}}}}
models:
  m: {{upstream: [a, b]}}
  direct: {{upstream: a}}
""")
        client = proxy.client()
        health = proxy.holder.current.upstreams["a"].health
        try:
            tasks += [ask("m", "slow"), ask("m", "slow")]
            await wait_for(lambda: seen.count("slow") == 2)
            with pytest.raises(openai.InternalServerError):
                await client.chat.completions.create(
                    model="direct", messages=[{"role": "user", "content": "fail"}])
            tasks.append(ask("direct", "hang"))
            await wait_for(lambda: "hang" in seen)
            await wait_for(lambda: health.usable(time.monotonic()))
            queued = [ask("m", "queued") for _ in range(3)]
            tasks += queued
            await wait_for(lambda: health.queued == 3)
            slow_done.set()
            await wait_for(lambda: seen.count("queued") > 1
                           or (seen.count("queued") == 1 and sum(q.done() for q in queued) == 2))
            assert seen.count("queued") == 1, "one probe, not one per freed slot"
            for request in queued:
                if request.done():
                    assert isinstance(request.exception(), openai.InternalServerError)
        finally:
            ended.set()
            slow_done.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def test_failovers_are_counted_in_metrics(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI, second_openai: FakeOpenAI
) -> None:
    proxy = await make_proxy(pair_routes(fake_openai.url, second_openai))
    fake_openai.mode = "error500"
    await proxy.client().chat.completions.create(model="m", messages=HI)
    async with aiohttp.ClientSession() as http, http.get(proxy.url + "/metrics") as resp:
        text = await resp.text()
    assert 'agentproxy_failovers_total{upstream="a"} 1.0' in text


# -- limits --------------------------------------------------------------------------------


async def test_max_concurrency_full_queue_wait_ends_in_429_with_retry_after(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    proxy = await make_proxy(openai_routes(fake_openai, max_concurrency=1, queue_timeout=0.2))
    fake_openai.mode = "stream_hang"
    async with open_stream(proxy) as held:
        await held.content.readline()
        with pytest.raises(openai.RateLimitError) as info:
            await proxy.client().chat.completions.create(model="m", messages=HI)
        assert info.value.response.headers["Retry-After"] == "1"
        assert info.value.code == "upstream_busy"
        assert "max_concurrency" in info.value.message
        assert len(fake_openai.received) == 1
        fake_openai.release.set()
        await held.read()
    await wait_for(lambda: proxy.holder.current.upstreams["fake"].health.active == 0)


async def test_max_concurrency_queued_request_runs_when_a_slot_frees(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    proxy = await make_proxy(openai_routes(fake_openai, max_concurrency=1, queue_timeout=30))
    fake_openai.mode = "hang"
    client = proxy.client()
    first = asyncio.create_task(client.chat.completions.create(model="m", messages=HI))
    await wait_for(lambda: len(fake_openai.received) == 1)
    second = asyncio.create_task(client.chat.completions.create(model="m", messages=HI))
    await wait_for(lambda: proxy.holder.current.upstreams["fake"].health.queued == 1)
    assert len(fake_openai.received) == 1
    fake_openai.release.set()
    replies = await asyncio.gather(first, second)
    assert [r.choices[0].message.content for r in replies] == ["one two three"] * 2


async def test_oversized_request_headers_are_an_openai_shaped_431(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    proxy = await make_proxy(openai_routes(fake_openai))
    status, headers, text = await post(
        proxy, {"model": "m", "messages": HI}, {"X-Big": "x" * 20_000}
    )
    assert status == 431
    assert headers["Content-Type"].startswith("application/json")
    assert '"code":"request_header_fields_too_large"' in text
    assert fake_openai.received == []


async def test_request_headers_count_together_against_the_16_kib_limit(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    # Each header alone is far below the limit; only their sum (names and values) is over.
    proxy = await make_proxy(openai_routes(fake_openai))
    over = {f"X-Part-{n}": "x" * 6_000 for n in range(3)}
    status, _, text = await post(proxy, {"model": "m", "messages": HI}, over)
    assert status == 431
    assert '"code":"request_header_fields_too_large"' in text
    assert fake_openai.received == []
    under = {f"X-Part-{n}": "x" * 4_000 for n in range(3)}
    status, _, _ = await post(proxy, {"model": "m", "messages": HI}, under)
    assert status == 200


async def test_over_max_connections_is_a_503_with_retry_after_but_probes_still_answer(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    proxy = await make_proxy(openai_routes(fake_openai), max_connections=1)
    fake_openai.mode = "stream_hang"
    async with open_stream(proxy) as held:
        await held.content.readline()
        status, headers, text = await post(proxy, {"model": "m", "messages": HI})
        assert status == 503
        assert headers["Retry-After"] == "1"
        assert headers["Connection"] == "close"
        assert '"code":"too_many_connections"' in text
        async with aiohttp.ClientSession() as http, http.get(proxy.url + "/healthz") as probe:
            assert probe.status == 200
        fake_openai.release.set()
        await held.read()


# -- clients that leave --------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["sync", "stream"])
async def test_client_leaving_drops_the_openai_upstream_request_within_a_second(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI, stream: bool
) -> None:
    proxy = await make_proxy(openai_routes(fake_openai))
    fake_openai.mode = "stream_hang" if stream else "hang"

    async def reached() -> None:
        await wait_for(lambda: len(fake_openai.received) == 1)

    await leave_and_time_the_upstream(proxy, "m", stream, reached, fake_openai.disconnected)


@pytest.mark.parametrize("stream", [False, True], ids=["sync", "stream"])
async def test_client_leaving_drops_the_letta_request_within_a_second_and_cancels_the_run(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str], stream: bool
) -> None:
    state, _ = letta
    proxy, scenario = await letta_holding(make_proxy, letta, 1)
    await leave_and_time_the_upstream(
        proxy, "support", stream, scenario.held.wait, state.disconnect_seen
    )
    await wait_for(lambda: RUN_ID in state.cancelled_run_ids)


def test_max_connections_comes_from_the_flag_or_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from proxy.cli import _parser

    assert _parser().parse_args(["serve"]).max_connections == 1000
    assert _parser().parse_args(["serve", "--max-connections", "5"]).max_connections == 5
    monkeypatch.setenv("AGENTPROXY_MAX_CONNECTIONS", "7")
    assert _parser().parse_args(["serve"]).max_connections == 7


# -- what an upstream's error says ---------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error_class", "says"),
    [
        (400, openai.BadRequestError, '{"deep":"x"}'),
        (500, openai.InternalServerError, """Upstream 'a' failed with HTTP 500: {"deep":"x"}"""),
    ],
)
async def test_an_upstream_error_message_that_is_not_a_string_reaches_the_client_as_json(
    make_proxy: ProxyFactory, status: int, error_class: type[openai.APIStatusError], says: str
) -> None:
    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": {"deep": "x"}}}, status=status)

    async with answering("/v1/chat/completions", refuse) as url:
        proxy = await make_proxy(
            f"upstreams:\n  a: {{kind: openai, url: {url}/v1}}\nmodels:\n  m: {{upstream: a}}\n"
        )
        with pytest.raises(error_class) as caught:
            await proxy.client().chat.completions.create(model="m", messages=HI)
    # JSON, as the upstream wrote it; a Python repr ({'deep': 'x'}) would show the proxy's
    # insides to the client.
    assert caught.value.body["message"] == says  # type: ignore[index]


async def test_a_mid_stream_error_message_that_is_not_a_string_reaches_the_client_as_json(
    make_proxy: ProxyFactory,
) -> None:
    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(
            b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
            b'"choices":[{"index":0,"delta":{"role":"assistant","content":"a"}}]}\n\n'
            b'data: {"error":{"message":{"deep":"x"}}}\n\n'
        )
        return response

    async with answering("/v1/chat/completions", stream) as url:
        proxy = await make_proxy(
            f"upstreams:\n  a: {{kind: openai, url: {url}/v1}}\nmodels:\n  m: {{upstream: a}}\n"
        )
        chunks = await proxy.client().chat.completions.create(
            model="m", messages=HI, stream=True
        )
        with pytest.raises(openai.APIError) as caught:
            async for _ in chunks:
                pass
    assert caught.value.message.endswith(
        """Upstream 'a' reported an error mid-stream: {"deep":"x"}"""
    ), caught.value.message


def test_a_probe_given_up_on_after_a_newer_one_began_leaves_the_newer_ones_turn() -> None:
    # A hung probe lets one more through each cool-down; when the old one then ends without
    # a verdict (its client left), the newer probe is still under way: no third may follow.
    from proxy.config.schema import parse_config
    from proxy.upstreams.health import HealthRegistry

    config = parse_config(
        "upstreams:\n  a: {kind: openai, url: 'http://127.0.0.1:1/v1',"
        " circuit: {failures: 1, cooldown: 0.05}}\nmodels:\n  m: {upstream: a}\n"
    )
    health = HealthRegistry().get(config.upstreams["a"])
    health.failed(time.monotonic())
    time.sleep(0.06)  # the clock, not synchronisation: the cool-down must have passed
    old = health.begin()
    assert old and not health.usable(time.monotonic())
    time.sleep(0.06)
    assert health.usable(time.monotonic())  # the old probe hangs: one more goes through
    newer = health.begin()
    assert newer
    health.abandoned(old)
    assert not health.usable(time.monotonic())
    health.abandoned(newer)
    assert health.usable(time.monotonic())
