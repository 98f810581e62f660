"""Fake agent servers for the `custom` kind: Dify, Flowise, Langflow, n8n and LangGraph.

Each is a real aiohttp app (serve it with tests.conftest.serving on port 0) that answers as
the real server does, from the bytes in tests/fixtures/<server>/: a stream is replayed
exactly, one event per write as the servers write them (CRLF lines, `message:` lines,
`event: ping`, blank-line NDJSON under a text/event-stream label, heartbeat comments), and a
JSON body as it was captured. What each server does with sessions is kept too, so a test can
see which upstream session a turn reached: Dify's conversations scoped by `user`, Flowise's
chatId memory, Langflow's session_id, n8n's sessionId, LangGraph's threads.

Behaviour the READMEs of the captures describe is reproduced where a test needs it: Flowise
never answers a streaming request for an unknown flow and starves the first of two streams
on one chatId; LangGraph makes a second run on a busy thread wait for the first.

    fake = FakeDify()
    fake.replies.append(Reply("dify/error_stream.sse"))     # the next chat call's answer
    async with serving(fake.app()) as url: ...
    fake.chats()  # the chat calls received, each a Recorded
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections import Counter, deque
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDictProxy

FIXTURES = Path(__file__).parent / "fixtures"

DIFY_CONVERSATION = "8f4c6f5e-2f3a-4d5b-9c1e-7a2b3c4d5e6f"
DIFY_TASK = "a9b8c7d6-e5f4-4a3b-9c2d-1e0f9a8b7c6d"
DIFY_KEY = "app-dify-test-key"
FLOWISE_FLOW = "2f61e105-efe9-4c8c-ab96-77c3a02d376d"
LANGFLOW_FLOW = "0b7d6c2e-1f1d-4a8a-9d55-5a0f1f2e3d4c"
LANGFLOW_KEY = "sk-langflow-test-key"
N8N_HOOK = "7f3e2a1b-webhook"
N8N_BASIC = "dXNlcjpwYXNzd29yZA=="

_SSE_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_NDJSON_LINE = re.compile(rb"[^\n]*\n\n?")


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def writes_of(name: str) -> list[bytes]:
    """A fixture as its server writes it: an event stream one event per write (with its
    blank line), NDJSON one line per write (with the blank line Langflow adds), anything else
    in one write. Joined, the writes are the fixture's bytes exactly."""
    raw = fixture(name)
    if name.endswith(".sse"):
        cuts = [m.end() for m in _SSE_END.finditer(raw)]
    elif name.endswith(".ndjson"):
        cuts = [m.end() for m in _NDJSON_LINE.finditer(raw)]
    else:
        return [raw]
    out = []
    start = 0
    for cut in cuts:
        out.append(raw[start:cut])
        start = cut
    if start < len(raw):
        out.append(raw[start:])
    assert b"".join(out) == raw
    return out


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: CIMultiDictProxy[str]
    json: Any


@dataclass
class Reply:
    """How to answer one chat call: a fixture replayed as its server wrote it, or `body`."""

    name: str | None = None
    status: int = 200
    body: bytes | None = None
    # Or these bytes, one write each (a server no capture shows).
    parts: tuple[bytes, ...] = ()
    content_type: str | None = None
    # After this many writes, wait until `release` is set (or the client goes away).
    hold_after: int | None = None
    release: asyncio.Event = field(default_factory=asyncio.Event)
    held: asyncio.Event = field(default_factory=asyncio.Event)
    # After this many writes, end the body cleanly (the rest of the stream never comes).
    cut_after: int | None = None
    # After this many writes, drop the connection (no end of the chunked body).
    abort_after: int | None = None
    # Never answer at all, not even a status line.
    hang: bool = False

    def writes(self) -> list[bytes]:
        if self.parts:
            return list(self.parts)
        if self.body is not None:
            return [self.body]
        assert self.name is not None
        return writes_of(self.name)

    def media_type(self, default: str) -> str:
        if self.content_type is not None:
            return self.content_type
        if self.name is not None and self.name.endswith(".json"):
            return "application/json"
        return default


