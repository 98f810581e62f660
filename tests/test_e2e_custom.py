"""The five APIs of custom-apis.md §7 (Dify, Flowise, Langflow, n8n, LangGraph) behind the
proxy, each configured with its worked YAML alone, through the `openai` SDK over real HTTP.

Each fake replays its server's bytes (tests/fake_agents.py). Per API: sync, stream, sync
equals the accumulated stream, session continuity, upstream errors before the body, an error
event mid-stream, a truncated stream, and a client that leaves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from proxy.openai_types import accumulate
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
    OTHER_KEY,
    Api,
    custom_env,
    post_stream,
    serve_api,
    text_of,
)
from tests.fake_agents import (
    DIFY_CONVERSATION,
    DIFY_TASK,
    FakeDify,
    Reply,
    writes_of,
)

__all__ = ["custom_env"]

apis = pytest.mark.parametrize("api", APIS, ids=API_IDS)


def session(name: str) -> dict[str, str]:
    return {"X-Session-Id": name}


# Every API's default answer is to a turn of a chat (LangGraph answers hint-less turns with
# a stateless run, which says something else).
HINT = session("chat-0")


# -- answers ---------------------------------------------------------------------------------------


@apis
async def test_a_sync_client_gets_the_whole_answer_with_usage(api: Api, tmp_path: Path) -> None:
    async with serve_api(api, tmp_path) as served:
        reply = await served.client().chat.completions.create(
            model=api.model, messages=HI, extra_headers=HINT)
    assert reply.choices[0].message.content == api.text
    assert reply.choices[0].finish_reason == "stop"
    assert reply.model == api.model
    assert reply.usage is not None
    prompt, completion, total = api.usage or (0, 0, 0)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens,
            reply.usage.total_tokens) == (prompt, completion, total)


@apis
async def test_a_stream_keeps_every_streaming_guarantee(api: Api, tmp_path: Path) -> None:
    async with serve_api(api, tmp_path) as served:
        events = await post_stream(served, api.model)
        with_usage = await post_stream(served, api.model, include_usage=True)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert len({c["created"] for c in chunks}) == 1
    assert all(c["model"] == api.model for c in chunks)
    finishes = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishes == [chunks[-1]]
    assert chunks[-1]["choices"][0] == {
        "index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert not any("usage" in c for c in chunks)
    assert text_of(events) == api.text
    # Asked for, usage comes once, last, in a chunk of its own.
    assert with_usage[-1] == "[DONE]"
    usage = with_usage[-2]
    assert usage["choices"] == [] and usage["id"] == with_usage[0]["id"]
    assert not any("usage" in c for c in with_usage[:-2])
    prompt, completion, total = api.usage or (0, 0, 0)
    assert usage["usage"] == {"prompt_tokens": prompt, "completion_tokens": completion,
                              "total_tokens": total}


@apis
async def test_the_sync_answer_equals_the_accumulated_stream(api: Api, tmp_path: Path) -> None:
    async with serve_api(api, tmp_path) as served:
        client = served.client()
        sync = await client.chat.completions.create(
            model=api.model, messages=HI, extra_headers=HINT)
        stream = await client.chat.completions.create(
            model=api.model, messages=HI, stream=True, stream_options={"include_usage": True},
            extra_headers=HINT,
        )
        chunks = [chunk.model_dump(exclude_unset=True) async for chunk in stream]
    streamed = accumulate(chunks)  # type: ignore[arg-type]
    answer = sync.model_dump(exclude_unset=True)
    for key in ("id", "created"):
        answer.pop(key)
        streamed.pop(key)  # type: ignore[misc]
    assert answer == streamed


# -- sessions --------------------------------------------------------------------------------------


@apis
async def test_turn_two_reaches_the_session_of_turn_one_and_another_key_another(
    api: Api, tmp_path: Path
) -> None:
    async with serve_api(api, tmp_path) as served:
        for key in (KEY, KEY, OTHER_KEY):
            await served.client(key).chat.completions.create(
                model=api.model, messages=HI, extra_headers=session("chat-1"))
        await served.client().chat.completions.create(
            model=api.model, messages=HI, extra_headers=session("chat-2"))
    first, second, other_key, other_chat = (api.session_of(c) for c in served.fake.chats())
    assert first == second
    assert other_key != first and other_chat != first and other_key != other_chat


async def test_dify_turn_two_continues_the_conversation_the_server_issued(
    tmp_path: Path,
) -> None:
    async with serve_api(DIFY, tmp_path) as served:
        for key in (KEY, KEY, OTHER_KEY):
            await served.client(key).chat.completions.create(
                model=DIFY.model, messages=HI, extra_headers=session("chat-1"))
    fake = served.fake
    first, second, other = (c.json for c in fake.chats())
    assert "conversation_id" not in first
    assert second["conversation_id"] == DIFY_CONVERSATION and second["user"] == first["user"]
    # The id came from turn 1's own answer (`from_response`): no lookup was needed.
    lookups = [r for r in fake.requests if r.path == "/v1/conversations"]
    assert [r.query["user"] for r in lookups] == [first["user"], other["user"]]
    assert "conversation_id" not in other and other["user"] != first["user"]


async def test_dify_without_a_hint_starts_a_conversation_of_its_own_without_a_lookup(
    tmp_path: Path,
) -> None:
    async with serve_api(DIFY, tmp_path) as served:
        for _ in range(2):
            await served.client().chat.completions.create(model=DIFY.model, messages=HI)
    first, second = (c.json for c in served.fake.chats())
    assert "conversation_id" not in first and "conversation_id" not in second
    assert first["user"] != second["user"]
    assert [r.path for r in served.fake.requests] == ["/v1/chat-messages"] * 2


async def test_dify_finds_the_conversation_by_lookup_on_a_worker_that_never_saw_it(
    tmp_path: Path,
) -> None:
    fake = FakeDify()
    async with serve_api(DIFY, tmp_path, fake) as served:
        await served.client().chat.completions.create(
            model=DIFY.model, messages=HI, extra_headers=session("chat-1"))
    # Another proxy (another worker, or this one after a restart) with the same server.
    async with serve_api(DIFY, tmp_path, fake) as served:
        await served.client().chat.completions.create(
            model=DIFY.model, messages=HI, extra_headers=session("chat-1"))
    first, second = (c.json for c in fake.chats())
    assert second["conversation_id"] == DIFY_CONVERSATION
    assert second["user"] == first["user"]


async def test_dify_a_remembered_conversation_that_is_gone_is_retried_once_without_it(
    tmp_path: Path,
) -> None:
    async with serve_api(DIFY, tmp_path) as served:
        client = served.client()
        await client.chat.completions.create(
            model=DIFY.model, messages=HI, extra_headers=session("chat-1"))
        fake = served.fake
        assert isinstance(fake, FakeDify)
        fake.conversations.clear()  # deleted in Dify's UI
        reply = await client.chat.completions.create(
            model=DIFY.model, messages=HI, extra_headers=session("chat-1"))
    assert reply.choices[0].message.content == DIFY.text
    _, stale, fresh = (c.json for c in fake.chats())
    assert stale["conversation_id"] == DIFY_CONVERSATION
    assert "conversation_id" not in fresh and fresh["user"] == stale["user"]


# -- failures before the body ----------------------------------------------------------------------

REFUSALS = [
    pytest.param(DIFY, Reply("dify/error_conversation_not_exists.response.json", status=404),
                 404, "Conversation Not Exists.", id="dify-404"),
    pytest.param(FLOWISE, Reply("flowise/error_unknown_chatflow_sync.response.json", status=404),
                 404, "Chatflow 00000000-0000-0000-0000-000000000000 not found in the database!",
                 id="flowise-404"),
    pytest.param(LANGFLOW, Reply("langflow/error_unknown_flow.response.json", status=404), 404,
                 "Flow identifier 00000000-0000-0000-0000-000000000000 not found",
                 id="langflow-404"),
    pytest.param(LANGFLOW, Reply("langflow/error_no_api_key.response.json", status=403), 502,
                 "Upstream 'langflow' refused the proxy's credentials (HTTP 403).",
                 id="langflow-403-is-502"),
    pytest.param(N8N, Reply(body=b"Authorization data is wrong!", status=401,
                            content_type="text/plain"), 502,
                 "Upstream 'n8n-agent' refused the proxy's credentials (HTTP 401).",
                 id="n8n-401-is-502"),
    pytest.param(LANGGRAPH, Reply("langgraph/error_unknown_assistant_runs_stream.response.txt",
                                  status=422, content_type="application/json"), 422,
                 "Invalid assistant: 'nope'. Must be either: - A valid assistant UUID, or - One "
                 "of the registered graphs: agent", id="langgraph-422"),
    pytest.param(FLOWISE, Reply("flowise/error_llm_500_sync.response.json", status=500), 502,
                 "Upstream 'flowise' failed with HTTP 500: Error: predictionsServices."
                 "buildChatflow - 500 fake LLM failure (FAIL in prompt)", id="flowise-500"),
    pytest.param(DIFY, Reply(body=b"<html>Bad Gateway</html>", status=502,
                             content_type="text/html"), 502,
                 "Upstream 'dify-support' failed with HTTP 502", id="dify-html-502"),
]


@pytest.mark.parametrize(("api", "reply", "status", "message"), REFUSALS)
@pytest.mark.parametrize("stream", [False, True], ids=["sync", "stream"])
async def test_an_upstream_refusal_before_the_body_is_a_real_http_error(
    api: Api, reply: Reply, status: int, message: str, stream: bool, tmp_path: Path
) -> None:
    async with serve_api(api, tmp_path) as served:
        served.fake.replies.append(reply)
        with pytest.raises(openai.APIStatusError) as info:
            if stream:
                await served.client().chat.completions.create(
                    model=api.model, messages=HI, stream=True, extra_headers=HINT)
            else:
                await served.client().chat.completions.create(
                    model=api.model, messages=HI, extra_headers=HINT)
    assert info.value.status_code == status
    body: Any = info.value.body
    assert body["message"] == message


async def test_langflows_500_detail_is_shortened_to_one_line(tmp_path: Path) -> None:
    async with serve_api(LANGFLOW, tmp_path) as served:
        served.fake.replies.append(Reply("langflow/error_llm_500_sync.response.json", status=500))
        with pytest.raises(openai.APIStatusError) as info:
            await served.client().chat.completions.create(model=LANGFLOW.model, messages=HI)
    body: Any = info.value.body
    message = body["message"]
    assert info.value.status_code == 502
    assert message.startswith("Upstream 'langflow' failed with HTTP 500: {\"message\"")
    # The upstream's traceback is cut: one line, 300 characters of the detail at most.
    assert "\n" not in message and len(message) < 400


# -- failures in the stream ------------------------------------------------------------------------

ERRORS = [
    (DIFY, "dify/error_stream.sse", "Hello there", "[openai] Rate limit reached for requests"),
    (FLOWISE, "flowise/error_llm_500_stream.response.sse", "",
     "Error: predictionsServices.buildChatflow - 500 fake LLM failure"),
    (LANGFLOW, "langflow/error_llm_500_stream.response.ndjson", "",
     "Error code: 500 - {'error': {'message': 'fake LLM failure (FAIL in prompt)'"),
    (N8N, "n8n/error_stream.ndjson", "Hello", "Execution stopped: the model returned 429"),
    (LANGGRAPH, "langgraph/error_llm_500_thread_runs_stream.response.sse", "",
     "An internal error occurred"),
]
ERROR_STREAMS = [pytest.param(*error, id=error[0].name) for error in ERRORS]
# Flowise and Langflow stream only when the client does (`mode: client`).
STREAMED_FOR_SYNC = [pytest.param(*error, id=error[0].name) for error in ERRORS
                     if error[0] not in (FLOWISE, LANGFLOW)]


@pytest.mark.parametrize(("api", "name", "before", "message"), ERROR_STREAMS)
async def test_an_error_event_after_the_commit_ends_the_stream_with_an_error_event(
    api: Api, name: str, before: str, message: str, tmp_path: Path
) -> None:
    async with serve_api(api, tmp_path) as served:
        served.fake.replies.append(Reply(name))
        events = await post_stream(served, api.model)
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["code"] == "upstream_error"
    assert error["message"].startswith(f"Upstream '{_upstream(api)}' reported an error: ")
    assert message in error["message"]
    assert text_of(events) == before
    assert not any(e["choices"][0]["finish_reason"] for e in events[:-2])


@pytest.mark.parametrize(("api", "name", "before", "message"), STREAMED_FOR_SYNC)
async def test_an_error_event_is_a_502_for_a_sync_client(
    api: Api, name: str, before: str, message: str, tmp_path: Path
) -> None:
    async with serve_api(api, tmp_path) as served:
        served.fake.replies.append(Reply(name))
        with pytest.raises(openai.APIStatusError) as info:
            await served.client().chat.completions.create(
                model=api.model, messages=HI, extra_headers=HINT)
    assert info.value.status_code == 502
    assert message in info.value.message


@apis
async def test_a_dropped_connection_mid_stream_is_an_error_event(api: Api, tmp_path: Path) -> None:
    async with serve_api(api, tmp_path) as served:
        served.fake.replies.append(Reply(_default_stream(api), abort_after=api.first_text))
        events = await post_stream(served, api.model)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["message"] == (
        f"Upstream '{_upstream(api)}' closed the connection in the middle of the stream.")
    assert text_of(events[:-2]) != ""


@pytest.mark.parametrize("api", [a for a in APIS if a.has_end], ids=lambda a: a.name)
async def test_a_clean_eof_before_the_end_event_is_a_truncated_answer(
    api: Api, tmp_path: Path
) -> None:
    async with serve_api(api, tmp_path) as served:
        served.fake.replies.append(Reply(_default_stream(api), cut_after=api.first_text))
        events = await post_stream(served, api.model)
    assert events[-2]["error"]["message"] == (
        f"Upstream '{_upstream(api)}' ended its stream before its end event: the answer is "
        "truncated.")


@pytest.mark.parametrize("api", [a for a in APIS if not a.has_end], ids=lambda a: a.name)
async def test_without_an_end_event_eof_ends_the_answer(api: Api, tmp_path: Path) -> None:
    async with serve_api(api, tmp_path) as served:
        served.fake.replies.append(Reply(_default_stream(api), cut_after=api.first_text))
        events = await post_stream(served, api.model)
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert text_of(events) != ""


# -- a client that leaves --------------------------------------------------------------------------


@apis
async def test_a_client_that_leaves_closes_the_upstream_request(api: Api, tmp_path: Path) -> None:
    held = Reply(_default_stream(api), hold_after=api.first_text)
    async with serve_api(api, tmp_path) as served:
        served.fake.replies.append(held)
        await _read_first_text_and_leave(served.proxy.url, api.model)
        await wait_for(lambda: bool(served.fake.gone))
        # The session's lock was let go: the next turn of the same chat is served.
        reply = await served.client().chat.completions.create(
            model=api.model, messages=HI, extra_headers=session("leaving"))
    assert reply.choices[0].message.content == api.text


async def test_dify_a_client_that_leaves_stops_the_task_with_the_captured_task_id(
    tmp_path: Path,
) -> None:
    held = Reply("dify/chat_stream.sse", hold_after=DIFY.first_text)
    async with serve_api(DIFY, tmp_path) as served:
        fake = served.fake
        assert isinstance(fake, FakeDify)
        fake.replies.append(held)
        await _read_first_text_and_leave(served.proxy.url, DIFY.model)
        await wait_for(lambda: bool(fake.stops))
    (stop,) = fake.stops
    assert stop.path == f"/v1/chat-messages/{DIFY_TASK}/stop"
    assert stop.json == {"user": fake.chats()[0].json["user"]}
    assert stop.headers["Authorization"] == "Bearer app-dify-test-key"


async def test_dify_a_finished_stream_is_never_stopped(tmp_path: Path) -> None:
    async with serve_api(DIFY, tmp_path) as served:
        fake = served.fake
        assert isinstance(fake, FakeDify)
        await post_stream(served, DIFY.model, headers=session("done"))
        await served.client().chat.completions.create(
            model=DIFY.model, messages=HI, extra_headers=session("done"))
        # Also the client that leaves after the end event came.
        writes = len(writes_of("dify/chat_stream.sse"))
        fake.replies.append(Reply("dify/chat_stream.sse", hold_after=writes))
        await _read_until_finish_and_leave(served.proxy.url, DIFY.model)
        await wait_for(lambda: bool(fake.gone))
    assert fake.stops == []


# -- a client's value in an upstream's path --------------------------------------------------------

PATH_ROUTES = """
upstreams:
{blocks}
models:
  "flows/*": {{upstream: [cu0, cu1]}}
