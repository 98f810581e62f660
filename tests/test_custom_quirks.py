"""What real agent servers do that the research did not expect (upstream-samples/*/README.md),
and how the `custom` kind copes with each from configuration alone: one turn per session,
first-event and idle deadlines, keep-alives, the JSON and single-document fallbacks, recaps,
error streams without an end event, heartbeats and EOF endings.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from proxy.upstreams import custom_calls
from tests.conftest import KEY, ProxyFactory, serving, wait_for
from tests.custom_e2e import (
    API_IDS,
    APIS,
    DIFY,
    FLOWISE,
    HI,
    LANGFLOW,
    LANGGRAPH,
    N8N,
    Api,
    Served,
    custom_env,
    post_stream,
    routes_for,
    serve_api,
    text_of,
)
from tests.fake_agents import FakeFlowise, FakeLangGraph, Reply

__all__ = ["custom_env"]

CHAT = {"X-Session-Id": "one-chat"}


def default_stream(api: Api) -> str:
    return {
        "dify": "dify/chat_stream.sse",
        "flowise": FakeFlowise.stream,
        "langflow": "langflow/run_stream.response.ndjson",
        "n8n": "n8n/stream.ndjson",
        "langgraph": FakeLangGraph.stream,
    }[api.name]


# -- one turn per session --------------------------------------------------------------------------


@pytest.mark.parametrize("api", APIS, ids=API_IDS)
async def test_a_second_turn_of_a_session_waits_for_the_first(api: Api, tmp_path: Path) -> None:
    """Flowise starves the first of two streams on one chatId; LangGraph queues the second
    run; Dify interleaves: the proxy sends a session's next turn only after the last one."""
    held = Reply(default_stream(api), hold_after=api.first_text)
    async with serve_api(api, tmp_path) as served:
        served.fake.replies.append(held)
        first = asyncio.create_task(post_stream(served, api.model, headers=CHAT))
        await held.held.wait()
        second = asyncio.create_task(post_stream(served, api.model, headers=CHAT))
        await wait_for(lambda: served.in_flight == 2)
        # The second turn is in the proxy, not at the server.
        assert len(served.fake.chats()) == 1
        held.release.set()
        answers = await asyncio.gather(first, second)
    assert [text_of(events) for events in answers] == [api.text, api.text]
    assert served.fake.most_in_flight == 1
    assert len(served.fake.chats()) == 2


async def test_a_turn_that_waits_longer_than_busy_timeout_is_a_409(tmp_path: Path) -> None:
    held = Reply(FakeFlowise.stream, hold_after=FLOWISE.first_text)
    busy = {"session": {"busy_timeout": 0.2}}
    async with serve_api(FLOWISE, tmp_path, route_keys=busy) as served:
        served.fake.replies.append(held)
        first = asyncio.create_task(post_stream(served, FLOWISE.model, headers=CHAT))
        await held.held.wait()
        with pytest.raises(openai.ConflictError) as info:
            await served.client().chat.completions.create(
                model=FLOWISE.model, messages=HI, extra_headers=CHAT)
        held.release.set()
        assert text_of(await first) == FLOWISE.text
    assert info.value.code == "session_busy"