class FakeAgent:
    """What every fake shares: the requests received, the replies queued for the chat
    calls, the turns in flight per session, and the clients that went away."""

    chat_paths: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.url = ""
        self.requests: list[Recorded] = []
        self.replies: deque[Reply] = deque()
        self.in_flight: Counter[str] = Counter()
        self.most_in_flight = 0
        self.completed = 0
        self.gone: list[str] = []
        self.gone_seen = asyncio.Event()
        self._waiting: list[asyncio.Event] = []

    def chats(self) -> list[Recorded]:
        """The chat calls received, in order."""
        return [r for r in self.requests if r.method == "POST" and self.is_chat(r.path)]

    def is_chat(self, path: str) -> bool:
        return any(re.fullmatch(p, path) for p in self.chat_paths)

    def release_all(self) -> None:
        for event in self._waiting:
            event.set()
        for reply in self.replies:
            reply.release.set()

    async def record(self, request: web.Request) -> Recorded:
        raw = await request.read()
        body = orjson.loads(raw) if raw else None
        recorded = Recorded(request.method, request.path, dict(request.query), request.headers,
                            body)
        self.requests.append(recorded)
        return recorded

    def next_reply(self, default: Reply) -> Reply:
        return self.replies.popleft() if self.replies else default

    async def answer(
        self,
        request: web.Request,
        reply: Reply,
        *,
        session: str = "",
        stream_type: str = "text/event-stream; charset=utf-8",
        starved: Callable[[], bool] | None = None,
        after_headers: Callable[[], Any] | None = None,
    ) -> web.StreamResponse:
        """Answers with `reply`, counting the turn as in flight on `session` until it ends.

        `starved()` turning true mid-stream: the stream goes silent for good (Flowise).
        `after_headers`: awaited between the headers and the first byte (LangGraph's queue).
        """
        if reply.hang:
            try:
                await self.wait_unless_gone(request, reply.release)
            except asyncio.CancelledError:
                self.gone.append(request.path)
                self.gone_seen.set()
                raise
            return web.Response(status=204)
        writes = reply.writes()
        media = reply.media_type(stream_type)
        if (len(writes) == 1 and not reply.parts and reply.hold_after is None
                and reply.abort_after is None):
            return web.Response(status=reply.status, body=writes[0],
                                headers={"Content-Type": media})
        response = web.StreamResponse(status=reply.status, headers={"Content-Type": media})
        await response.prepare(request)
        self.in_flight[session] += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight[session])
        try:
            if after_headers is not None:
                await after_headers()
            for n, data in enumerate(writes):
                if n == reply.cut_after:
                    break
                if n == reply.abort_after:
                    assert request.transport is not None
                    request.transport.close()
                    return response
                if n == reply.hold_after:
                    reply.held.set()
                    if not await self.wait_unless_gone(request, reply.release):
                        return self._gone(request, response)
                if starved is not None and starved():
                    await self.wait_unless_gone(request, asyncio.Event())
                    return self._gone(request, response)
                await response.write(data)
            if reply.hold_after is not None and reply.hold_after >= len(writes):
                reply.held.set()
                if not await self.wait_unless_gone(request, reply.release):
                    return self._gone(request, response)
            await response.write_eof()
            self.completed += 1
        except ConnectionResetError:
            return self._gone(request, response)
        except asyncio.CancelledError:
            # The test servers cancel a handler whose client went away.
            self._gone(request, response)
            raise
        finally:
            self.in_flight[session] -= 1
        return response

    def _gone(self, request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
        self.gone.append(request.path)
        self.gone_seen.set()
        return response

    async def wait_unless_gone(self, request: web.Request, release: asyncio.Event) -> bool:
        """Waits for `release`; False if the client disconnected first (the transport is
        watched too: not every server cancels its handlers when the client goes away)."""
        self._waiting.append(release)
        while not release.is_set():
            transport = request.transport
            if transport is None or transport.is_closing():
                return False
            with suppress(TimeoutError):
                await asyncio.wait_for(release.wait(), 0.02)
        return True


def json_response(status: int, name: str) -> web.Response:
    return web.Response(status=status, body=fixture(name),
                        headers={"Content-Type": "application/json"})


# -- Dify ----------------------------------------------------------------------------------------


class FakeDify(FakeAgent):
    """Dify's service API under `/v1` (custom-apis.md §2.1): conversations are issued by the
    server and scoped by `user`; an unknown `conversation_id` is a 404 before any run."""

    chat_paths = (r"/v1/chat-messages",)

    def __init__(self) -> None:
        super().__init__()
        # user -> that user's conversations, most recent first.
        self.conversations: dict[str, list[str]] = {}
        self.stops: list[Recorded] = []
        self.stop_seen = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat-messages", self.chat)
        app.router.add_get("/v1/conversations", self.list_conversations)
        app.router.add_post("/v1/chat-messages/{task}/stop", self.stop)
        return app

    def unauthorised(self, request: web.Request) -> web.Response | None:
        if request.headers.get("Authorization") == f"Bearer {DIFY_KEY}":
            return None
        body = b'{"code": "unauthorized", "message": "Access token is invalid", "status": 401}'
        return web.Response(status=401, body=body, headers={"Content-Type": "application/json"})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        recorded = await self.record(request)
        refused = self.unauthorised(request)
        if refused is not None:
            return refused
        body = recorded.json
        user = body["user"]
        conversation = body.get("conversation_id") or None
        mine = self.conversations.setdefault(user, [])
        if conversation is not None and conversation not in mine:
            return json_response(404, "dify/error_conversation_not_exists.response.json")
        if conversation is None:
            # The fixtures carry one conversation id; conversations are per user anyway.
            mine.insert(0, DIFY_CONVERSATION)
        streaming = body.get("response_mode") == "streaming"
        default = Reply("dify/chat_stream.sse" if streaming
                        else "dify/chat_blocking.response.json")
        return await self.answer(request, self.next_reply(default),
                                 session=f"{user}/{DIFY_CONVERSATION}")

    async def list_conversations(self, request: web.Request) -> web.Response:
        await self.record(request)
        refused = self.unauthorised(request)
        if refused is not None:
            return refused
        found = self.conversations.get(request.query.get("user", ""))
        name = "conversations" if found else "conversations_empty"
        return json_response(200, f"dify/{name}.response.json")

    async def stop(self, request: web.Request) -> web.Response:
        self.stops.append(await self.record(request))
        self.stop_seen.set()
        return web.json_response({"result": "success"})


# -- Flowise -------------------------------------------------------------------------------------


def flowise_sync_body(stream: str) -> bytes:
    """The JSON answer Flowise gives `streaming: false` for the turn a captured stream
    answered: its tokens joined as `text`, the fields of its `metadata` event, in the order
    of a captured sync body (`prediction_sync_chatid.response.json`)."""
    text = ""
    meta: dict[str, Any] = {}
    for data in writes_of(stream):
        for line in data.split(b"\n"):
            if line.startswith(b"data:"):
                event = orjson.loads(line[5:])
                if event["event"] == "token":
                    text += event["data"]
                elif event["event"] == "metadata":
                    meta = event["data"]
    return orjson.dumps({
        "text": text, "question": meta["question"], "chatId": meta["chatId"],
        "chatMessageId": meta["chatMessageId"], "isStreamValid": False,
        "sessionId": meta["sessionId"], "memoryType": meta["memoryType"],
    })


class FakeFlowise(FakeAgent):
    """Flowise 3.1.4's prediction API under `/api/v1` (upstream-samples/flowise)."""

    chat_paths = (r"/api/v1/prediction/[^/]+",)
    stream = "flowise/prediction_stream_chatid.response.sse"

    def __init__(self) -> None:
        super().__init__()
        self.flows = {FLOWISE_FLOW}
        # chatId -> the questions its memory node has seen.
        self.memory: dict[str, list[str]] = {}
        # The one SSE client Flowise keeps per chatId: a newer stream replaces the older.
        self.streams: dict[str, object] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/v1/prediction/{flow}", self.prediction)
        return app

    async def prediction(self, request: web.Request) -> web.StreamResponse:
        recorded = await self.record(request)
        body = recorded.json or {}
        streaming = body.get("streaming") in (True, "true")
        if request.match_info["flow"] not in self.flows:
            if streaming:
                # The error middleware answers only non-streaming requests: nothing is sent.
                return await self.answer(request, Reply(hang=True))
            return json_response(404, "flowise/error_unknown_chatflow_sync.response.json")
        override = body.get("overrideConfig") or {}
        chat = body.get("chatId") or override.get("sessionId") or str(uuid.uuid4())
        self.memory.setdefault(chat, []).append(body.get("question"))
        if not streaming:
            default = Reply(body=flowise_sync_body(self.stream),
                            content_type="application/json; charset=utf-8")
            return await self.answer(request, self.next_reply(default), session=chat)
        token = object()
        self.streams[chat] = token
        return await self.answer(
            request, self.next_reply(Reply(self.stream)), session=chat,
            stream_type="text/event-stream", starved=lambda: self.streams.get(chat) is not token,
        )


# -- Langflow ------------------------------------------------------------------------------------


def langflow_sync_body(stream: str) -> bytes:
    """The JSON answer of `?stream=false` to the turn a captured stream answered: Langflow's
    `end` event carries the whole sync response body as `data.result`."""
    for data in writes_of(stream):
        if data.strip():
            event = orjson.loads(data)
            if event["event"] == "end":
                return orjson.dumps(event["data"]["result"])
    raise AssertionError(f"{stream} has no end event")


class FakeLangflow(FakeAgent):
    """Langflow 1.13's run API under `/api/v1` (upstream-samples/langflow)."""

    chat_paths = (r"/api/v1/run/[^/]+",)
    stream = "langflow/run_stream.response.ndjson"

    def __init__(self) -> None:
        super().__init__()
        self.flows = {LANGFLOW_FLOW}
        self.sessions: dict[str, list[str]] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/v1/run/{flow}", self.run)
        return app

    async def run(self, request: web.Request) -> web.StreamResponse:
        recorded = await self.record(request)
        if request.headers.get("x-api-key") != LANGFLOW_KEY:
            return json_response(403, "langflow/error_no_api_key.response.json")
        flow = request.match_info["flow"]
        if flow not in self.flows:
            return json_response(404, "langflow/error_unknown_flow.response.json")
        body = recorded.json
        # Without a session_id the flow id is the session: every such caller shares it.
        session = body.get("session_id") or flow
        self.sessions.setdefault(session, []).append(body.get("input_value"))
        if request.query.get("stream") == "true":
            return await self.answer(request, self.next_reply(Reply(self.stream)),
                                     session=session)
        default = Reply(body=langflow_sync_body(self.stream), content_type="application/json")
        return await self.answer(request, self.next_reply(default), session=session)


# -- n8n -----------------------------------------------------------------------------------------


class FakeN8n(FakeAgent):
    """An n8n Chat Trigger in embedded mode, streaming (custom-apis.md §2.4)."""

    chat_paths = (r"/webhook/[^/]+/chat",)

    def __init__(self) -> None:
        super().__init__()
        self.sessions: dict[str, list[str]] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/webhook/{hook}/chat", self.chat)
        return app

    async def chat(self, request: web.Request) -> web.StreamResponse:
        recorded = await self.record(request)
        if request.headers.get("Authorization") != f"Basic {N8N_BASIC}":
            return web.Response(status=403, text="Authorization data is wrong!")
        if request.match_info["hook"] != N8N_HOOK:
            hook = request.match_info["hook"]
            body = orjson.dumps({
                "code": 404, "message": f'The requested webhook "POST {hook}/chat" is not '
                "registered.", "hint": "The workflow must be active for a production URL to "
                "run successfully.",
            })
            return web.Response(status=404, body=body, headers={"Content-Type": "application/json"})
        body = recorded.json
        self.sessions.setdefault(body["sessionId"], []).append(body["chatInput"])
        return await self.answer(request, self.next_reply(Reply("n8n/stream.ndjson")),
                                 session=body["sessionId"],
                                 stream_type="application/json; charset=utf-8")


# -- LangGraph -----------------------------------------------------------------------------------


class FakeLangGraph(FakeAgent):
    """LangGraph server 0.16 (in-memory `langgraph dev`), upstream-samples/langgraph."""

    chat_paths = (r"/threads/[^/]+/runs/stream", r"/runs/stream")
    stream = "langgraph/thread_runs_stream_messages_tuple.response.sse"

    def __init__(self) -> None:
        super().__init__()
        # thread id -> the messages sent to it.
        self.threads: dict[str, list[Any]] = {}
        # The run going on per thread; a second one waits for it (`enqueue`, the default).
        self.running: dict[str, asyncio.Event] = {}
        self.queued = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/threads/{thread}/runs/stream", self.thread_run)
        app.router.add_post("/runs/stream", self.stateless_run)
        app.router.add_post("/assistants/search", self.assistants)
        return app

    async def thread_run(self, request: web.Request) -> web.StreamResponse:
        recorded = await self.record(request)
        thread = request.match_info["thread"]
        try:
            uuid.UUID(thread)
        except ValueError:
            return web.json_response({"detail": "badly formed hexadecimal UUID string"},
                                     status=400)
        body = recorded.json
        if body.get("assistant_id") != "agent":
            return json_response(422, "langgraph/error_unknown_assistant_runs_stream.response.txt")
        if thread not in self.threads:
            if body.get("if_not_exists") != "create":
                return json_response(404, "langgraph/error_missing_thread_runs_stream.response.txt")
            self.threads[thread] = []
        self.threads[thread].extend(body["input"]["messages"])
        previous = self.running.get(thread)
        done = self.running[thread] = asyncio.Event()

        async def queue() -> None:
            if previous is not None and not previous.is_set():
                self.queued += 1
                await previous.wait()

        try:
            return await self.answer(request, self.next_reply(Reply(self.stream)),
                                     session=thread, after_headers=queue)
        finally:
            done.set()

    async def stateless_run(self, request: web.Request) -> web.StreamResponse:
        await self.record(request)
        default = Reply("langgraph/stateless_runs_stream_messages_tuple.response.sse")
        return await self.answer(request, self.next_reply(default))

    async def assistants(self, request: web.Request) -> web.Response:
        await self.record(request)
        return json_response(200, "langgraph/assistants_search.response.json")
