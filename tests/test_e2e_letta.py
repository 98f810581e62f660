"""End to end: the OpenAI SDK -> agentproxy -> a fake Letta server replaying captured traffic."""

from __future__ import annotations

import asyncio
import copy
import logging
import re
import sys
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from openai.types.chat import ChatCompletionChunk

from proxy import routing
from proxy.app import create_app
from proxy.app_keys import DRAIN
from proxy.exchange import Exchange
from proxy.reload import TableHolder
from tests.conftest import KEY, Proxy, ProxyFactory, closed_port, serving, wait_for
from tests.fake_letta import FakeLetta, Scenario, sse_events

AGENT = "agent-ef37cb35-73b3-4511-b1bb-1c9635553e28"
RUN_ID = "run-f4ded9a4-5697-46b8-80e3-18a12f6139d7"
OTHER_KEY = "sk-other-0000000000000000"
HI = [{"role": "user", "content": "hi"}]


def routes(url: str, model_extra: str = "", extra: str = "") -> str:
    return f"""
upstreams:
  letta:
    kind: letta
    url: {url}
    api_key: ${{LETTA_PASS:-letta-pass}}
models:
  support:
    upstream: letta
    agent: support-bot
{model_extra}
  "letta/*":
    upstream: letta
{extra}
"""


async def make(make_proxy: ProxyFactory, url: str, model_extra: str = "", extra: str = "") -> Proxy:
    return await make_proxy(routes(url, model_extra, extra), keys=(KEY, OTHER_KEY))


def one_agent_routes(url: str, model: str, agent: str) -> str:
    return (
        f"upstreams:\n  letta: {{kind: letta, url: '{url}'}}\n"
        f"models:\n  {model}: {{upstream: letta, agent: {agent}}}\n"
    )


async def letta_receives(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str], messages: Any, model_extra: str = ""
) -> Any:
    """What Letta gets as `messages` when the client sends these to the support route."""
    state, url = letta
    client = (await make(make_proxy, url, model_extra)).client()
    await client.chat.completions.create(model="support", messages=messages)
    return state.message_posts()[-1].json["messages"]


async def support_stream(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str], sse: str
) -> list[ChatCompletionChunk]:
    """The chunks of a stream from the support route while Letta replays the capture `sse`."""
    state, url = letta
    state.default_scenario = Scenario(sse=sse)
    client = (await make(make_proxy, url)).client()
    stream = await client.chat.completions.create(model="support", messages=HI, stream=True)
    return [c async for c in stream]


async def with_held_runs(make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]) -> Proxy:
    """The proxy in front of a Letta whose runs stop after two events until the client leaves."""
    state, url = letta
    state.default_scenario = Scenario(hold_after=2)
    return await make(make_proxy, url)


def has_tool_calls(chunk: ChatCompletionChunk) -> bool:
    return bool(chunk.choices and chunk.choices[0].delta.tool_calls)



def stream_support(http: aiohttp.ClientSession, proxy: Proxy) -> Any:
    """A raw streamed chat request to the `support` route (a response context manager)."""
    return http.post(
        proxy.url + "/v1/chat/completions",
        json={"model": "support", "stream": True, "messages": HI},
        headers={"Authorization": f"Bearer {KEY}"},
    )

