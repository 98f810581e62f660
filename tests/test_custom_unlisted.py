"""Agent servers that appear nowhere in custom-apis.md, configured only in this file's YAML:
the `custom` kind must serve them with no code of their own.

- Parrot: a plain-text streamer (`text` framing, no rules), a sync answer whose text is a
  list of parts under a nested path, the caller's session key in the query string, a bot id
  (the route's model) that needs percent-encoding, and a client header passed on.
- Relay: sessions the server must create first (`session.create`, answered 409 once they
  exist, remembered per worker), SSE with named events whose nested JSON holds the text so
  far (`cumulative`), a finish reason, usage without a total, a named error event, and a
  DELETE to cancel the turn by an id captured from the stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from tests.conftest import KEY, wait_for
from tests.custom_e2e import HI, Api, Served, post_stream, serve_api, text_of
from tests.fake_agents import FakeAgent, Recorded, Reply

PARROT_KEY = "parrot-secret-key-1"
BOT = "team/a b"

PARROT = """\
upstreams:
  parrot:
    kind: custom
    url: {url}/parrot/api
    api_key: ${{PARROT_KEY}}
    forward_headers: [X-Tenant]
    request:
      path: "/bots/{{{{ model }}}}/say"
      query: {{conversation: "{{{{ session.key }}}}"}}
      body:
        prompt: "{{{{ transcript }}}}"
        meta: {{request: "{{{{ request_id }}}}", streaming: "{{{{ stream }}}}"}}
    sync:
      text: "result.parts[*].text"
      usage: {{prompt_tokens: result.counts.in, completion_tokens: result.counts.out}}
      finish: result.stop
    stream:
      framing: text
models:
  parrot:
    upstream: parrot
    model: "{model}"
"""

# "Hello, café ☕" with its UTF-8 cut inside both multi-byte characters.
PARROT_TEXT = "Hello, café ☕"
_ENCODED = PARROT_TEXT.encode()
PARROT_WRITES = (_ENCODED[:11], _ENCODED[11:14], _ENCODED[14:])
PARROT_SYNC = orjson.dumps({"result": {
    "parts": [{"text": "Hello, "}, None, {"type": "text", "text": "café ☕"},
              {"type": "image", "url": "x"}],
    "counts": {"in": 5, "out": 2}, "stop": "length",
}})


class FakeParrot(FakeAgent):
    chat_paths = (r"/parrot/api/bots/.+/say",)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/parrot/api/bots/{tail:.+}", self.say)
        return app

    async def say(self, request: web.Request) -> web.StreamResponse:
        recorded = await self.record(request)
        recorded.query["raw_path"] = request.raw_path
        if recorded.json["meta"]["streaming"]:
            return await self.answer(request, self.next_reply(Reply(parts=PARROT_WRITES)),
                                     stream_type="text/plain; charset=utf-8")
        return await self.answer(request, self.next_reply(
            Reply(body=PARROT_SYNC, content_type="application/json")))


RELAY = """\
upstreams:
  relay:
    kind: custom
    url: {url}/relay
    mode: stream
    session:
      id: "{{{{ session.uuid }}}}"
      create:
        method: PUT
        path: "/sessions/{{{{ session.id }}}}"
        body: {{owner: "{{{{ caller }}}}"}}
        ok: [409]
      cache: 60
    request:
      path: "/sessions/{{{{ session.id }}}}/turns"
      body: {{input: {{text: "{{{{ input }}}}"}}, options: {{stream: true}}}}
    stream:
      framing: sse
      rules:
        - when: {{$event: progress}}
          text: payload.answer.so_far
          cumulative: true
          capture: {{turn: payload.turn}}
        - when: {{$event: thinking}}
          reasoning: payload.note
        - when: {{$event: failed}}
          error: payload.problem.detail
        - when: {{$event: finished}}
          usage: {{prompt_tokens: payload.usage.input, completion_tokens: payload.usage.output}}
          finish: payload.reason
          end: true
    error_message: [problem.detail]
    cancel:
      method: DELETE
      path: "/sessions/{{{{ session.id }}}}/turns/{{{{ captured.turn }}}}"
models:
  relay: {{upstream: relay}}
