"""The fake Letta server answers like the captured one and records what it received."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest

from tests.conftest import serving
from tests.fake_letta import FakeLetta, Scenario, load_json, make_app, sse_events

AGENT = "agent-ef37cb35-73b3-4511-b1bb-1c9635553e28"
SDK = {"X-Stainless-Package-Version": "1.0.0"}


@dataclass
class Served:
    state: FakeLetta
    url: str
    http: aiohttp.ClientSession


@pytest.fixture
async def letta() -> AsyncIterator[Served]:
    state = FakeLetta()
    async with serving(make_app(state)) as url, aiohttp.ClientSession() as http:
        yield Served(state, url, http)


async def test_lists_agents_by_exact_name_and_records_the_request(letta: Served) -> None:
    async with letta.http.get(f"{letta.url}/v1/agents/", params={"name": "support-bot"}) as resp:
        assert resp.status == 200
        agents = await resp.json()
    assert [a["id"] for a in agents] == [AGENT]
    async with letta.http.get(f"{letta.url}/v1/agents/", params={"name": "support"}) as resp:
        assert await resp.json() == []
    first = letta.state.requests[0]
    assert (first.method, first.path, first.query) == (
        "GET",
        "/v1/agents/",
        {"name": "support-bot"},
    )
    assert "aiohttp" in first.headers["user-agent"]


async def test_agents_without_slash_redirects_like_letta(letta: Served) -> None:
    async with letta.http.get(
        f"{letta.url}/v1/agents", params={"name": "x"}, allow_redirects=False
    ) as resp:
        assert resp.status == 307
        assert resp.headers["Location"].endswith("/v1/agents/?name=x")


async def test_unknown_agent_is_a_404_with_detail(letta: Served) -> None:
    missing = "agent-00000000-0000-4000-8000-000000000000"
    async with letta.http.get(f"{letta.url}/v1/agents/{missing}") as resp:
        assert resp.status == 404
        assert await resp.json() == {"detail": f"Agent {missing} not found"}
    async with letta.http.get(f"{letta.url}/v1/agents/{AGENT}") as resp:
        assert (await resp.json())["name"] == "support-bot"


async def test_stream_replays_the_capture_one_event_per_chunk(letta: Served) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "streaming": True}
    async with letta.http.post(
        f"{letta.url}/v1/agents/{AGENT}/messages", json=body, headers=SDK
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        raw = await resp.read()
    assert raw == b"".join(sse_events("stream_tokens"))
    assert letta.state.requests[-1].json == body
    assert letta.state.requests[-1].headers["x-stainless-package-version"] == "1.0.0"
    assert letta.state.completed_streams == 1


async def test_streaming_from_a_legacy_client_is_a_422(letta: Served) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "streaming": True}
    async with letta.http.post(f"{letta.url}/v1/agents/{AGENT}/messages", json=body) as resp:
        assert resp.status == 422
        assert "detail" in await resp.json()


async def test_sync_message_answers_the_captured_response(letta: Served) -> None:
    body = {"messages": [{"role": "user", "content": "hello there"}]}
    async with letta.http.post(f"{letta.url}/v1/agents/{AGENT}/messages", json=body) as resp:
        assert await resp.json() == load_json("sync_message.response.json")


async def test_scenario_queue_comes_before_per_agent_and_default(letta: Served) -> None:
    letta.state.scenarios.append(Scenario("stream_steps"))
    letta.state.agent_scenarios[AGENT] = Scenario("stream_tokens_tool")
    body = {"messages": [{"role": "user", "content": "hi"}], "streaming": True}
    seen = []
    for _ in range(2):
        async with letta.http.post(
            f"{letta.url}/v1/agents/{AGENT}/messages", json=body, headers=SDK
        ) as resp:
            seen.append(await resp.read())
    assert seen == [
        b"".join(sse_events("stream_steps")),
        b"".join(sse_events("stream_tokens_tool")),
    ]


async def test_error_status_scenario(letta: Served) -> None:
    letta.state.scenarios.append(
        Scenario(status=500, body=load_json("sync_llm_error.response.json"))
    )
    body = {"messages": [{"role": "user", "content": "fail"}]}
    async with letta.http.post(f"{letta.url}/v1/agents/{AGENT}/messages", json=body) as resp:
        assert resp.status == 500
        assert (await resp.json())["error"]["type"] == "llm_error"


async def test_cut_stream_ends_without_done(letta: Served) -> None:
    letta.state.scenarios.append(Scenario("stream_tokens", cut_after=3))
    body = {"messages": [{"role": "user", "content": "hi"}], "streaming": True}
    async with letta.http.post(
        f"{letta.url}/v1/agents/{AGENT}/messages", json=body, headers=SDK
    ) as resp:
        raw = await resp.read()
    assert raw == b"".join(sse_events("stream_tokens")[:3])
    assert b"[DONE]" not in raw


async def test_held_stream_notices_the_client_leaving(letta: Served) -> None:
    scenario = Scenario("stream_tokens", hold_after=2)
    letta.state.scenarios.append(scenario)
    body = {"messages": [{"role": "user", "content": "hi"}], "streaming": True}
    resp = await letta.http.post(f"{letta.url}/v1/agents/{AGENT}/messages", json=body, headers=SDK)
    await resp.content.readuntil(b"\n\n")
    await asyncio.wait_for(scenario.held.wait(), 5)
    resp.close()
    await asyncio.wait_for(letta.state.disconnect_seen.wait(), 5)
    assert letta.state.disconnected == [f"/v1/agents/{AGENT}/messages"]
    assert letta.state.completed_streams == 0


async def test_released_stream_completes(letta: Served) -> None:
    scenario = Scenario("stream_tokens", hold_after=1)
    letta.state.scenarios.append(scenario)
    body = {"messages": [{"role": "user", "content": "hi"}], "streaming": True}
    async with letta.http.post(
        f"{letta.url}/v1/agents/{AGENT}/messages", json=body, headers=SDK
    ) as resp:
        await asyncio.wait_for(scenario.held.wait(), 5)
        scenario.release.set()
        raw = await resp.read()
    assert raw.endswith(b"data: [DONE]\n\n")
    assert letta.state.disconnected == []


async def test_cancel_records_run_ids(letta: Served) -> None:
    async with letta.http.post(
        f"{letta.url}/v1/agents/{AGENT}/messages/cancel", json={"run_ids": ["run-1"]}
    ) as resp:
        assert resp.status == 200
    assert letta.state.cancelled_run_ids == ["run-1"]


async def test_conversations_create_search_and_stream(letta: Served) -> None:
    url = f"{letta.url}/v1/conversations/"
    ids = []
    for summary in ("agentproxy-session:aaa", "agentproxy-session:aaa", "other"):
        async with letta.http.post(
            url, params={"agent_id": AGENT}, json={"summary": summary}
        ) as resp:
            assert resp.status == 200
            ids.append((await resp.json())["id"])
    query = {"agent_id": AGENT, "summary_search": "session:aaa"}
    async with letta.http.get(url, params=query) as resp:
        found = await resp.json()
    # Substring search, newest first, as Letta answers by default.
    assert [c["id"] for c in found] == [ids[1], ids[0]]

    body = {"messages": [{"role": "user", "content": "hello from alice thread"}]}
    async with letta.http.post(
        f"{letta.url}/v1/conversations/{ids[0]}/messages", json=body
    ) as resp:
        assert resp.status == 200
        assert await resp.read() == b"".join(sse_events("conversation_stream"))
    async with letta.http.post(
        f"{letta.url}/v1/conversations/{ids[0]}/messages", json={**body, "streaming": False}
    ) as resp:
        assert await resp.json() == load_json("conversation_sync.response.json")
    missing = "conv-00000000-0000-4000-8000-000000000000"
    async with letta.http.post(
        f"{letta.url}/v1/conversations/{missing}/messages", json=body
    ) as resp:
        assert resp.status == 404