async def test_sync_chat_answers_with_the_agents_text_and_real_usage(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    state, url = letta
    client = (await make(make_proxy, url)).client()
    reply = await client.chat.completions.create(model="support", messages=HI)
    assert reply.choices[0].message.content == "Echo: token streaming please"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.model == "support"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (460, 4)
    post = state.message_posts()[-1]
    assert post.path == f"/v1/agents/{AGENT}/messages"
    assert post.json["streaming"] is True and post.json["stream_tokens"] is True
    assert post.json["messages"] == [{"role": "user", "content": "hi"}]
    assert post.headers["X-Stainless-Package-Version"] == "1.0.0"
    assert post.headers["Authorization"] == "Bearer letta-pass"
    assert KEY not in str(post.headers)


async def test_stream_delivers_tokens_then_usage_chunk(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    _, url = letta
    client = (await make(make_proxy, url)).client()
    stream = await client.chat.completions.create(
        model="support", messages=HI, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert pieces == ["Echo: ", "token ", "streaming ", "please"]
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 464
    assert len({c.id for c in chunks}) == 1


@pytest.mark.parametrize("number", [b"1e400", b"9" * 400])
async def test_usage_whose_numbers_cannot_be_read_is_usage_not_reported(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str], tmp_path: Path, number: bytes
) -> None:
    state, url = letta
    events = [
        re.sub(rb'"prompt_tokens":460', b'"prompt_tokens":' + number, e)
        for e in sse_events("stream_tokens")
    ]
    unreadable = tmp_path / "unreadable_usage.sse"
    unreadable.write_bytes(b"".join(events))
    client = (await make(make_proxy, url)).client()
    state.scenarios.append(Scenario(sse=str(unreadable)))
    reply = await client.chat.completions.create(model="support", messages=HI)
    assert reply.choices[0].message.content == "Echo: token streaming please"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.total_tokens == 0
    state.scenarios.append(Scenario(sse=str(unreadable)))
    stream = await client.chat.completions.create(
        model="support", messages=HI, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "Echo: token streaming please"
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 0


async def test_agent_given_by_id_needs_no_lookup(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    state, url = letta
    proxy = await make_proxy(one_agent_routes(f"{url}/v1", "bot", AGENT))
    reply = await proxy.client().chat.completions.create(model="bot", messages=HI)
    assert reply.choices[0].message.content == "Echo: token streaming please"
    assert not [r for r in state.requests if r.path == "/v1/agents/"]
    assert "Authorization" not in state.message_posts()[-1].headers


async def test_wildcard_lists_every_agent_and_shared_names_by_id(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    state, url = letta
    monkeypatch.setattr(routing, "LISTING_TTL", 0.0)
    client = (await make(make_proxy, url)).client()
    ids = [m.id for m in (await client.models.list()).data]
    assert ids == ["support", "letta/support-bot"]
    twin = copy.deepcopy(state.agents[0]) | {
        "id": "agent-11111111-2222-4333-8444-555555555555", "name": "support-bot"}
    solo = copy.deepcopy(state.agents[0]) | {
        "id": "agent-99999999-2222-4333-8444-555555555555", "name": "billing"}
    state.agents += [twin, solo]
    ids = [m.id for m in (await client.models.list()).data]
    assert ids == ["support", f"letta/{AGENT}", f"letta/{twin['id']}", "letta/billing"]
    reply = await client.chat.completions.create(model="letta/billing", messages=HI)
    assert reply.choices[0].message.content == "Echo: token streaming please"
    assert state.message_posts()[-1].path == f"/v1/agents/{solo['id']}/messages"
    await client.chat.completions.create(model=f"letta/{twin['id']}", messages=HI)
    assert state.message_posts()[-1].path == f"/v1/agents/{twin['id']}/messages"
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="letta/nobody", messages=HI)


async def test_a_letta_that_repeats_its_agents_page_is_listed_by_name_in_two_requests(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    state, url = letta
    # The fake ignores `limit` and `after`, as a server with broken paging would: a full page
    # comes back the same however often it is asked for.
    state.agents = [
        copy.deepcopy(state.agents[0])
        | {"id": f"agent-00000000-0000-4000-8000-{n:012d}", "name": f"bot-{n}"}
        for n in range(100)
    ]
    client = (await make(make_proxy, url)).client()
    ids = [m.id for m in (await client.models.list()).data]
    assert ids[1:] == [f"letta/bot-{n}" for n in range(100)]
    assert len(state.requests_to("GET", "/v1/agents/")) == 2


async def test_an_agent_whose_name_is_not_text_is_listed_by_id(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    state, url = letta
    odd = copy.deepcopy(state.agents[0]) | {
        "id": "agent-11111111-2222-4333-8444-555555555555", "name": {"first": "x"}}
    state.agents.append(odd)
    client = (await make(make_proxy, url)).client()
    ids = [m.id for m in (await client.models.list()).data]
    assert ids == ["support", "letta/support-bot", f"letta/{odd['id']}"]


async def test_listed_agents_have_a_sane_created_and_a_name_a_client_can_send_back(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    state, url = letta
    state.agents[0]["created_at"] = "2025-01-02T03:04:05Z"
    odd = [
        ("0001-01-01T00:00:00Z", "ancient"),
        ("1969-12-31T23:59:59+00:00", "pre-epoch"),
        ("0001-01-01T00:00:00", "naive"),
        ("not a date", "x" * 256),
        ("2025-01-02T03:04:05Z", "y" * 257),
        ("2025-01-02T03:04:05Z", "agent-11111111-2222-4333-8444-555555555555"),
    ]
    for n, (created_at, name) in enumerate(odd):
        state.agents.append(copy.deepcopy(state.agents[0]) | {
            "id": f"agent-00000000-0000-4000-8000-{n:012d}", "name": name,
            "created_at": created_at})
    client = (await make(make_proxy, url)).client()
    cards = (await client.models.list()).data
    listed = {m.id: m.created for m in cards}
    table_time = listed["support"]
    assert listed["letta/support-bot"] == 1735787045
    for name in ("ancient", "pre-epoch", "naive", "x" * 256):
        assert listed[f"letta/{name}"] == table_time
    # Too long to send back, or taken for another agent's id: listed by the agent's own id.
    assert f"letta/{'y' * 257}" not in listed
    assert "letta/agent-00000000-0000-4000-8000-000000000004" in listed
    assert "letta/agent-11111111-2222-4333-8444-555555555555" not in listed
    assert "letta/agent-00000000-0000-4000-8000-000000000005" in listed
    reply = await client.chat.completions.create(model=f"letta/{'x' * 256}", messages=HI)
    assert reply.choices[0].message.content == "Echo: token streaming please"


async def listing_peak(make_proxy: ProxyFactory, count: int) -> int:
    """The proxy's peak of traced memory while it lists `count` agents, in pages of 100,
    each agent with a 10 KB system prompt as Letta's objects carry."""
    ids = [f"agent-00000000-0000-4000-8000-{n:012d}" for n in range(count)]
    pages = {
        after: orjson.dumps([
            {"id": agent, "name": f"bot-{n}", "system": f"{n}" + "s" * 10_000}
            for n, agent in enumerate(ids[start:start + 100], start)
        ])
        for start, after in zip(range(0, count, 100), ["", *ids[99::100]], strict=False)
    }

    async def agents(request: web.Request) -> web.Response:
        return web.Response(
            body=pages.get(request.query.get("after", ""), b"[]"),
            content_type="application/json",
        )

    app = web.Application()
    app.router.add_get("/v1/agents/", agents)
    async with serving(app) as url:
        client = (await make(make_proxy, url)).client()
        tracemalloc.start()
        try:
            listed = (await client.models.list()).data
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert len(listed) == count + 1
    return peak


async def test_a_long_agent_listing_keeps_only_what_the_cards_need(
    make_proxy: ProxyFactory,
) -> None:
    # Kept whole until the last page, 3,000 agents would hold 30 MB more than 300 do.
    small = await listing_peak(make_proxy, 300)
    large = await listing_peak(make_proxy, 3000)
    assert large - small < 10_000_000, (small, large)


async def test_model_listings_that_arrive_together_share_one_walk_of_the_agents(
    make_proxy: ProxyFactory,
) -> None:
    asked: list[str] = []
    release = asyncio.Event()

    async def agents(request: web.Request) -> web.Response:
        asked.append(request.path_qs)
        await release.wait()
        return web.json_response([{"id": AGENT, "name": "support-bot"}])

    app = web.Application()
    app.router.add_get("/v1/agents/", agents)
    async with serving(app) as url:
        client = (await make(make_proxy, url)).client()
        listings = [asyncio.ensure_future(client.models.list()) for _ in range(10)]
        await wait_for(lambda: len(asked) >= 1)
        release.set()
        for listing in listings:
            assert [m.id for m in (await listing).data] == ["support", "letta/support-bot"]
    assert len(asked) == 1


@pytest.mark.parametrize("both", [True, False], ids=["both-cancelled", "lister-cancelled"])
async def test_a_listing_waiter_lists_itself_only_when_the_lister_alone_went_away(
    tmp_path: Path, both: bool
) -> None:
    # A request waiting for another's listing, both cancelled at once (their clients gone, or
    # the shutdown), took the listing's cancellation for its own cue to list: it swallowed
    # its own cancellation and asked the server again for nobody.
    asked: list[str] = []

    async def agents(request: web.Request) -> web.Response:
        asked.append(request.path_qs)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    app = web.Application()
    app.router.add_get("/v1/agents/", agents)
    async with serving(app) as url, aiohttp.ClientSession() as http:
        path = tmp_path / "routes.yaml"
        path.write_text(routes(url))
        [route] = [r for r in TableHolder(path, (KEY,)).current.routes if r.name == "letta/*"]

        async def cards() -> list[dict[str, Any]]:
            return await route.upstream_cards(http, Exchange(0.0, "req", asyncio.current_task()))

        lister = asyncio.create_task(cards())
        await wait_for(lambda: len(asked) == 1)
        waiter = asyncio.create_task(cards())
        await asyncio.sleep(0)  # one step, not a wait: the waiter now awaits the listing
        lister.cancel()
        if both:
            waiter.cancel()
            await asyncio.wait([lister, waiter], timeout=5)
            assert lister.cancelled() and waiter.cancelled()
            assert len(asked) == 1
        else:
            await wait_for(lambda: len(asked) == 2)  # the waiter lists in its place
            assert lister.cancelled() and not waiter.done()
            waiter.cancel()
            await asyncio.wait([waiter], timeout=5)


async def test_full_history_resent_by_open_webui_reaches_the_agent_as_the_new_turn_only(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    received = await letta_receives(make_proxy, letta, [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second question"},
    ])
    assert received == [{"role": "user", "content": "second question"}]


async def test_client_system_prepend_puts_the_system_text_before_the_user_text(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    received = await letta_receives(
        make_proxy, letta,
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        "    client_system: prepend",
    )
    content = received[0]["content"]
    text = content if isinstance(content, str) else content[0]["text"]
    assert text.startswith("Be brief.") and text.endswith("hi")


async def test_image_parts_become_letta_image_content(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    received = await letta_receives(make_proxy, letta, [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
    ]}])
    parts = received[0]["content"]
    assert parts[0] == {"type": "text", "text": "what is this?"}
    assert parts[1]["type"] == "image"
    assert parts[1]["source"]["url"] == "https://example.com/cat.png"


async def test_session_ids_get_separate_conversations_namespaced_by_key(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    state, url = letta
    proxy = await make(make_proxy, url)
    alice, other = proxy.client(), proxy.client(OTHER_KEY)

    async def ask(client: openai.AsyncOpenAI, session: str) -> str:
        reply = await client.chat.completions.create(
            model="support", messages=HI, extra_headers={"X-Session-Id": session}
        )
        assert reply.choices[0].message.content == "Echo: hello from alice thread"
        return str(state.message_posts()[-1].path)

    first = await ask(alice, "alice")
    again = await ask(alice, "alice")
    bob = await ask(alice, "bob")
    same_hint_other_key = await ask(other, "alice")
    assert first == again
    assert first.startswith("/v1/conversations/conv-")
    assert len({first, bob, same_hint_other_key}) == 3
    assert len(state.conversations) == 3
    summaries = [c["summary"] for c in state.conversations]
    assert all("alice" not in s and KEY not in s for s in summaries)
    await alice.chat.completions.create(model="support", messages=HI)
    assert state.message_posts()[-1].path == f"/v1/agents/{AGENT}/messages"


@pytest.mark.parametrize(
    "header",
    ["X-Session-Id", "X-OpenWebUI-Chat-Id", "X-LibreChat-Conversation-Id"],
)
async def test_each_client_session_header_selects_a_conversation(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str], header: str
) -> None:
    state, url = letta
    client = (await make(make_proxy, url)).client()
    await client.chat.completions.create(
        model="support", messages=HI, extra_headers={header: "chat-42"}
    )
    assert state.message_posts()[-1].path.startswith("/v1/conversations/conv-")


async def test_user_field_is_a_session_hint_only_where_the_route_opts_in(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    state, url = letta
    client = (await make(make_proxy, url, "    session: {from_user: true}")).client()
    await client.chat.completions.create(model="support", messages=HI, user="u-7")
    assert state.message_posts()[-1].path.startswith("/v1/conversations/")
    await client.chat.completions.create(model="letta/support-bot", messages=HI, user="u-7")
    assert state.message_posts()[-1].path == f"/v1/agents/{AGENT}/messages"


async def test_per_key_default_gives_each_key_its_own_thread_without_a_hint(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    state, url = letta
    proxy = await make(make_proxy, url, "    session: {without_hint: per_key}")
    await proxy.client().chat.completions.create(model="support", messages=HI)
    await proxy.client(OTHER_KEY).chat.completions.create(model="support", messages=HI)
    paths = [p.path for p in state.message_posts()]
    assert all(p.startswith("/v1/conversations/") for p in paths)
    assert paths[0] != paths[1]


async def test_racing_first_requests_settle_on_the_oldest_conversation(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    state, url = letta
    proxy = await make(make_proxy, url)
    client = proxy.client()
    await asyncio.gather(*[
        client.chat.completions.create(
            model="support", messages=HI, extra_headers={"X-Session-Id": "race"}
        )
        for _ in range(3)
    ])
    oldest = min(state.conversations, key=lambda c: c["created_at"])
    assert {p.path for p in state.message_posts()} == {f"/v1/conversations/{oldest['id']}/messages"}


def cancel_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [m for r in caplog.records if (m := r.getMessage()).startswith("cancelled Letta run")]


async def test_closing_the_client_mid_stream_cancels_the_letta_run(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "proxy.upstreams.letta")
    state, _ = letta
    proxy = await with_held_runs(make_proxy, letta)
    async with aiohttp.ClientSession() as http:
        resp = await stream_support(http, proxy)
        await resp.content.readline()
        await state.default_scenario.held.wait()
        resp.close()
    await wait_for(lambda: RUN_ID in state.cancelled_run_ids)
    await wait_for(lambda: len(state.disconnected) == 1)
    assert cancel_lines(caplog) == [f"cancelled Letta run {RUN_ID} after the client left"]


async def test_a_run_cancelled_after_its_stream_broke_is_logged_as_the_upstreams_failure(
    make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "proxy.upstreams.letta")
    app = broken_run({"message_type": "ping", "run_id": RUN_ID}, {
        "message_type": "assistant_message", "otid": "o1", "content": "partial"})
    async with serving(app) as url:
        proxy = await make_proxy(one_agent_routes(url, "m", AGENT))
        stream = await proxy.client().chat.completions.create(
            model="m", messages=HI, stream=True
        )
        with pytest.raises(openai.APIError):
            [c async for c in stream]
        await wait_for(lambda: cancel_lines(caplog))
    assert cancel_lines(caplog) == [
        f"cancelled Letta run {RUN_ID} after the upstream's stream failed"
    ]


async def test_a_run_cancelled_after_the_upstream_went_idle_is_logged_as_a_timeout(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "proxy.upstreams.letta")
    state, url = letta
    state.default_scenario = Scenario(hold_after=2)
    proxy = await make_proxy(
        f"upstreams:\n  letta: {{kind: letta, url: '{url}', timeouts: {{idle: 0.2}}}}\n"
        f"models:\n  m: {{upstream: letta, agent: {AGENT}}}\n"
    )
    with pytest.raises(openai.APIStatusError) as info:
        await proxy.client().chat.completions.create(model="m", messages=HI)
    assert info.value.status_code == 504
    await wait_for(lambda: RUN_ID in state.cancelled_run_ids)
    await wait_for(lambda: cancel_lines(caplog))
    assert cancel_lines(caplog) == [f"cancelled Letta run {RUN_ID} after the upstream timed out"]


async def test_a_run_cancelled_by_the_shutdown_drain_is_logged_as_the_shutdown(
    letta: tuple[FakeLetta, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "proxy.upstreams.letta")
    state, url = letta
    state.default_scenario = Scenario(hold_after=2)
    path = tmp_path / "routes.yaml"
    path.write_text(routes(url))
    app = create_app(TableHolder(path, (KEY,)), drain_timeout=0.05)
    async with serving(app) as proxy_url, aiohttp.ClientSession() as http:
        async with http.post(
            proxy_url + "/v1/chat/completions",
            json={"model": "support", "stream": True, "messages": HI},
            headers={"Authorization": f"Bearer {KEY}"},
        ) as resp:
            await state.default_scenario.held.wait()
            await app[DRAIN].wait()
            body = await resp.read()
        assert body.endswith(b"data: [DONE]\n\n")
        await wait_for(lambda: RUN_ID in state.cancelled_run_ids)
        await wait_for(lambda: cancel_lines(caplog))
    assert cancel_lines(caplog) == [f"cancelled Letta run {RUN_ID} after the proxy's shutdown"]


async def test_sync_client_that_gives_up_cancels_the_letta_run(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    state, _ = letta
    proxy = await with_held_runs(make_proxy, letta)
    client = openai.AsyncOpenAI(
        base_url=proxy.url + "/v1", api_key=KEY, max_retries=0, timeout=30
    )
    task = asyncio.create_task(client.chat.completions.create(model="support", messages=HI))
    await state.default_scenario.held.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await client.close()
    await wait_for(lambda: RUN_ID in state.cancelled_run_ids)


async def test_the_next_message_reaches_letta_only_after_the_left_runs_cancel(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str], tmp_path: Path
) -> None:
    state, url = letta
    # A run whose id comes late: the cancel reads on for it, half a second.
    ping, message, *rest = sse_events("stream_tokens")
    late = tmp_path / "late_run_id.sse"
    late.write_bytes(re.sub(rb',"run_id":"[^"]*"', b"", message) + ping + b"".join(rest))
    state.scenarios.append(Scenario(sse=str(late), delay=0.5, hold_after=2))
    proxy = await make(make_proxy, url)
    async with aiohttp.ClientSession() as http, stream_support(http, proxy) as resp:
        async for line in resp.content:
            if b'"content":"' in line and b'"content":""' not in line:
                break
    await proxy.client().chat.completions.create(model="support", messages=HI)
    assert [r.path.rsplit("/", 1)[1] for r in state.requests if "/messages" in r.path] == [
        "messages", "cancel", "messages"
    ]
    assert state.cancelled_run_ids == [RUN_ID]


async def test_llm_error_mid_stream_ends_with_an_error_event(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    state, url = letta
    state.default_scenario = Scenario(sse="stream_llm_error")
    client = (await make(make_proxy, url)).client()
    stream = await client.chat.completions.create(model="support", messages=HI, stream=True)
    with pytest.raises(openai.APIError) as info:
        [c async for c in stream]
    assert "Letta" in info.value.message
    with pytest.raises(openai.APIStatusError) as sync_info:
        await client.chat.completions.create(model="support", messages=HI)
    assert sync_info.value.status_code == 502


async def test_a_turn_answered_with_a_web_page_is_a_502_before_the_stream_starts(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    state, url = letta
    state.default_scenario = Scenario(page="<html><body>Sign in to continue</body></html>")
    client = (await make(make_proxy, url)).client()
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(model="support", messages=HI, stream=stream)
        assert info.value.status_code == 502
        assert info.value.code == "upstream_error"
        assert "without an event stream" in info.value.message


def broken_run(*events: dict[str, Any]) -> web.Application:
    """A Letta whose agent answers every turn with these events, and no stop_reason."""

    async def turn(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for event in events:
            await resp.write(b"data: " + orjson.dumps(event) + b"\n\n")
        return resp

    async def cancel(request: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.router.add_post(f"/v1/agents/{AGENT}/messages", turn)
    app.router.add_post(f"/v1/agents/{AGENT}/messages/cancel", cancel)
    return app


async def test_lettas_error_detail_is_logged_as_one_short_scrubbed_line(
    make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    detail = "provider said: key letta-pass-secret\nCRITICAL forged line\n" + "x" * 100_000
    app = broken_run(
        {"message_type": "ping", "run_id": RUN_ID},
        {"message_type": "error_message", "message": "boom", "detail": detail},
    )
    async with serving(app) as url:
        proxy = await make_proxy(
            f"upstreams:\n  letta: {{kind: letta, url: '{url}', api_key: letta-pass-secret}}\n"
            f"models:\n  m: {{upstream: letta, agent: {AGENT}}}\n"
        )
        with pytest.raises(openai.APIStatusError) as info:
            await proxy.client().chat.completions.create(model="m", messages=HI)
    assert info.value.status_code == 502
    [line] = [r.getMessage() for r in caplog.records if "failed: provider said" in r.getMessage()]
    assert "\n" not in line and len(line) < 2500
    assert "letta-pass-secret" not in line and "[redacted]" in line


async def test_a_run_id_that_is_no_run_id_is_neither_logged_nor_sent_back(
    make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    forged = "run-1\nCRITICAL forged line " + "y" * 1000
    app = broken_run({"message_type": "ping", "run_id": forged}, {
        "message_type": "assistant_message", "otid": "o1", "content": "partial"})
    async with serving(app) as url:
        proxy = await make_proxy(one_agent_routes(url, "m", AGENT))
        with pytest.raises(openai.APIStatusError):
            await proxy.client().chat.completions.create(model="m", messages=HI)
        await wait_for(lambda: any("no run id" in r.getMessage() for r in caplog.records))
    assert not any("forged" in r.getMessage() for r in caplog.records)


async def test_agent_tools_are_hidden_by_default_and_never_tool_calls(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    chunks = await support_stream(make_proxy, letta, "stream_tokens_think_tool")
    assert not any(has_tool_calls(c) for c in chunks)
    assert all(
        not c.choices or "reasoning_content" not in (c.choices[0].delta.model_extra or {})
        for c in chunks
    )


async def test_show_tools_summarises_them_in_reasoning_content(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    state, url = letta
    state.default_scenario = Scenario(sse="stream_tokens_think_tool")
    client = (await make(make_proxy, url, "    show: [reasoning, tools]")).client()
    reply = await client.chat.completions.create(model="support", messages=HI)
    message = reply.choices[0].message
    assert message.tool_calls is None
    assert "[tool]" in (message.model_extra or {}).get("reasoning_content", "")


async def test_same_session_is_serialised_and_a_long_wait_is_409(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    state, url = letta
    held = Scenario(sse="conversation_stream", hold_after=2)
    state.scenarios.append(held)
    client = (await make(make_proxy, url, "    session: {busy_timeout: 0.2}")).client()
    headers = {"X-Session-Id": "shared"}
    first = asyncio.create_task(
        client.chat.completions.create(model="support", messages=HI, extra_headers=headers)
    )
    await held.held.wait()
    with pytest.raises(openai.ConflictError) as info:
        await client.chat.completions.create(model="support", messages=HI, extra_headers=headers)
    assert info.value.code == "session_busy"
    other = await client.chat.completions.create(
        model="support", messages=HI, extra_headers={"X-Session-Id": "elsewhere"}
    )
    assert other.choices[0].message.content
    held.release.set()
    assert (await first).choices[0].message.content == "Echo: hello from alice thread"
    again = await client.chat.completions.create(
        model="support", messages=HI, extra_headers=headers
    )
    assert again.choices[0].message.content


async def test_a_request_waiting_for_its_conversation_leaves_its_slot_to_other_sessions(
    letta: tuple[FakeLetta, str], tmp_path: Path
) -> None:
    """With `max_concurrency: 2`, a turn queued behind its conversation's running turn holds
    no slot: another conversation's turn gets the second one, not a 429."""
    state, url = letta
    held = Scenario(sse="conversation_stream", hold_after=2)
    state.scenarios.append(held)
    path = tmp_path / "routes.yaml"
    path.write_text(routes(url).replace(
        "    api_key:", "    max_concurrency: 2\n    queue_timeout: 0.5\n    api_key:"))
    app = create_app(TableHolder(path, (KEY,)))
    async with serving(app) as proxy_url, openai.AsyncOpenAI(
        base_url=proxy_url + "/v1", api_key=KEY, max_retries=0
    ) as client:
        shared = {"X-Session-Id": "shared"}
        first = asyncio.create_task(
            client.chat.completions.create(model="support", messages=HI, extra_headers=shared))
        await held.held.wait()
        second = asyncio.create_task(
            client.chat.completions.create(model="support", messages=HI, extra_headers=shared))
        await wait_for(lambda: app[DRAIN].in_flight == 2)
        other = await client.chat.completions.create(
            model="support", messages=HI, extra_headers={"X-Session-Id": "elsewhere"})
        assert other.choices[0].message.content
        held.release.set()
        assert (await first).choices[0].message.content == "Echo: hello from alice thread"
        assert (await second).choices[0].message.content


async def test_unknown_agent_name_is_a_502_naming_route_and_agent(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    _, url = letta
    proxy = await make_proxy(one_agent_routes(url, "helper", "nobody"))
    with pytest.raises(openai.APIStatusError) as info:
        await proxy.client().chat.completions.create(model="helper", messages=HI)
    assert info.value.status_code == 502
    assert "'helper'" in info.value.message and "'nobody'" in info.value.message


async def test_unknown_agent_id_on_the_wildcard_is_model_not_found_and_never_opens_the_circuit(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    _, url = letta
    proxy = await make(make_proxy, url)
    client = proxy.client()
    model = "letta/agent-00000000-0000-4000-8000-000000000000"
    attempts: list[Callable[[], Awaitable[Any]]] = [
        lambda: client.chat.completions.create(model=model, messages=HI),
        lambda: client.chat.completions.create(model=model, messages=HI, stream=True),
        lambda: client.chat.completions.create(
            model=model, messages=HI, extra_headers={"X-Session-Id": "s1"}
        ),
        lambda: client.responses.create(model=model, input="hi"),
        lambda: client.responses.create(model=model, input="hi", stream=True),
    ]
    for attempt in attempts:
        with pytest.raises(openai.NotFoundError) as info:
            await attempt()
        assert (info.value.code, info.value.param) == ("model_not_found", "model")
        assert model in info.value.message
    async with aiohttp.ClientSession() as http, http.get(proxy.url + "/readyz") as resp:
        circuit = (await resp.json())["upstreams"]["letta"]
    assert (circuit["state"], circuit["consecutive_failures"]) == ("closed", 0)


async def test_agent_id_a_route_names_gone_from_letta_is_a_502_on_both_endpoints(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    _, url = letta
    gone = "agent-00000000-0000-4000-8000-000000000000"
    client = (await make_proxy(one_agent_routes(url, "helper", gone))).client()
    attempts: list[Callable[[], Awaitable[Any]]] = [
        lambda: client.chat.completions.create(model="helper", messages=HI),
        lambda: client.responses.create(model="helper", input="hi"),
    ]
    for attempt in attempts:
        with pytest.raises(openai.APIStatusError) as info:
            await attempt()
        assert (info.value.status_code, info.value.code) == (502, "upstream_error")
        assert "'helper'" in info.value.message and gone in info.value.message


async def test_agent_name_shared_by_two_agents_is_a_502_listing_their_ids(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    state, url = letta
    twin = copy.deepcopy(state.agents[0]) | {"id": "agent-11111111-2222-4333-8444-555555555555"}
    state.agents.append(twin)
    client = (await make(make_proxy, url)).client()
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(model="support", messages=HI)
    assert info.value.status_code == 502
    assert AGENT in info.value.message and twin["id"] in info.value.message


async def test_letta_down_is_502_upstream_unavailable(make_proxy: ProxyFactory) -> None:
    down = f"http://127.0.0.1:{closed_port()}"
    proxy = await make_proxy(one_agent_routes(down, "helper", "someone"))
    with pytest.raises(openai.APIStatusError) as info:
        await proxy.client().chat.completions.create(model="helper", messages=HI)
    assert info.value.status_code == 502
    assert info.value.code == "upstream_unavailable"


async def test_conversation_with_nothing_new_to_send_is_a_400(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    state, url = letta
    client = (await make(make_proxy, url)).client()
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(
            model="support",
            messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
        )
    assert info.value.param == "messages"
    assert not state.message_posts()


async def test_check_probe_reports_agents_that_do_not_resolve(
    letta: tuple[FakeLetta, str], tmp_path: Any
) -> None:
    _, url = letta
    path = tmp_path / "routes.yaml"
    path.write_text(
        f"upstreams:\n  letta: {{kind: letta, url: '{url}'}}\n"
        "models:\n"
        "  good: {upstream: letta, agent: support-bot}\n"
        "  bad: {upstream: letta, agent: nobody}\n"
    )

    async def probe() -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "check", "--probe", "routes.yaml",
            cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode or 0, out.decode()

    code, out = await probe()
    assert code == 1
    assert out.splitlines() == [
        "routes.yaml:5 models.bad.agent: Route 'bad': no Letta agent named 'nobody' on "
        "upstream 'letta'."
    ]
    path.write_text(path.read_text().replace("agent: nobody", "agent: support-bot"))
    code, out = await probe()
    assert code == 0, out


async def test_letta_pings_reach_the_client_as_keep_alive_comments(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    state, url = letta
    state.default_scenario = Scenario(sse="stream_slow_keepalive")
    proxy = await make(make_proxy, url)
    async with aiohttp.ClientSession() as http, stream_support(http, proxy) as resp:
        text = await resp.text()
    events = [e for e in text.split("\n\n") if e]
    assert events.count(": keep-alive") == 2
    assert events[-1] == "data: [DONE]"
    stream = await proxy.client().chat.completions.create(
        model="support", messages=HI, stream=True
    )
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


async def test_tool_call_stream_shows_only_the_agents_answer(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    chunks = await support_stream(make_proxy, letta, "stream_tokens_tool")
    assert not any(has_tool_calls(c) for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Tool finished. token stream with a TOOL call"


@pytest.mark.parametrize(
    ("status", "body", "expected", "code"),
    [
        pytest.param(500, {"error": {"type": "llm_error", "message": "LLM failed",
                                     "detail": "provider said no"}}, 502, "upstream_error",
                     id="letta-500-is-502"),
        pytest.param(422, {"detail": [{"msg": "image URL unreachable"}]}, 422, None,
                     id="letta-422-kept"),
        pytest.param(401, {"detail": "Unauthorized"}, 502, "upstream_error",
                     id="letta-401-is-the-operators"),
    ],
)
async def test_letta_http_errors_become_openai_errors(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str],
    status: int, body: Any, expected: int, code: str | None,
) -> None:
    state, url = letta
    state.default_scenario = Scenario(status=status, body=body)
    client = (await make(make_proxy, url)).client()
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(model="support", messages=HI)
    assert info.value.status_code == expected
    if code:
        assert info.value.code == code
        assert "'letta'" in info.value.message
    assert "provider said no" not in info.value.message


@pytest.mark.parametrize("stream", [False, True], ids=["sync", "stream"])
@pytest.mark.parametrize(("fields", "param"), [
    pytest.param({"n": 2}, "n", id="n"),
    pytest.param({"logprobs": True, "top_logprobs": 3}, "logprobs", id="logprobs"),
    pytest.param({"response_format": {"type": "json_schema", "json_schema": {
        "name": "answer", "schema": {"type": "object"}}}}, "response_format", id="json_schema"),
    pytest.param({"tools": [{"type": "function", "function": {"name": "f"}}],
                  "tool_choice": "required"}, "tool_choice", id="tool_choice"),
    pytest.param({"modalities": ["text", "audio"], "audio": {"voice": "alloy",
                                                             "format": "wav"}},
                 "modalities", id="audio"),
])
async def test_a_parameter_an_agent_cannot_honour_is_a_400_before_letta_is_called(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str], fields: dict[str, Any], param: str,
    stream: bool,
) -> None:
    state, url = letta
    client = (await make(make_proxy, url)).client()
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(
            model="support", messages=HI, stream=stream, extra_body=fields)
    assert (caught.value.param, caught.value.type) == (param, "invalid_request_error")
    assert state.requests == []


async def test_parameters_an_agent_ignores_on_purpose_are_still_served(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    state, url = letta
    client = (await make(make_proxy, url)).client()
    reply = await client.chat.completions.create(
        model="support", messages=HI, temperature=0.1, max_tokens=5, stop=["\n"], seed=1,
        tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        tool_choice="auto", n=1, response_format={"type": "text"}, user="u-1",
        metadata={"team": "a"}, store=True, reasoning_effort="low")
    assert reply.choices[0].message.content == "Echo: token streaming please"
    assert set(state.message_posts()[-1].json) == {
        "messages", "streaming", "stream_tokens", "include_pings"}