"""


def relay_event(name: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps({"payload": payload}) + b"\n\n"


RELAY_STREAM = (
    b": relay v2\n\n",
    relay_event("progress", {"turn": "t-1", "answer": {"so_far": "Hel"}}),
    relay_event("thinking", {"note": "short answer"}),
    relay_event("progress", {"turn": "t-1", "answer": {"so_far": "Hello"}}),
    relay_event("progress", {"turn": "t-1", "answer": {"so_far": "Hello"}}),
    relay_event("progress", {"turn": "t-1", "answer": {"so_far": "Hello world"}}),
    relay_event("finished", {"usage": {"input": 3, "output": 2}, "reason": "length"}),
)


class FakeRelay(FakeAgent):
    chat_paths = (r"/relay/sessions/[^/]+/turns",)

    def __init__(self) -> None:
        super().__init__()
        self.sessions: dict[str, list[str]] = {}
        self.cancelled: list[Recorded] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_put("/relay/sessions/{sid}", self.create)
        app.router.add_post("/relay/sessions/{sid}/turns", self.turn)
        app.router.add_delete("/relay/sessions/{sid}/turns/{turn}", self.cancel)
        return app

    async def create(self, request: web.Request) -> web.Response:
        await self.record(request)
        sid = request.match_info["sid"]
        if sid in self.sessions:
            return web.json_response({"problem": {"detail": "exists"}}, status=409)
        self.sessions[sid] = []
        return web.json_response({"id": sid}, status=201)

    async def turn(self, request: web.Request) -> web.StreamResponse:
        recorded = await self.record(request)
        sid = request.match_info["sid"]
        if sid not in self.sessions:
            return web.json_response({"problem": {"detail": f"no session {sid}"}}, status=404)
        self.sessions[sid].append(recorded.json["input"]["text"])
        return await self.answer(request, self.next_reply(Reply(parts=RELAY_STREAM)),
                                 session=sid)

    async def cancel(self, request: web.Request) -> web.Response:
        self.cancelled.append(await self.record(request))
        return web.Response(status=204)


# An Api entry only for serve_api: these servers have no §7 config.
def _api(name: str) -> Api:
    return Api(name, "", FakeAgent, "", name, None, "", None, lambda r: "", True, 1)


@asynccontextmanager
async def serve(
    template: str, fake: FakeAgent, tmp_path: Path, **fields: str
) -> AsyncIterator[Served]:
    def routes(url: str) -> str:
        return template.format(url=url, **fields)

    async with serve_api(_api("unlisted"), tmp_path, fake, routes=routes) as served:
        yield served


@pytest.fixture(autouse=True)
def parrot_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARROT_KEY", PARROT_KEY)


# -- Parrot ----------------------------------------------------------------------------------------


async def test_a_plain_text_stream_is_the_answer_with_utf8_split_across_reads(
    tmp_path: Path,
) -> None:
    async with serve(PARROT, FakeParrot(), tmp_path, model=BOT) as served:
        events = await post_stream(served, "parrot", headers={"X-Tenant": "blue"}, messages=[
            {"role": "system", "content": "Be brief."}, *HI])
    assert text_of(events) == PARROT_TEXT
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    (call,) = served.fake.chats()
    # The bot id is one path segment, whatever it holds; the session key a query value.
    assert call.query["raw_path"].startswith("/parrot/api/bots/team%2Fa%20b/say?conversation=ap-")
    assert call.headers["Authorization"] == f"Bearer {PARROT_KEY}"
    assert call.headers["X-Tenant"] == "blue"
    assert call.json["prompt"] == "User: Hello"
    assert call.json["meta"]["streaming"] is True
    assert call.json["meta"]["request"]


async def test_a_nested_sync_answer_joins_its_text_parts_and_totals_its_usage(
    tmp_path: Path,
) -> None:
    async with serve(PARROT, FakeParrot(), tmp_path, model=BOT) as served:
        reply = await served.client().chat.completions.create(model="parrot", messages=HI)
    assert reply.choices[0].message.content == PARROT_TEXT
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens,
            reply.usage.total_tokens) == (5, 2, 7)


@pytest.mark.parametrize("model", ["..", "."], ids=["dot-dot", "dot"])
async def test_a_path_value_that_would_move_the_request_is_refused(
    model: str, tmp_path: Path
) -> None:
    async with serve(PARROT, FakeParrot(), tmp_path, model=model) as served:
        with pytest.raises(openai.APIStatusError) as info:
            await served.client().chat.completions.create(model="parrot", messages=HI)
    # The model is the request's (here the route's upstream name for it): never the upstream's
    # failure.
    assert info.value.status_code == 400
    assert info.value.code == "upstream_path_value"
    assert info.value.param == "model"
    assert served.fake.requests == []


async def test_the_upstream_key_never_reaches_the_client_in_an_error(tmp_path: Path) -> None:
    leak = orjson.dumps({"message": f"bad key {PARROT_KEY} for this bot"})
    async with serve(PARROT, FakeParrot(), tmp_path, model=BOT) as served:
        served.fake.replies.append(Reply(body=leak, status=400, content_type="application/json"))
        with pytest.raises(openai.BadRequestError) as info:
            await served.client().chat.completions.create(model="parrot", messages=HI)
    assert PARROT_KEY not in info.value.message
    assert "bad key [redacted] for this bot" in info.value.message


# -- Relay -----------------------------------------------------------------------------------------

CHAT = {"X-Session-Id": "relay-chat"}


async def test_cumulative_text_a_finish_reason_and_usage_from_named_events(
    tmp_path: Path,
) -> None:
    async with serve(RELAY, FakeRelay(), tmp_path) as served:
        events = await post_stream(served, "relay", headers=CHAT, include_usage=True)
        reply = await served.client().chat.completions.create(
            model="relay", messages=HI, extra_headers=CHAT)
    deltas = [e["choices"][0]["delta"].get("content") for e in events[1:-3]]
    assert deltas == ["Hel", "lo", " world"]
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert reply.choices[0].message.content == "Hello world"
    assert reply.choices[0].finish_reason == "length"


async def test_a_session_is_created_once_and_a_restarted_worker_accepts_409(
    tmp_path: Path,
) -> None:
    fake = FakeRelay()
    async with serve(RELAY, fake, tmp_path) as served:
        for _ in range(2):
            await served.client().chat.completions.create(
                model="relay", messages=HI, extra_headers=CHAT)
    async with serve(RELAY, fake, tmp_path) as served:
        reply = await served.client().chat.completions.create(
            model="relay", messages=HI, extra_headers=CHAT)
    assert reply.choices[0].message.content == "Hello world"
    calls = [(r.method, r.path.split("/")[-1]) for r in fake.requests]
    assert calls == [("PUT", calls[0][1]), ("POST", "turns"), ("POST", "turns"),
                     ("PUT", calls[0][1]), ("POST", "turns")]
    (sid,) = fake.sessions
    assert fake.sessions[sid] == ["Hello", "Hello", "Hello"]
    assert fake.requests[0].json == {"owner": fake.requests[3].json["owner"]}


async def test_a_remembered_session_the_server_lost_is_created_again_once(
    tmp_path: Path,
) -> None:
    fake = FakeRelay()
    async with serve(RELAY, fake, tmp_path) as served:
        await served.client().chat.completions.create(
            model="relay", messages=HI, extra_headers=CHAT)
        fake.sessions.clear()  # the server restarted
        reply = await served.client().chat.completions.create(
            model="relay", messages=HI, extra_headers=CHAT)
    assert reply.choices[0].message.content == "Hello world"
    assert [r.method for r in fake.requests] == ["PUT", "POST", "POST", "PUT", "POST"]


async def test_a_named_error_event_is_the_streams_error(tmp_path: Path) -> None:
    failing = (RELAY_STREAM[1],
               relay_event("failed", {"problem": {"detail": "tool crashed"}}))
    async with serve(RELAY, FakeRelay(), tmp_path) as served:
        served.fake.replies.append(Reply(parts=failing))
        events = await post_stream(served, "relay", headers=CHAT)
    assert text_of(events) == "Hel"
    assert events[-2]["error"]["message"] == "Upstream 'relay' reported an error: tool crashed"


async def test_a_refused_turn_reports_the_configured_error_message(tmp_path: Path) -> None:
    refused = orjson.dumps({"problem": {"detail": "input too long"}})
    async with serve(RELAY, FakeRelay(), tmp_path) as served:
        served.fake.replies.append(Reply(body=refused, status=413,
                                         content_type="application/json"))
        with pytest.raises(openai.APIStatusError) as info:
            await served.client().chat.completions.create(
                model="relay", messages=HI, extra_headers=CHAT)
    assert info.value.status_code == 413
    assert info.value.message.endswith("input too long")


async def _leave_after_hel(proxy_url: str) -> None:
    """A streamed turn to the relay route, left as soon as its first text has come."""
    async with aiohttp.ClientSession() as http, http.post(
        proxy_url + "/v1/chat/completions",
        json={"model": "relay", "stream": True, "messages": HI},
        headers={"Authorization": f"Bearer {KEY}", **CHAT},
    ) as resp:
        async for line in resp.content:
            if b'"Hel"' in line:
                return


async def test_a_client_that_leaves_cancels_the_turn_by_its_captured_id(tmp_path: Path) -> None:
    held = Reply(parts=RELAY_STREAM, hold_after=2)
    fake = FakeRelay()
    async with serve(RELAY, fake, tmp_path) as served:
        fake.replies.append(held)
        await _leave_after_hel(served.proxy.url)
        await wait_for(lambda: bool(fake.cancelled))
    (cancel,) = fake.cancelled
    (sid,) = fake.sessions
    assert cancel.path == f"/relay/sessions/{sid}/turns/t-1"
    assert cancel.json is None


async def test_cancel_reads_on_for_a_value_the_stream_had_not_sent_yet(tmp_path: Path) -> None:
    # The client leaves after the comment, before the event that carries the turn id; the
    # upstream goes on (and its connection drops after two more events, still unfinished).
    held = Reply(parts=RELAY_STREAM, hold_after=1, abort_after=3)
    fake = FakeRelay()
    async with serve(RELAY, fake, tmp_path) as served:
        fake.replies.append(held)
        stream = asyncio.create_task(post_stream(served, "relay", headers=CHAT))
        await held.held.wait()
        await wait_for(lambda: served.in_flight == 1)
        stream.cancel()
        await asyncio.gather(stream, return_exceptions=True)
        await wait_for(lambda: served.in_flight == 0)
        held.release.set()
        await wait_for(lambda: bool(fake.cancelled))
    assert [c.path.rsplit("/", 1)[1] for c in fake.cancelled] == ["t-1"]


async def test_no_cancel_when_the_answer_ends_while_the_cancel_reads_on(tmp_path: Path) -> None:
    held = Reply(parts=RELAY_STREAM, hold_after=1)
    fake = FakeRelay()
    async with serve(RELAY, fake, tmp_path) as served:
        fake.replies.append(held)
        stream = asyncio.create_task(post_stream(served, "relay", headers=CHAT))
        await held.held.wait()
        await wait_for(lambda: served.in_flight == 1)
        stream.cancel()
        await asyncio.gather(stream, return_exceptions=True)
        await wait_for(lambda: served.in_flight == 0)
        held.release.set()
        await wait_for(lambda: fake.completed == 1)
        # The next turn of the session runs; the finished one was never cancelled.
        await served.client().chat.completions.create(
            model="relay", messages=HI, extra_headers=CHAT)
    assert fake.cancelled == []


def nested(depth: int, leaf: str) -> orjson.Fragment:
    """`leaf` inside `depth` lists, as JSON bytes (orjson reads 1,024 levels, writes 254)."""
    return orjson.Fragment(b"[" * depth + orjson.dumps(leaf) + b"]" * depth)


async def test_text_nested_in_too_many_lists_is_the_upstreams_failure(tmp_path: Path) -> None:
    # Each list level of a text is a Python call: 600 would pass the recursion limit.
    deep = relay_event("progress", {"turn": "t-1", "answer": {"so_far": nested(600, "x")}})
    held = Reply(parts=(RELAY_STREAM[1], deep), hold_after=1)
    fake = FakeRelay()
    async with serve(RELAY, fake, tmp_path) as served:
        fake.replies.append(Reply(parts=(deep,)))
        with pytest.raises(openai.APIStatusError) as info:
            await served.client().chat.completions.create(
                model="relay", messages=HI, extra_headers=CHAT)
        fake.replies.append(held)
        events: list[bytes] = []
        async with aiohttp.ClientSession() as http, http.post(
            served.proxy.url + "/v1/chat/completions",
            json={"model": "relay", "stream": True, "messages": HI},
            headers={"Authorization": f"Bearer {KEY}", **CHAT},
        ) as resp:
            assert resp.status == 200
            async for line in resp.content:
                if line.startswith(b"data: "):
                    events.append(line[6:].strip())
                if b'"Hel"' in line:
                    held.release.set()
    assert info.value.status_code == 502
    assert info.value.code == "upstream_error"
    assert "nested in more than 32 lists" in info.value.message
    assert events[-1] == b"[DONE]"
    error = orjson.loads(events[-2])["error"]
    assert error["code"] == "upstream_error"
    assert "nested in more than 32 lists" in error["message"]


async def test_an_error_nested_in_too_many_lists_is_still_the_upstreams_reported_error(
    tmp_path: Path,
) -> None:
    failing = relay_event("failed", {"problem": {"detail": nested(600, "tool crashed")}})
    async with serve(RELAY, FakeRelay(), tmp_path) as served:
        served.fake.replies.append(Reply(parts=(failing,)))
        with pytest.raises(openai.APIStatusError) as info:
            await served.client().chat.completions.create(
                model="relay", messages=HI, extra_headers=CHAT)
    assert info.value.status_code == 502
    assert info.value.message.endswith("Upstream 'relay' reported an error: the request failed")


CANCEL_BY_PATH = """\
    cancel:
      method: DELETE
      path: "/sessions/{{{{ session.id }}}}/turns/{{{{ captured.turn }}}}"