"""
PATH_BLOCK = """\
  {name}:
    kind: custom
    url: {url}
    mode: sync
    request:
      path: "/p/{{{{ model }}}}/u/{{{{ user }}}}"
      body: {{message: "{{{{ input }}}}"}}
    sync:
      text: reply
    models: {{path: /models, items: "[*]", id: id}}
"""


def _two_upstreams(block: str, url0: str, url1: str) -> str:
    blocks = block.format(name="cu0", url=url0) + block.format(name="cu1", url=url1)
    return PATH_ROUTES.format(blocks=blocks)


@asynccontextmanager
async def _two_recorders() -> AsyncIterator[tuple[str, str, list[str]]]:
    """Two upstreams that answer every turn `{"reply": "ok"}`, recording each one's raw path
    in the one list they share."""
    seen: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        if request.path == "/models":
            return web.json_response([])
        seen.append(request.raw_path)
        return web.json_response({"reply": "ok"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    async with serving(app) as up0, serving(app) as up1:
        yield up0, up1, seen


async def _circuits_untouched(url: str) -> None:
    """Neither upstream of `_two_upstreams` counted a failure."""
    async with aiohttp.ClientSession() as http, http.get(url + "/readyz") as resp:
        ready = await resp.json()
    for name in ("cu0", "cu1"):
        assert ready["upstreams"][name]["state"] == "closed"
        assert ready["upstreams"][name]["consecutive_failures"] == 0


async def _refused_for_its_path(
    client: openai.AsyncOpenAI, param: str, streams: tuple[bool, ...], **request: Any
) -> None:
    """One chat request per entry of `streams` (sync or streamed), each a 400
    `upstream_path_value` that names `param`."""
    for stream in streams:
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(messages=HI, stream=stream, **request)
        body: Any = info.value.body
        assert (body["param"], body["code"]) == (param, "upstream_path_value")
        assert body["type"] == "invalid_request_error"
        assert f"`{param}`" in body["message"]


@pytest.mark.parametrize(
    ("model", "user", "param"),
    [
        pytest.param("flows/..", "u", "model", id="dot-dot-model"),
        pytest.param("flows/.", "u", "model", id="dot-model"),
        pytest.param("flows/a", None, "user", id="missing-user"),
        pytest.param("flows/a", "", "user", id="empty-user"),
    ],
)
async def test_a_client_value_that_cannot_be_a_path_segment_is_a_400_and_no_upstream_failure(
    make_proxy: ProxyFactory, model: str, user: str | None, param: str
) -> None:
    async with _two_recorders() as (up0, up1, seen):
        proxy = await make_proxy(_two_upstreams(PATH_BLOCK, up0, up1))
        client = proxy.client()
        extra = {} if user is None else {"user": user}
        await _refused_for_its_path(client, param, (False, True, False), model=model, **extra)
        assert seen == []
        await _circuits_untouched(proxy.url)
        # The first upstream still takes the next good request: it was never failed over.
        reply = await client.chat.completions.create(model="flows/a", messages=HI, user="u")
    assert reply.choices[0].message.content == "ok"
    assert seen == ["/p/a/u/u"]


ISSUED_BLOCK = """\
  {name}:
    kind: custom
    url: {url}
    mode: sync
    session:
      lookup: {{method: GET, path: /lookup, id: id}}
    request:
      path: "/c/{{{{ session.id }}}}"
      body: {{message: "{{{{ input }}}}"}}
    sync:
      text: reply
    models: {{path: /models, items: "[*]", id: id}}
