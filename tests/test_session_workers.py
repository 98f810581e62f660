"""One session, one turn, across `--workers` and replicas: a Letta conversation never gets two
messages at once, whichever worker each request lands on, and Letta's own "busy" answer is
waited out like the local lock."""

from __future__ import annotations

import asyncio
import socket
import uuid
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from tests.conftest import KEY, ProxyFactory, serving
from tests.fake_letta import FakeLetta, Scenario
from tests.processes import serve_process

HI = [{"role": "user", "content": "hi"}]

FIXTURE = Path(__file__).parent / "fixtures" / "letta" / "conversation_stream.sse"
AGENT = "agent-0e4a5a38-0a3c-4a3e-9b1f-2d4f7c9a1b2c"


class OverlapLetta:
    """Just enough of Letta for conversations, recording how many turns overlap."""

    def __init__(self) -> None:
        self.conversations: list[dict[str, str]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.turns = 0
        self.events = FIXTURE.read_bytes().split(b"\n\n")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/conversations/", self.list)
        app.router.add_post("/v1/conversations/", self.create)
        app.router.add_post("/v1/conversations/{cid}/messages", self.turn)
        return app

    async def list(self, request: web.Request) -> web.Response:
        token = request.query.get("summary_search", "")
        found = [c for c in self.conversations if token in c["summary"]]
        return web.json_response(found)

    async def create(self, request: web.Request) -> web.Response:
        body = await request.json()
        conv = {
            "id": f"conv-{uuid.uuid4()}", "agent_id": AGENT, "summary": body["summary"],
            "created_at": datetime.now(UTC).isoformat(),
        }
        self.conversations.append(conv)
        return web.json_response(conv)

    async def turn(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(self.events[0] + b"\n\n")
            await asyncio.sleep(0.15)
            await resp.write(b"\n\n".join(self.events[1:]))
            self.turns += 1
            return resp
        finally:
            self.in_flight -= 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_two_workers_never_send_two_turns_of_one_session_at_once(tmp_path: Path) -> None:
    letta = OverlapLetta()
    async with serving(letta.app()) as letta_url:
        routes = tmp_path / "routes.yaml"
        routes.write_text(f"""
upstreams:
  letta:
    kind: letta
    url: {letta_url}
    timeouts: {{first_event: 30}}
models:
  support:
    upstream: letta
    agent: {AGENT}
    session: {{busy_timeout: 30}}
""")
        async with serve_process(routes, port=free_port(), workers=2) as served:

            async def one() -> str:
                # A connection of its own each, so SO_REUSEPORT spreads them over both workers.
                async with aiohttp.ClientSession() as http, http.post(
                    served.url + "/v1/chat/completions",
                    data=orjson.dumps({"model": "support", "messages": [
                        {"role": "user", "content": "hi"}]}),
                    headers={"Authorization": f"Bearer {KEY}", "X-Session-Id": "one-chat",
                             "Content-Type": "application/json"},
                ) as resp:
                    assert resp.status == 200, await resp.text()
                    return resp.headers["X-Request-Id"][:20]  # the worker's id prefix

            workers: set[str] = set()
            for _ in range(5):  # until both workers took part (each batch: 6 at once)
                workers |= set(await asyncio.gather(*(one() for _ in range(6))))
                if len(workers) == 2:
                    break
    assert len(workers) == 2, "both workers should have served the session"
    assert letta.most_in_flight == 1
    assert letta.turns >= 6
    assert len({c["id"] for c in letta.conversations}) >= 1


BUSY = {"detail": "CONFLICT: Cannot send a new message: Another request is currently being "
                  "processed for this conversation."}
APPROVAL = {"detail": "CONFLICT: Cannot send a new message: The agent is waiting for approval "
                      "on a tool call. Please approve or deny the pending request before "
                      "continuing."}


async def test_lettas_own_conversation_busy_answer_is_waited_out_and_retried(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    state, url = letta
    state.scenarios.extend([Scenario(status=409, body=BUSY), Scenario(status=409, body=BUSY)])
    proxy = await make_proxy(routes(url))
    answer = await proxy.client().chat.completions.create(
        model="support", messages=HI, extra_headers={"X-Session-Id": "busy-chat"}
    )
    assert answer.choices[0].message.content
    assert len(state.message_posts()) == 3


async def test_lettas_busy_answer_past_the_busy_timeout_is_a_409_session_busy(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    state, url = letta
    state.scenarios.extend(Scenario(status=409, body=BUSY) for _ in range(100))
    proxy = await make_proxy(routes(url, "    session: {busy_timeout: 0.3}\n"))
    with pytest.raises(openai.ConflictError) as info:
        await proxy.client().chat.completions.create(model="support", messages=HI)
    assert info.value.code == "session_busy"


async def test_a_letta_conflict_that_is_not_busy_is_not_retried(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    state, url = letta
    state.scenarios.append(Scenario(status=409, body=APPROVAL))
    proxy = await make_proxy(routes(url))
    with pytest.raises(openai.ConflictError) as info:
        await proxy.client().chat.completions.create(model="support", messages=HI)
    assert "approval" in info.value.message
    assert len(state.message_posts()) == 1


def routes(url: str, model_extra: str = "") -> str:
    return (
        f"upstreams:\n  letta: {{kind: letta, url: '{url}'}}\n"
        f"models:\n  support:\n    upstream: letta\n    agent: support-bot\n{model_extra}"
    )