async def _active(served: Served, upstream: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(served.proxy.url + "/readyz") as resp:
        ready = await resp.json()
    active: int = ready["upstreams"][upstream]["active"]
    return active


async def test_turns_waiting_for_their_session_leave_the_upstreams_slots_to_other_sessions(
    tmp_path: Path,
) -> None:
    """Only a request talking to the upstream holds a `max_concurrency` slot: turns queued
    behind their session's running turn do not, so another session still gets through, and
    a waiter whose client leaves gives no slot back twice."""
    held = Reply(FakeFlowise.stream, hold_after=FLOWISE.first_text)
    async with serve_api(FLOWISE, tmp_path, route_keys={"session": {"busy_timeout": 5}},
                         max_concurrency=2, queue_timeout=0.5) as served:
        served.fake.replies.append(held)
        first = asyncio.create_task(post_stream(served, FLOWISE.model, headers=CHAT))
        await held.held.wait()
        second = asyncio.create_task(post_stream(served, FLOWISE.model, headers=CHAT))
        leaving = asyncio.create_task(post_stream(served, FLOWISE.model, headers=CHAT))
        await wait_for(lambda: served.in_flight == 3)
        assert await _active(served, "flowise") == 1
        other = await served.client().chat.completions.create(
            model=FLOWISE.model, messages=HI, extra_headers={"X-Session-Id": "another-chat"})
        assert other.choices[0].message.content == FLOWISE.text
        leaving.cancel()
        await wait_for(lambda: served.in_flight == 2)
        assert await _active(served, "flowise") == 1
        held.release.set()
        answers = await asyncio.gather(first, second)
        assert [text_of(events) for events in answers] == [FLOWISE.text, FLOWISE.text]
        await wait_for(lambda: served.in_flight == 0)
        assert await _active(served, "flowise") == 0
    assert served.fake.most_in_flight == 1


# The stream's second event, with the task id the stop call needs, comes this long after the
# first: the cancel of a turn the client left has to read on for it.
TASK_ID_GAP = 0.5

STOPPABLE = """
upstreams:
  stoppable:
    kind: custom
    url: {url}
    mode: stream
    request:
      path: /chat
      body: {{query: "{{{{ input }}}}", user: "{{{{ session.key }}}}"}}
    stream:
      framing: sse
      rules:
        - {{when: {{event: message}}, text: answer, capture: {{task_id: task_id}}}}
        - {{when: {{event: message_end}}, end: true}}
    cancel:
      path: "/stop/{{{{ captured.task_id }}}}"
models:
  support: {{upstream: stoppable, session: {{busy_timeout: {busy}}}}}
"""


class StoppableAgent:
    """Like Dify: a turn runs on after its client left, until `/stop/{task}`; the first turn's
    task id comes only in its second event. Records the order in which calls arrive."""

    def __init__(self, *, hang_stop: bool = False) -> None:
        self.arrivals: list[str] = []
        self.hang_stop = hang_stop
        self.done = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/chat", self.chat)
        app.router.add_post("/stop/{task}", self.stop)
        return app

    async def chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        task = f"t{sum(a.startswith('chat') for a in self.arrivals) + 1}"
        self.arrivals.append(f"chat {task}")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            if task != "t1":
                await resp.write(_message("ok", task) + b'data: {"event": "message_end"}\n\n')
                return resp
            await resp.write(_message("a"))
            await asyncio.sleep(TASK_ID_GAP)
            await resp.write(_message("b", task))
            await self.done.wait()  # the turn runs on at the server
        except ConnectionResetError:
            pass
        return resp

    async def stop(self, request: web.Request) -> web.Response:
        self.arrivals.append(f"stop {request.match_info['task']}")
        if self.hang_stop:
            await self.done.wait()
        return web.json_response({"result": "success"})


def _message(answer: str, task: str | None = None) -> bytes:
    event = {"event": "message", "answer": answer} | ({"task_id": task} if task else {})
    return b"data: " + orjson.dumps(event) + b"\n\n"


async def _next_turn_after_leaving(make_proxy: ProxyFactory, fake: StoppableAgent,
                                   busy: float) -> str | None:
    async with serving(fake.app()) as url:
        try:
            proxy = await make_proxy(STOPPABLE.format(url=url, busy=busy))
            async with aiohttp.ClientSession() as http, http.post(
                proxy.url + "/v1/chat/completions",
                json={"model": "support", "stream": True, "messages": HI},
                headers={"Authorization": f"Bearer {KEY}", **CHAT},
            ) as resp:
                async for line in resp.content:
                    if b'"content":"a"' in line:
                        break
            reply = await proxy.client().chat.completions.create(
                model="support", messages=HI, extra_headers=CHAT)
        finally:
            fake.done.set()
    return reply.choices[0].message.content


async def test_a_sessions_next_turn_reaches_the_upstream_only_after_the_left_turns_cancel(
    make_proxy: ProxyFactory,
) -> None:
    fake = StoppableAgent()
    assert await _next_turn_after_leaving(make_proxy, fake, busy=30) == "ok"
    assert fake.arrivals == ["chat t1", "stop t1", "chat t2"]


async def test_a_cancel_that_hangs_holds_the_session_only_for_the_cancels_own_bound(
    make_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(custom_calls, "CANCEL_BUDGET", 1.0)
    fake = StoppableAgent(hang_stop=True)
    # Waiting on the session for longer than the cancel's bound would be a 409.
    assert await _next_turn_after_leaving(make_proxy, fake, busy=3) == "ok"
    assert fake.arrivals == ["chat t1", "stop t1", "chat t2"]


# -- deadlines and keep-alives ---------------------------------------------------------------------


async def test_flowise_streaming_to_an_unknown_flow_times_out_before_the_commit(
    tmp_path: Path,
) -> None:
    """Flowise sends nothing at all, not even a status line: first_event ends the wait."""
    async with serve_api(FLOWISE, tmp_path, timeouts={"first_event": 0.3}) as served:
        with pytest.raises(openai.APIStatusError) as info:
            await served.client().chat.completions.create(
                model="flows/00000000-0000-0000-0000-000000000000", messages=HI, stream=True)
        await wait_for(lambda: bool(served.fake.gone))
    assert info.value.status_code == 504
    assert info.value.code == "upstream_timeout"
    assert "sent no event within 0.3 s (timeouts.first_event)" in info.value.message


async def test_flowise_sync_request_to_an_unknown_flow_is_its_404(tmp_path: Path) -> None:
    async with serve_api(FLOWISE, tmp_path) as served:
        with pytest.raises(openai.NotFoundError) as info:
            await served.client().chat.completions.create(
                model="flows/00000000-0000-0000-0000-000000000000", messages=HI)
    assert "not found in the database" in info.value.message


async def test_keep_alives_reach_the_client_while_the_upstream_is_silent(tmp_path: Path) -> None:
    """Langflow sends nothing while its LLM is slow (`slow_run_stream`)."""
    held = Reply(default_stream(LANGFLOW), hold_after=LANGFLOW.first_text)
    async with serve_api(LANGFLOW, tmp_path, keepalive=0.1) as served:
        served.fake.replies.append(held)
        async with aiohttp.ClientSession() as http, http.post(
            served.proxy.url + "/v1/chat/completions",
            json={"model": LANGFLOW.model, "stream": True, "messages": HI},
            headers={"Authorization": f"Bearer {KEY}"},
        ) as resp:
            lines = []
            async for line in resp.content:
                lines.append(line)
                if line == b": keep-alive\n":
                    held.release.set()
    body = b"".join(lines).decode()
    assert body.index("You ") < body.index(": keep-alive") < body.index("Stream ")
    assert body.endswith("data: [DONE]\n\n")


async def test_an_upstream_silent_past_idle_ends_the_stream_with_a_timeout_event(
    tmp_path: Path,
) -> None:
    held = Reply(default_stream(LANGFLOW), hold_after=LANGFLOW.first_text)
    async with serve_api(LANGFLOW, tmp_path, timeouts={"idle": 0.3}) as served:
        served.fake.replies.append(held)
        events = await post_stream(served, LANGFLOW.model)
    assert text_of(events) == "You "
    assert events[-2]["error"]["code"] == "upstream_timeout"
    assert "sent nothing for 0.3 s (timeouts.idle)" in events[-2]["error"]["message"]


@pytest.mark.parametrize(
    ("api", "name", "text"),
    [
        pytest.param(FLOWISE, "flowise/slow_stream_heartbeat.response.sse",
                     "You said: SLOW35 please", id="flowise-heartbeat"),
        pytest.param(LANGGRAPH, "langgraph/slow_thread_runs_stream.response.sse",
                     "You said: SLOW stream", id="langgraph-heartbeat-crlf"),
    ],
)
async def test_heartbeat_comments_are_activity_and_never_text(
    api: Api, name: str, text: str, tmp_path: Path
) -> None:
    async with serve_api(api, tmp_path) as served:
        served.fake.replies.append(Reply(name))
        events = await post_stream(served, api.model, include_usage=True)
    assert text_of(events) == text
    assert events[-3]["choices"][0]["finish_reason"] == "stop"


# -- fallbacks -------------------------------------------------------------------------------------


async def test_flowise_answering_a_stream_with_json_is_read_with_the_sync_mapping(
    tmp_path: Path,
) -> None:
    """A flow that cannot stream gets `res.json(...)` for a streaming request."""
    reply = Reply("flowise/prediction_stream_streaming_false.response.json",
                  content_type="application/json; charset=utf-8")
    async with serve_api(FLOWISE, tmp_path) as served:
        served.fake.replies.append(reply)
        events = await post_stream(served, FLOWISE.model)
    assert text_of(events) == "You said: Streaming false"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert served.fake.chats()[0].json["streaming"] is True


async def test_n8n_in_last_node_mode_answers_one_document_read_with_the_sync_mapping(
    tmp_path: Path,
) -> None:
    async with serve_api(N8N, tmp_path) as served:
        served.fake.replies.append(Reply("n8n/last_node.response.json"))
        events = await post_stream(served, N8N.model)
        served.fake.replies.append(Reply("n8n/last_node.response.json"))
        reply = await served.client().chat.completions.create(model=N8N.model, messages=HI)
    assert text_of(events) == "Hello! I'm the agent. Anything else?"
    assert reply.choices[0].message.content == "Hello! I'm the agent. Anything else?"


async def test_n8n_content_objects_are_read_through_the_fallback_path(tmp_path: Path) -> None:
    async with serve_api(N8N, tmp_path) as served:
        served.fake.replies.append(Reply("n8n/stream_text_chunk.ndjson"))
        events = await post_stream(served, N8N.model)
    assert text_of(events) == "Hello!"


# -- repeated answers and error streams ------------------------------------------------------------


async def test_langflow_agent_recaps_and_log_events_never_repeat_the_answer(
    tmp_path: Path,
) -> None:
    """Four complete copies and a partial one follow the tokens (`recap: true`)."""
    async with serve_api(LANGFLOW, tmp_path) as served:
        served.fake.replies.append(Reply("langflow/agent_run_stream.response.ndjson"))
        events = await post_stream(served, LANGFLOW.model, include_usage=True)
    assert text_of(events) == "You said: Second turn"
    assert events[-2]["usage"] == {"prompt_tokens": 20, "completion_tokens": 4,
                                   "total_tokens": 24}


async def test_langflow_agent_error_stream_without_end_gives_the_first_errors_text(
    tmp_path: Path,
) -> None:
    async with serve_api(LANGFLOW, tmp_path) as served:
        served.fake.replies.append(Reply("langflow/error_llm_500_agent_stream.response.ndjson"))
        events = await post_stream(served, LANGFLOW.model)
    message = events[-2]["error"]["message"]
    assert message.startswith("Upstream 'langflow' reported an error: ")
    assert "fake LLM failure" in message
    assert len(message) < 400


async def test_dify_agent_thoughts_are_reasoning_only_where_the_route_shows_it(
    tmp_path: Path,
) -> None:
    async with serve_api(DIFY, tmp_path) as served:
        served.fake.replies.append(Reply("dify/agent_stream.sse"))
        hidden = await post_stream(served, DIFY.model)
    async with serve_api(DIFY, tmp_path, route_keys={"show": ["reasoning"]}) as served:
        served.fake.replies.append(Reply("dify/agent_stream.sse"))
        shown = await post_stream(served, DIFY.model)

    def reasoning(events: list[object]) -> str:
        return "".join(e["choices"][0]["delta"].get("reasoning_content") or ""  # type: ignore[index]
                       for e in events if isinstance(e, dict) and e.get("choices"))

    assert text_of(hidden) == text_of(shown) == "Hi! What do you need?"
    assert reasoning(hidden) == ""
    assert reasoning(shown) == "The user greets me; answer briefly."


# -- hint-less turns -------------------------------------------------------------------------------


async def test_langgraph_without_a_hint_runs_stateless_with_the_whole_chat(
    tmp_path: Path,
) -> None:
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Earlier"},
        {"role": "assistant", "content": "Answer"},
        {"role": "user", "content": "Stateless stream"},
    ]
    async with serve_api(LANGGRAPH, tmp_path) as served:
        reply = await served.client().chat.completions.create(
            model=LANGGRAPH.model, messages=chat)  # type: ignore[arg-type]
    (run,) = served.fake.chats()
    assert run.path == "/runs/stream"
    assert run.json == {
        "assistant_id": "agent",
        "input": {"messages": chat[1:]},
        "stream_mode": ["messages-tuple"],
        "if_not_exists": "create",
        "on_disconnect": "cancel",
    }
    assert reply.choices[0].message.content == "You said: Stateless stream"


async def test_flowise_without_a_hint_sends_the_history_and_no_chat_id(tmp_path: Path) -> None:
    chat = [
        {"role": "user", "content": "Earlier question"},
        {"role": "assistant", "content": "Earlier answer"},
        {"role": "user", "content": "With history"},
    ]
    async with serve_api(FLOWISE, tmp_path) as served:
        served.fake.replies.append(Reply("flowise/prediction_stream_history.response.sse"))
        events = await post_stream(served, FLOWISE.model, headers={}, messages=chat)
    (call,) = served.fake.chats()
    assert call.json == {
        "question": "With history",
        "history": [{"role": "userMessage", "content": "Earlier question"},
                    {"role": "apiMessage", "content": "Earlier answer"}],
        "streaming": True,
    }
    assert text_of(events) == "You said: With history"


async def test_langgraph_threads_get_uuid_ids_from_the_session_key(tmp_path: Path) -> None:
    async with serve_api(LANGGRAPH, tmp_path) as served:
        await post_stream(served, LANGGRAPH.model, headers=CHAT)
    (run,) = served.fake.chats()
    thread = run.path.split("/")[2]
    assert run.path == f"/threads/{thread}/runs/stream"
    assert run.json["input"] == {"messages": [{"role": "user", "content": "Hello"}]}
    assert len(thread) == 36 and thread[14] == "4"



# -- modes and listings ----------------------------------------------------------------------------


async def test_mode_sync_answers_a_streaming_client_in_one_batch_with_keep_alives_before(
    tmp_path: Path,
) -> None:
    """n8n in "When Last Node Finishes" mode, configured as such (`mode: sync`)."""
    held = Reply("n8n/last_node.response.json", hold_after=0)
    async with serve_api(N8N, tmp_path, mode="sync", keepalive=0.1) as served:
        served.fake.replies.append(held)
        async with aiohttp.ClientSession() as http, http.post(
            served.proxy.url + "/v1/chat/completions",
            json={"model": N8N.model, "stream": True, "messages": HI,
                  "stream_options": {"include_usage": True}},
            headers={"Authorization": f"Bearer {KEY}"},
        ) as resp:
            lines = []
            async for line in resp.content:
                lines.append(line)
                if line == b": keep-alive\n":
                    held.release.set()
    body = b"".join(lines).decode()
    events = [block for block in body.split("\n\n") if block.startswith("data: ")]
    assert body.index(": keep-alive") < body.index("data: ")
    assert '"content":"Hello! I\'m the agent. Anything else?"' in events[1]
    assert '"finish_reason":"stop"' in events[2]
    assert '"usage":{"prompt_tokens":0' in events[3] and events[4] == "data: [DONE]"


async def test_a_wildcard_route_lists_the_upstreams_models_and_calls_each_by_its_id(
    tmp_path: Path,
) -> None:
    def routes(url: str) -> str:
        text = routes_for(LANGGRAPH, url)
        wildcard = "models:\n  graphs/*: {upstream: langgraph}\n"
        return text[: text.index("models:\n  agent:")] + wildcard

    async with serve_api(LANGGRAPH, tmp_path, routes=routes) as served:
        client = served.client()
        listed = [m.id async for m in client.models.list()]
        reply = await client.chat.completions.create(
            model="graphs/agent", messages=HI, extra_headers=CHAT)
    assert listed == ["graphs/fe096781-5601-53d2-b2f6-0d3403f7e9ca"]
    assert reply.choices[0].message.content == LANGGRAPH.text
    assert served.fake.chats()[0].json["assistant_id"] == "agent"
