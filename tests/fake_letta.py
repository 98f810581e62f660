"""A fake Letta 0.16.8 server for tests: replays captured traffic, records what it received.

    state = FakeLetta()
    state.scenarios.append(Scenario("stream_tokens_tool"))
    async with serving(make_app(state)) as base_url:  # tests.conftest.serving
        ...  # talk to base_url; then look at state.requests, state.cancelled_run_ids

It is a real aiohttp server (port 0), so SSE chunk boundaries and client disconnects are real.
Streams come from `fixtures/letta/<name>.sse`, written one event per chunk. Which stream a
message request gets: the next queued `state.scenarios`, else `state.agent_scenarios[agent]`,
else `state.default_scenario` (conversations: `state.default_conversation_scenario`).

Conversations keep the messages sent to them (`state.history[conv_id]`), and
`POST /v1/conversations/{id}/fork` copies them into a new conversation as Letta does, so a
test can tell the branches of one conversation apart.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections import deque
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

FIXTURES = Path(__file__).parent / "fixtures" / "letta"

AGENT_ID = re.compile(
    r"^agent-[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
)
_TIMESTAMP = re.compile(rb"^\d\d:\d\d:\d\d\t", re.MULTILINE)


def load_json(name: str) -> Any:
    return orjson.loads((FIXTURES / name).read_bytes())


def sse_events(name: str) -> list[bytes]:
    """The events of a captured stream, each with its blank-line terminator.

    `name` is a fixture stem ("stream_tokens") or file name; the `.timestamped.sse` capture
    has a "HH:MM:SS<TAB>" prefix on every line, which is removed.
    """
    path = FIXTURES / name
    if not path.suffix:
        path = FIXTURES / f"{name}.sse"
        if not path.exists():
            path = FIXTURES / f"{name}.timestamped.sse"
    raw = _TIMESTAMP.sub(b"", path.read_bytes())
    return [block + b"\n\n" for block in raw.split(b"\n\n") if block.strip()]


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: CIMultiDict[str]
    json: Any


@dataclass
class Scenario:
    """How to answer one message request."""

    sse: str = "stream_tokens"
    sync: str = "sync_message.response.json"
    # Answer with this HTTP status and `body` instead (e.g. 500 and sync_llm_error's body).
    status: int = 200
    body: Any = None
    delay: float = 0.0  # seconds before each event after the first
    # After this many events, wait until `release` is set (or the client goes away).
    hold_after: int | None = None
    release: asyncio.Event = field(default_factory=asyncio.Event)
    held: asyncio.Event = field(default_factory=asyncio.Event)
    # Stop after this many events, without the rest (and without [DONE]): a truncated stream.
    cut_after: int | None = None
    # Answer 200 with this web page instead of a stream (a broken server or a portal).
    page: str | None = None


@dataclass
class FakeLetta:
    agents: list[dict[str, Any]] = field(
        default_factory=lambda: load_json("list_agents_by_name.sdk1.json")
    )
    conversations: list[dict[str, Any]] = field(default_factory=list)
    requests: list[Recorded] = field(default_factory=list)
    scenarios: deque[Scenario] = field(default_factory=deque)
    agent_scenarios: dict[str, Scenario] = field(default_factory=dict)
    default_scenario: Scenario = field(default_factory=Scenario)
    default_conversation_scenario: Scenario = field(
        default_factory=lambda: Scenario(
            sse="conversation_stream", sync="conversation_sync.response.json"
        )
    )
    cancelled_run_ids: list[str] = field(default_factory=list)
    # Paths of streams whose client went away before the stream's end.
    disconnected: list[str] = field(default_factory=list)
    disconnect_seen: asyncio.Event = field(default_factory=asyncio.Event)
    completed_streams: int = 0
    # The user messages each conversation has received, its fork's copied first.
    history: dict[str, list[Any]] = field(default_factory=dict)

    def agent(self, agent_id: str) -> dict[str, Any] | None:
        return next((a for a in self.agents if a.get("id") == agent_id), None)

    def scenario_for(self, agent_id: str | None, default: Scenario) -> Scenario:
        if self.scenarios:
            return self.scenarios.popleft()
        if agent_id is not None and agent_id in self.agent_scenarios:
            return self.agent_scenarios[agent_id]
        return default

    def requests_to(self, method: str, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and r.path == path]

    def message_posts(self) -> list[Recorded]:
        """The message requests, to agents and to conversations alike."""
        return [r for r in self.requests if r.method == "POST" and r.path.endswith("/messages")]


FAKE_LETTA = web.AppKey("fake_letta", FakeLetta)
_RECORDED = web.RequestKey("recorded", Recorded)


def make_app(state: FakeLetta | None = None) -> web.Application:
    app = web.Application(middlewares=[_record, _known_path_agent])
    app[FAKE_LETTA] = state or FakeLetta()
    app.router.add_get("/v1/health/", _health)
    app.router.add_get("/v1/agents", _redirect_slash)
    app.router.add_get("/v1/agents/", _list_agents)
    app.router.add_get("/v1/agents/{agent_id}", _get_agent)
    app.router.add_post("/v1/agents/{agent_id}/messages", _agent_messages)
    app.router.add_post("/v1/agents/{agent_id}/messages/cancel", _cancel)
    app.router.add_get("/v1/conversations", _redirect_slash)
    app.router.add_post("/v1/conversations", _redirect_slash)
    app.router.add_get("/v1/conversations/", _list_conversations)
    app.router.add_post("/v1/conversations/", _create_conversation)
    app.router.add_post("/v1/conversations/{conversation_id}/messages", _conversation_messages)
    app.router.add_post("/v1/conversations/{conversation_id}/fork", _fork_conversation)
    return app


@web.middleware
async def _record(request: web.Request, handler: Any) -> web.StreamResponse:
    body: Any = None
    if request.can_read_body:
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = raw.decode("utf-8", "replace")
    recorded = Recorded(
        request.method, request.path, dict(request.query), CIMultiDict(request.headers), body
    )
    request[_RECORDED] = recorded
    request.app[FAKE_LETTA].requests.append(recorded)
    response: web.StreamResponse = await handler(request)
    return response


@web.middleware
async def _known_path_agent(request: web.Request, handler: Any) -> web.StreamResponse:
    # Letta validates an agent id in the path before the endpoint runs, whatever the endpoint.
    agent_id = request.match_info.get("agent_id")
    if agent_id is not None and (refused := _check_agent(request, agent_id)) is not None:
        return refused
    response: web.StreamResponse = await handler(request)
    return response


def _body(request: web.Request) -> Any:
    return request[_RECORDED].json


def _detail(status: int, detail: Any) -> web.Response:
    return web.json_response({"detail": detail}, status=status)


def _is_legacy_client(request: web.Request) -> bool:
    # Letta 0.16 treats a caller with a User-Agent but no Stainless SDK version as a pre-1.0
    # SDK, and refuses `streaming: true` from it.
    return not request.headers.get("X-Stainless-Package-Version") and bool(
        request.headers.get("User-Agent")
    )


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"version": "0.16.8", "status": "ok"})


async def _redirect_slash(request: web.Request) -> web.Response:
    location = request.url.with_path(request.path + "/").with_query(request.query_string)
    raise web.HTTPTemporaryRedirect(location)


async def _list_agents(request: web.Request) -> web.Response:
    agents = request.app[FAKE_LETTA].agents
    name = request.query.get("name")
    if name is not None:
        agents = [a for a in agents if a.get("name") == name]
    return web.json_response(agents)


def _check_agent(request: web.Request, agent_id: str) -> web.Response | None:
    if not AGENT_ID.match(agent_id):
        return _detail(
            422,
            [
                {
                    "type": "string_pattern_mismatch",
                    "loc": ["path", "agent_id"],
                    "msg": f"String should match pattern '{AGENT_ID.pattern}'",
                    "input": agent_id,
                }
            ],
        )
    if request.app[FAKE_LETTA].agent(agent_id) is None:
        return _detail(404, f"Agent {agent_id} not found")
    return None


async def _get_agent(request: web.Request) -> web.Response:
    return web.json_response(request.app[FAKE_LETTA].agent(request.match_info["agent_id"]))


async def _agent_messages(request: web.Request) -> web.StreamResponse:
    state = request.app[FAKE_LETTA]
    agent_id = request.match_info["agent_id"]
    body = _body(request)
    if not isinstance(body, dict) or not body.get("messages"):
        return _detail(
            422, [{"type": "missing", "loc": ["body", "messages"], "msg": "Field required"}]
        )
    scenario = state.scenario_for(agent_id, state.default_scenario)
    if body.get("streaming") is True:
        if _is_legacy_client(request):
            return _detail(
                422,
                "Streaming is not supported for legacy SDK clients: upgrade to letta-client 1.0.",
            )
        return await _answer(request, scenario, stream=True)
    return await _answer(request, scenario, stream=False)


async def _cancel(request: web.Request) -> web.Response:
    body = _body(request)
    run_ids = body.get("run_ids") if isinstance(body, dict) else None
    run_ids = [r for r in run_ids or [] if isinstance(r, str)]
    request.app[FAKE_LETTA].cancelled_run_ids.extend(run_ids)
    return web.json_response({run_id: "cancelled" for run_id in run_ids})


async def _list_conversations(request: web.Request) -> web.Response:
    state = request.app[FAKE_LETTA]
    agent_id = request.query.get("agent_id")
    search = request.query.get("summary_search")
    found = [
        c
        for c in state.conversations
        if (agent_id is None or c["agent_id"] == agent_id)
        and (search is None or search in (c.get("summary") or ""))
    ]
    # Letta's default order is newest first.
    found.sort(key=lambda c: c["created_at"], reverse=request.query.get("order", "desc") == "desc")
    return web.json_response(found)


async def _create_conversation(request: web.Request) -> web.Response:
    state = request.app[FAKE_LETTA]
    agent_id = request.query.get("agent_id")
    if agent_id is None:
        return _detail(
            422, [{"type": "missing", "loc": ["query", "agent_id"], "msg": "Field required"}]
        )
    if (refused := _check_agent(request, agent_id)) is not None:
        return refused
    body = _body(request)
    conv = load_json("conversation_create.response.json")
    # Strictly increasing, so "the oldest" is well defined even for back-to-back creations.
    created = datetime.now(UTC) + timedelta(microseconds=len(state.conversations))
    stamp = created.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    conv.update(
        id=f"conv-{uuid.uuid4()}",
        agent_id=agent_id,
        summary=body.get("summary") if isinstance(body, dict) else None,
        created_at=stamp,
        updated_at=stamp,
    )
    state.conversations.append(conv)
    return web.json_response(conv)


async def _fork_conversation(request: web.Request) -> web.Response:
    state = request.app[FAKE_LETTA]
    source_id = request.match_info["conversation_id"]
    source = next((c for c in state.conversations if c["id"] == source_id), None)
    if source is None:
        return web.json_response(load_json("conversation_fork_missing.404.json"), status=404)
    fork = load_json("conversation_fork.response.json")
    created = datetime.now(UTC) + timedelta(microseconds=len(state.conversations))
    stamp = created.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    # As Letta 0.16.8 answers a fork: same agent, summary not copied, message ids not shown.
    fork.update(
        id=f"conv-{uuid.uuid4()}", agent_id=source["agent_id"], created_at=stamp,
        updated_at=stamp,
    )
    state.conversations.append(fork)
    state.history[fork["id"]] = list(state.history.get(source_id, []))
    return web.json_response(fork)


async def _conversation_messages(request: web.Request) -> web.StreamResponse:
    state = request.app[FAKE_LETTA]
    conv_id = request.match_info["conversation_id"]
    conv = next((c for c in state.conversations if c["id"] == conv_id), None)
    if conv is None:
        return _detail(404, f"Conversation {conv_id} not found")
    body = _body(request)
    if not isinstance(body, dict) or not body.get("messages"):
        return _detail(
            422, [{"type": "missing", "loc": ["body", "messages"], "msg": "Field required"}]
        )
    state.history.setdefault(conv_id, []).extend(body["messages"])
    scenario = state.scenario_for(conv["agent_id"], state.default_conversation_scenario)
    # Unlike the agent route, this one streams unless told not to.
    return await _answer(request, scenario, stream=body.get("streaming", True) is not False)


async def _answer(request: web.Request, scenario: Scenario, *, stream: bool) -> web.StreamResponse:
    if scenario.status != 200:
        return web.json_response(scenario.body, status=scenario.status)
    if scenario.page is not None:
        return web.Response(text=scenario.page, content_type="text/html")
    if not stream:
        return web.json_response(load_json(scenario.sync))
    return await _replay(request, scenario)


async def _replay(request: web.Request, scenario: Scenario) -> web.StreamResponse:
    state = request.app[FAKE_LETTA]
    events = sse_events(scenario.sse)
    if scenario.cut_after is not None:
        events = events[: scenario.cut_after]
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream; charset=utf-8", "server": "uvicorn"}
    )
    await response.prepare(request)
    # A hold past the last event keeps the stream open after everything was sent.
    hold_at_end = scenario.hold_after is not None and scenario.hold_after >= len(events)
    try:
        for n, event in enumerate(events):
            if n == scenario.hold_after and not await _hold(request, scenario):
                return _gone(request, response)
            if n and scenario.delay:
                await asyncio.sleep(scenario.delay)
            await response.write(event)
        if hold_at_end and not await _hold(request, scenario):
            return _gone(request, response)
        await response.write_eof()
    except ConnectionResetError:
        return _gone(request, response)
    except asyncio.CancelledError:
        _gone(request, response)
        raise
    state.completed_streams += 1
    return response


async def _hold(request: web.Request, scenario: Scenario) -> bool:
    scenario.held.set()
    return await _wait_unless_gone(request, scenario.release)


def _gone(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    state = request.app[FAKE_LETTA]
    state.disconnected.append(request.path)
    state.disconnect_seen.set()
    return response


async def _wait_unless_gone(request: web.Request, release: asyncio.Event) -> bool:
    """Waits for `release`; False if the client disconnected first.

    Polls the transport because aiohttp does not cancel handlers on disconnect by default.
    """
    while not release.is_set():
        transport = request.transport
        if transport is None or transport.is_closing():
            return False
        with suppress(TimeoutError):
            await asyncio.wait_for(release.wait(), 0.02)
    return True