"""
CANCEL_BY_BODY = """\
    cancel:
      method: POST
      path: "/sessions/{{{{ session.id }}}}/stop"
      body: {{turn: "{{{{ captured.turn }}}}"}}
"""


@pytest.mark.parametrize("cancel", [CANCEL_BY_PATH, CANCEL_BY_BODY], ids=["path", "body"])
async def test_a_captured_value_too_deep_to_send_back_skips_the_cancel_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, cancel: str
) -> None:
    assert CANCEL_BY_PATH in RELAY
    deep = relay_event("progress", {"turn": nested(300, "t-1"), "answer": {"so_far": "Hel"}})
    held = Reply(parts=(deep,), hold_after=1)
    fake = FakeRelay()
    async with serve(RELAY.replace(CANCEL_BY_PATH, cancel), fake, tmp_path) as served:
        fake.replies.append(held)
        await _leave_after_hel(served.proxy.url)
        await wait_for(lambda: any(
            r.getMessage() == "cancelling a turn on upstream relay failed: A value the upstream "
            "sent is nested too deeply to send back to it." for r in caplog.records
        ))
        # The session's next turn is served: the left turn's lock was let go.
        reply = await served.client().chat.completions.create(
            model="relay", messages=HI, extra_headers=CHAT)
    assert reply.choices[0].message.content == "Hello world"
    assert fake.cancelled == []


@pytest.mark.parametrize("reason", ["content_filter", "length", "end_turn"])
async def test_a_finish_reason_a_client_acts_on_passes_through_and_the_rest_are_stop(
    reason: str, tmp_path: Path,
) -> None:
    stream = (*RELAY_STREAM[:-1], relay_event("finished", {"reason": reason}))
    fake = FakeRelay()
    expected = reason if reason in ("content_filter", "length") else "stop"
    async with serve(RELAY, fake, tmp_path) as served:
        fake.replies.extend([Reply(parts=stream), Reply(parts=stream)])
        events = await post_stream(served, "relay", headers=CHAT)
        reply = await served.client().chat.completions.create(
            model="relay", messages=HI, extra_headers=CHAT)
    assert [e["choices"][0]["finish_reason"] for e in events[1:-1]][-1] == expected
    assert reply.choices[0].finish_reason == expected
    assert reply.choices[0].message.content == text_of(events) == "Hello world"


async def test_a_finish_reason_error_is_the_upstreams_failure_not_an_answer(
    tmp_path: Path,
) -> None:
    stream = (*RELAY_STREAM[:-1], relay_event("finished", {"reason": "error"}))
    fake = FakeRelay()
    async with serve(RELAY, fake, tmp_path) as served:
        fake.replies.extend([Reply(parts=stream), Reply(parts=stream)])
        events = await post_stream(served, "relay", headers=CHAT)
        with pytest.raises(openai.APIStatusError) as caught:
            await served.client().chat.completions.create(
                model="relay", messages=HI, extra_headers=CHAT)
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["code"] == "upstream_error"
    assert "reported that its turn failed" in error["message"]
    assert not any(e["choices"][0].get("finish_reason") for e in events[:-2])
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_error"