"""


@pytest.mark.parametrize("bad", ["..", "s" * 513, "s\x01"],
                         ids=["not-a-path-segment", "too-long", "control-character"])
async def test_a_server_issued_id_that_cannot_be_used_is_that_upstreams_failure(
    bad: str, make_proxy: ProxyFactory,
) -> None:
    seen: list[str] = []

    def app(issued: str) -> web.Application:
        async def answer(request: web.Request) -> web.Response:
            if request.path == "/models":
                return web.json_response([])
            seen.append(request.raw_path)
            if request.path == "/lookup":
                return web.json_response({"id": issued})
            return web.json_response({"reply": f"ok from {issued}"})

        served = web.Application()
        served.router.add_route("*", "/{tail:.*}", answer)
        return served

    async with serving(app(bad)) as up0, serving(app("s1")) as up1:
        proxy = await make_proxy(_two_upstreams(ISSUED_BLOCK, up0, up1))
        reply = await proxy.client().chat.completions.create(
            model="flows/a", messages=HI, extra_headers=session("issued"))
        async with aiohttp.ClientSession() as http, http.get(proxy.url + "/readyz") as resp:
            ready = await resp.json()
    # cu0's own answer gave the bad id: its failure, and the turn went on to cu1.
    assert reply.choices[0].message.content == "ok from s1"
    assert seen == ["/lookup", "/lookup", "/c/s1"]
    assert ready["upstreams"]["cu0"]["consecutive_failures"] == 1
    assert ready["upstreams"]["cu1"]["consecutive_failures"] == 0


DERIVED_BLOCK = """\
  {name}:
    kind: custom
    url: {url}
    mode: sync
    session:
      id: "{{{{ user }}}}"
    request:
      path: "/c/{{{{ session.id }}}}"
      body: {{message: "{{{{ input }}}}"}}
    sync:
      text: reply
    models: {{path: /models, items: "[*]", id: id}}
"""


@pytest.mark.parametrize("user", ["..", ".", "", None], ids=["dot-dot", "dot", "empty", "none"])
async def test_a_session_id_made_from_a_client_field_that_cannot_be_a_path_segment_is_a_400(
    make_proxy: ProxyFactory, user: str | None
) -> None:
    async with _two_recorders() as (up0, up1, seen):
        proxy = await make_proxy(_two_upstreams(DERIVED_BLOCK, up0, up1))
        client = proxy.client()
        extra = {} if user is None else {"user": user}
        await _refused_for_its_path(client, "user", (False, True, False), model="flows/a",
                                    extra_headers=session("s"), **extra)
        assert seen == []
        await _circuits_untouched(proxy.url)
        reply = await client.chat.completions.create(
            model="flows/a", messages=HI, user="u", extra_headers=session("s"))
    assert reply.choices[0].message.content == "ok"
    assert seen == ["/c/u"]


CANCEL_PATH_BLOCK = """\
  {name}:
    kind: custom
    url: {url}
    mode: sync
    session:
      id: "{{{{ user }}}}"
    request:
      path: /c
      body: {{message: "{{{{ input }}}}", session: "{{{{ session.id }}}}"}}
    sync:
      text: reply
    cancel: {{path: "/stop/{{{{ session.id }}}}"}}
    models: {{path: /models, items: "[*]", id: id}}
"""


@pytest.mark.parametrize("user", ["..", ".", ""], ids=["dot-dot", "dot", "empty"])
async def test_a_session_id_from_a_client_field_that_only_the_cancel_path_uses_is_a_400_too(
    make_proxy: ProxyFactory, user: str
) -> None:
    # Caught up front: the cancel, sent in the background after the client left, could only
    # fail where the client never sees it.
    async with _two_recorders() as (up0, up1, seen):
        proxy = await make_proxy(_two_upstreams(CANCEL_PATH_BLOCK, up0, up1))
        client = proxy.client()
        await _refused_for_its_path(client, "user", (False, True), model="flows/a",
                                    extra_headers=session("s"), user=user)
        assert seen == []
        await _circuits_untouched(proxy.url)
        reply = await client.chat.completions.create(
            model="flows/a", messages=HI, user="u", extra_headers=session("s"))
    assert reply.choices[0].message.content == "ok"
    assert seen == ["/c"]


async def _read_first_text_and_leave(url: str, model: str) -> None:
    async with aiohttp.ClientSession() as http, http.post(
        url + "/v1/chat/completions",
        json={"model": model, "stream": True, "messages": HI},
        headers={"Authorization": f"Bearer {KEY}", **session("leaving")},
    ) as resp:
        assert resp.status == 200
        async for line in resp.content:
            if b'"content":"' in line and b'"content":""' not in line:
                return


async def _read_until_finish_and_leave(url: str, model: str) -> None:
    async with aiohttp.ClientSession() as http, http.post(
        url + "/v1/chat/completions",
        json={"model": model, "stream": True, "messages": HI},
        headers={"Authorization": f"Bearer {KEY}"},
    ) as resp:
        async for line in resp.content:
            if b'"finish_reason":"stop"' in line:
                return


def _upstream(api: Api) -> str:
    return {"dify": "dify-support", "n8n": "n8n-agent"}.get(api.name, api.name)


def _default_stream(api: Api) -> str:
    return {
        "dify": "dify/chat_stream.sse",
        "flowise": "flowise/prediction_stream_chatid.response.sse",
        "langflow": "langflow/run_stream.response.ndjson",
        "n8n": "n8n/stream.ndjson",
        "langgraph": "langgraph/thread_runs_stream_messages_tuple.response.sse",
    }[api.name]



@pytest.mark.parametrize("stream", [False, True], ids=["sync", "stream"])
@pytest.mark.parametrize(("fields", "param"), [
    pytest.param({"n": 3}, "n", id="n"),
    pytest.param({"logprobs": True}, "logprobs", id="logprobs"),
    pytest.param({"response_format": {"type": "json_object"}}, "response_format",
                 id="json_object"),
    pytest.param({"tools": [{"type": "function", "function": {"name": "f"}}],
                  "tool_choice": {"type": "function", "function": {"name": "f"}}},
                 "tool_choice", id="tool_choice"),
    pytest.param({"web_search_options": {}}, "web_search_options", id="web_search"),
])
async def test_a_parameter_a_custom_agent_cannot_honour_is_a_400_before_any_upstream_call(
    tmp_path: Path, fields: dict[str, Any], param: str, stream: bool
) -> None:
    async with serve_api(DIFY, tmp_path) as served:
        with pytest.raises(openai.BadRequestError) as caught:
            await served.client().chat.completions.create(
                model=DIFY.model, messages=HI, stream=stream, extra_headers=HINT,
                extra_body=fields)
        assert served.fake.requests == []
    assert (caught.value.param, caught.value.type) == (param, "invalid_request_error")


async def test_parameters_a_custom_agent_ignores_on_purpose_are_still_served(
    tmp_path: Path,
) -> None:
    async with serve_api(DIFY, tmp_path) as served:
        reply = await served.client().chat.completions.create(
            model=DIFY.model, messages=HI, extra_headers=HINT, temperature=0.1, max_tokens=5,
            stop=["\n"], seed=1, tool_choice="none", parallel_tool_calls=False,
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
            logprobs=False, modalities=["text"], metadata={"team": "a"}, store=True)
    assert reply.choices[0].message.content == DIFY.text
