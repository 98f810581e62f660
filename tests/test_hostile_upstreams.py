"""Upstreams that misbehave on purpose: the client gets an exact, clean answer (issue 5, point 6).

One raw asyncio server plays every broken upstream, byte for byte: an HTML error page, a body
that is not JSON, invalid JSON chunks, a line that never ends, a stream without `[DONE]`, a
connection closed in the middle of a `data:` line, a huge body, a response that is not HTTP.
The scenario is the first segment of the request path, so one proxy has an `openai` upstream
(`o-<scenario>`) and a `letta` upstream (`l-<scenario>`) per scenario.

When the failure shows: an `openai` stream is committed (200 and SSE headers) with its first
upstream event, so a failure before that is a real HTTP error (502/504 JSON); a `letta` stream
starts with the role chunk the proxy writes itself, so it is committed once Letta answered
200, and every later failure is one error event followed by `data: [DONE]`.

After each test the proxy holds no upstream connection and runs no task beyond what it ran
before, the misbehaving server's handlers have all ended (the proxy hung up on them), and,
once everything is closed, the process has no more open file descriptors than before.
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from proxy.app import create_app
from proxy.app_keys import HTTP
from proxy.reload import TableHolder
from proxy.sse import SSEDecoder
from proxy.upstreams.http_errors import MAX_ANSWER
from tests.conftest import KEY, serving

AGENT = "agent-ef37cb35-73b3-4511-b1bb-1c9635553e28"
CONVERSATION = "conv-0a1b2c3d-1111-4222-8333-444455556666"
MIB = 1024 * 1024
MAX_LINE = SSEDecoder().max_line  # what the relays use
PATH = "/v1/chat/completions"
DONE = b"data: [DONE]"


# --- what the broken upstream sends -------------------------------------------------------------


def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    body = {"id": "chatcmpl-bad", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + orjson.dumps(body) + b"\n\n"


ROLE = chunk({"role": "assistant", "content": ""})
GOOD_STREAM = ROLE + chunk({"content": "fine"}) + chunk({}, "stop") + b"data: [DONE]\n\n"
COMPLETION = orjson.dumps(
    {"id": "chatcmpl-bad", "object": "chat.completion", "created": 1, "model": "m",
     "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"},
                  "finish_reason": "stop", "logprobs": None}],
     "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
)
# OpenRouter's mid-stream error: a chunk with `error` beside its choices, as documented; and a
# 200 answer that reports an error beside the choices it cut short.
OPENROUTER_ERROR = (
    b'data: {"id":"cmpl-abc123","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"provider":"p","error":{"code":"server_error","message":"Provider disconnected '
    b'unexpectedly"},"choices":[{"index":0,"delta":{"content":""},"finish_reason":"error"}]}\n\n'
)
OPENROUTER_SYNC_ERROR = orjson.dumps(
    {"id": "gen-1", "object": "chat.completion", "created": 1, "model": "m",
     "error": {"code": 502, "message": "Provider returned error"},
     "choices": [{"index": 0, "message": {"role": "assistant", "content": "partial"},
                  "finish_reason": "error"}]}
)
# A FastAPI-style error `detail` nested deeper than orjson writes (it reads 1,024 levels).
DEEP_DETAIL = b'{"detail":' + b"[" * 300 + b"]" * 300 + b"}"
HTML = (b"<html><head><title>502 Bad Gateway</title></head><body><h1>Bad Gateway</h1>"
        b"<pre>Traceback (most recent call last):\n  File \"app.py\"</pre></body></html>")
# What Letta streams: a ping with the run id, a token, the stop reason, [DONE].
LETTA_PING = b'data: {"message_type":"ping","run_id":"run-1"}\n\n'
LETTA_GOOD = (LETTA_PING
              + b'data: {"message_type":"assistant_message","otid":"o1","content":"fine"}\n\n'
              + b'data: {"message_type":"stop_reason","stop_reason":"end_turn"}\n\n'
              + b"data: [DONE]\n\n")


def head(status: str = "200 OK", ctype: str = "text/event-stream", extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 " + status.encode() + b"\r\nContent-Type: " + ctype.encode()
            + b"\r\nConnection: close\r\n" + extra)


def sized(body: bytes, status: str = "200 OK", ctype: str = "application/json",
          extra: bytes = b"") -> bytes:
    return head(status, ctype, extra + b"Content-Length: %d\r\n\r\n" % len(body)) + body


def until_close(body: bytes, ctype: str = "text/event-stream") -> bytes:
    """A body with no framing: it ends when the connection closes (legal for HTTP/1.1)."""
    return head("200 OK", ctype, b"\r\n") + body


def chunked(*parts: bytes, last: bool = True) -> bytes:
    out = head(extra=b"Transfer-Encoding: chunked\r\n\r\n")
    for part in parts:
        out += b"%x\r\n" % len(part) + part + b"\r\n"
    return out + (b"0\r\n\r\n" if last else b"")


# scenario -> what to send for (kind, stream). A callable writes on its own.
Writer = Callable[[asyncio.StreamWriter, "BadUpstream"], Awaitable[None]]
Reply = bytes | Writer


async def endless_line(writer: asyncio.StreamWriter, bad: BadUpstream, first: bytes = b"") -> None:
    """A `data:` line that never ends, 64 KiB at a time, until the proxy hangs up."""
    writer.write(head(extra=b"Transfer-Encoding: chunked\r\n\r\n"))
    start = first + b"data: "
    writer.write(b"%x\r\n" % len(start) + start + b"\r\n")
    piece = b"x" * (64 * 1024)
    await pour(writer, bad, b"%x\r\n" % len(piece) + piece + b"\r\n")


async def huge_body(writer: asyncio.StreamWriter, bad: BadUpstream) -> None:
    """A valid completion of 80 MiB, with its Content-Length."""
    body = COMPLETION.replace(b'"fine"', b'"' + b"y" * (80 * MIB) + b'"')
    writer.write(sized(body))
    try:
        await writer.drain()
        bad.sent += len(body)
    except (ConnectionError, OSError):
        bad.hung_up += 1


async def endless_chunked_body(writer: asyncio.StreamWriter, bad: BadUpstream) -> None:
    """A sync answer that never ends (chunked, no length to refuse up front)."""
    writer.write(head("200 OK", "application/json", b"Transfer-Encoding: chunked\r\n\r\n"))
    piece = b" " * (256 * 1024)
    await pour(writer, bad, b"%x\r\n" % len(piece) + piece + b"\r\n")


def endless(start: bytes, event: bytes) -> Writer:
    """`start`, then `event` over and over until the proxy hangs up: an answer without end,
    every event well-formed, so no per-event bound (nor first_event, nor idle) ends it."""

    async def write(writer: asyncio.StreamWriter, bad: BadUpstream) -> None:
        writer.write(until_close(start))
        await pour(writer, bad, event * 8)

    return write


async def pour(writer: asyncio.StreamWriter, bad: BadUpstream, data: bytes) -> None:
    """`data` over and over until the proxy hangs up (counted in `bad.hung_up`)."""
    try:
        while bad.sent < 400 * MIB:  # a bound for the test itself, far past any proxy limit
            writer.write(data)
            await writer.drain()
            bad.sent += len(data)
    except (ConnectionError, OSError):
        bad.hung_up += 1


TOKEN = b"x" * MIB  # one event's text: 64 of them reach the answer limit
# Token counts no client can read as they are: past 64 bits (orjson refuses to write them),
# past 2^53, negative, booleans and floats.
HUGE = b"18446744073709551615"
LETTA_HUGE_USAGE = (b'data: {"message_type":"usage_statistics","prompt_tokens":' + HUGE
                    + b',"completion_tokens":-5,"total_tokens":true,"cached_input_tokens":1e300,'
                    b'"reasoning_tokens":true}\n\n')
CUSTOM_HUGE_USAGE = (b'data: {"delta":"fine"}\n\n'
                     b'data: {"u":{"p":' + HUGE + b',"c":-5,"t":4503599627370497}}\n\n'
                     b'data: {"u":{"p":true,"c":1e300,"t":4503599627370497}}\n\n'
                     b'data: {"u":{"p":1,"c":1,"t":4503599627370497}}\n\n')


def both(reply: Reply) -> dict[bool, Reply]:
    return {False: reply, True: reply}


SCENARIOS: dict[str, dict[bool, Reply]] = {
    "good": {False: sized(COMPLETION), True: until_close(GOOD_STREAM)},
    "html500": both(sized(HTML, "500 Internal Server Error", "text/html")),
    "html503": both(sized(HTML, "503 Service Unavailable", "text/html")),
    "html200": both(sized(HTML, "200 OK", "text/html")),
    "deep-detail": both(sized(DEEP_DETAIL, "500 Internal Server Error")),
    "html-as-sse": both(until_close(HTML)),
    "not-json": both(sized(b"OK", ctype="application/json")),
    "json-not-completion": both(sized(b'{"object":"list","data":[]}')),
    "json-array": both(sized(b"[1, 2, 3]")),
    "sse-for-sync": both(until_close(GOOD_STREAM)),
    "invalid-json-chunks": both(until_close(
        ROLE + b"data: {not json\n\ndata: \xff\xfe\n\n" + chunk({}, "stop") + b"data: [DONE]\n\n"
    )),
    "no-done": both(until_close(ROLE + chunk({"content": "fine"}) + chunk({}, "stop"))),
    "done-without-line-end": both(until_close(GOOD_STREAM.removesuffix(b"\n\n"))),
    "no-finish": both(until_close(ROLE + chunk({"content": "fine"}) + b"data: [DONE]\n\n")),
    "cut-in-data-line": both(until_close(ROLE + b'data: {"id":"chatcmpl-bad","obj')),
    "cut-in-chunk": both(chunked(ROLE, b'data: {"id":"chatcmpl-bad","obj', last=False)),
    "cut-in-length": both(head(extra=b"Content-Length: 5000\r\n\r\n") + ROLE),
    "error-event": both(until_close(
        ROLE + b'event: error\ndata: {"error": {"message": "model crashed"}}\n\n'
    )),
    "error-event-first": both(until_close(b'data: {"error": {"message": "overloaded"}}\n\n')),
    "error-event-spaced": both(until_close(
        ROLE + chunk({"content": "so far"}) + b'data: { "error": {"message": "boom"}}\n\n'
        + chunk({}, "stop") + b"data: [DONE]\n\n"
    )),
    "error-beside-choices": {
        False: sized(OPENROUTER_SYNC_ERROR),
        True: until_close(ROLE + chunk({"content": "so far"}) + OPENROUTER_ERROR
                          + b"data: [DONE]\n\n"),
    },
    "endless-line": both(endless_line),
    "endless-line-later": both(lambda w, b: endless_line(w, b, first=ROLE)),
    "endless-body": both(endless_chunked_body),
    "huge-body": both(huge_body),
    "closed-at-once": both(b""),
    "not-http": both(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"),
    "header-too-long": both(head(extra=b"X-Big: " + b"b" * 20_000 + b"\r\n\r\n") + GOOD_STREAM),
    "gzip-that-is-not": both(sized(COMPLETION, extra=b"Content-Encoding: gzip\r\n")),
    "endless-tokens": {False: sized(COMPLETION),
                       True: endless(ROLE, chunk({"content": TOKEN.decode()}))},
    "sse-gzip-that-is-not": both(until_close(GOOD_STREAM).replace(
        b"Connection: close\r\n", b"Connection: close\r\nContent-Encoding: gzip\r\n"
    )),
}
LETTA_SCENARIOS: dict[str, dict[bool, Reply]] = {
    # Letta answers every turn with a stream, sync included.
    "good": both(until_close(LETTA_GOOD)),
    "invalid-json-chunks": both(until_close(LETTA_PING + b"data: {not json\n\n")),
    "no-done": both(until_close(LETTA_PING + b'data: {"message_type":"assistant_message",'
                                b'"otid":"o1","content":"fine"}\n\n')),
    "cut-in-data-line": both(until_close(LETTA_PING + b'data: {"message_type":"assis')),
    "cut-in-chunk": both(chunked(LETTA_PING, b'data: {"message_type":"assis', last=False)),
    "endless-line-later": both(lambda w, b: endless_line(w, b, first=LETTA_PING)),
    "endless-tokens": both(endless(LETTA_PING, b'data: {"message_type":"assistant_message",'
                                   b'"otid":"o1","content":"' + TOKEN + b'"}\n\n')),
    "huge-usage": both(until_close(LETTA_GOOD.replace(b"data: [DONE]", LETTA_HUGE_USAGE
                                                      + b"data: [DONE]"))),
}
# `custom` upstreams (mode: stream; `delta` is text, `u` usage added up), by scenario.
CUSTOM_SCENARIOS: dict[str, Reply] = {
    "endless-tokens": endless(b"", b'data: {"delta":"' + TOKEN + b'"}\n\n'),
    "huge-usage": until_close(CUSTOM_HUGE_USAGE),
}
# Answers that never end: not for the scenarios that run in a row.
ENDLESS = {"endless-body", "endless-tokens"}


@dataclass
class BadUpstream:
    """The raw server. One request per connection; it closes after answering."""

    sent: int = 0
    hung_up: int = 0
    requests: list[str] = field(default_factory=list)
    cancels: int = 0
    handlers: int = 0
    url: str = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handlers += 1
        try:
            request_head = await reader.readuntil(b"\r\n\r\n")
            lines = request_head.decode("latin-1").split("\r\n")
            path = lines[0].split()[1]
            length = next(
                (int(x.split(":")[1]) for x in lines if x.lower().startswith("content-length:")),
                0,
            )
            body = orjson.loads(await reader.readexactly(length)) if length else {}
            self.requests.append(path)
            scenario = path.split("/")[1]
            if path.endswith("/messages/cancel"):
                self.cancels += 1
                reply: Reply = sized(b"{}")
            elif "/custom/" in path:
                reply = CUSTOM_SCENARIOS[scenario]
            elif path.split("?")[0].endswith("/v1/conversations/"):  # a Responses turn's
                reply = sized(orjson.dumps({"id": CONVERSATION, "agent_id": AGENT}))
            elif "/agents/" in path or "/conversations/" in path:
                reply = (LETTA_SCENARIOS.get(scenario) or SCENARIOS[scenario])[True]
            else:
                reply = SCENARIOS[scenario][bool(body.get("stream"))]
            if isinstance(reply, bytes):
                writer.write(reply)
                await writer.drain()
            else:
                await reply(writer, self)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            self.hung_up += 1
        finally:
            writer.close()
            self.handlers -= 1


def routes(bad_url: str) -> str:
    upstreams, models = [], []
    names = sorted(set(SCENARIOS) | set(LETTA_SCENARIOS))
    for name in names:
        upstreams.append(f"  o-{name}: {{kind: openai, url: '{bad_url}/{name}/v1'}}")
        upstreams.append(f"  l-{name}: {{kind: letta, url: '{bad_url}/{name}'}}")
        models.append(f"  o-{name}: {{upstream: o-{name}}}")
        models.append(f"  l-{name}: {{upstream: l-{name}, agent: {AGENT}}}")
    for name in CUSTOM_SCENARIOS:
        upstreams.append(
            f"  c-{name}: {{kind: custom, url: '{bad_url}/{name}/custom', mode: stream, "
            "request: {path: /chat, body: {message: '{{ input }}'}}, stream: {framing: sse, "
            "rules: [{has: delta, text: delta}, {has: u, usage_sum: true, "
            "usage: {prompt_tokens: u.p, completion_tokens: u.c, total_tokens: u.t}}]}}"
        )
        models.append(f"  c-{name}: {{upstream: c-{name}}}")
    return "\n".join(
        ["upstreams:", "  demo: {kind: echo}", *upstreams,
         "models:", "  echo: {upstream: demo}", *models, ""]
    )


# --- the environment ----------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    content_type: str
    body: bytes

    def error(self) -> dict[str, Any]:
        assert self.content_type == "application/json", self
        err: dict[str, Any] = orjson.loads(self.body)["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        return err

    def events(self) -> list[bytes]:
        assert self.status == 200 and self.content_type == "text/event-stream", self
        return [e for e in self.body.split(b"\n\n") if e and not e.startswith(b":")]


@dataclass
class Env:
    url: str
    app: web.Application
    bad: BadUpstream
    http: aiohttp.ClientSession

    async def post(self, model: str, stream: bool) -> Answer:
        body = {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
        async with self.http.post(
            self.url + PATH, json=body, headers={"Authorization": f"Bearer {KEY}"}
        ) as resp:
            answer = Answer(resp.status, resp.content_type, await resp.read())
        assert b"Traceback" not in answer.body
        assert b"<html" not in answer.body
        return answer

    async def still_serves(self) -> None:
        for model in ("echo", "o-good", "l-good"):
            for stream in (False, True):
                answer = await self.post(model, stream)
                assert answer.status == 200, (model, stream, answer)
                if stream:
                    events = answer.events()
                    assert events[-1] == DONE and b'"finish_reason":"stop"' in events[-2]
                else:
                    reply = orjson.loads(answer.body)
                    assert reply["choices"][0]["message"]["content"] in ("hi", "fine")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def other_tasks() -> list[asyncio.Task[Any]]:
    """Running tasks, but for this one and the servers' idle keep-alive connections."""
    return [
        t for t in asyncio.all_tasks()
        if t is not asyncio.current_task()
        # (an async generator's finalizer runs as a task whose coroutine has no name)
        and getattr(t.get_coro(), "__qualname__", "") != "RequestHandler.start"
    ]


async def settled(env: Env, baseline: int, within: float = 8.0) -> None:
    """Polls until the proxy holds no connection, the bad upstream's handlers have ended and
    no task beyond `baseline` runs (a Letta run cancel may take a moment in the background)."""
    connector = env.app[HTTP].connector
    assert connector is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        acquired = len(connector._acquired)  # aiohttp internals: connections in use
        tasks = other_tasks()
        if acquired == 0 and env.bad.handlers == 0 and len(tasks) <= baseline:
            return
        if loop.time() > deadline:
            raise AssertionError(
                f"leak: {acquired} upstream connections in use, {env.bad.handlers} upstream "
                f"handlers running, tasks {len(tasks)} > {baseline}: {tasks}"
            )
        await asyncio.sleep(0.02)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    gc.collect()
    fds = open_fds()
    bad = BadUpstream()
    async with AsyncExitStack() as stack:
        server = await asyncio.start_server(bad.handle, "127.0.0.1", 0)
        stack.push_async_callback(server.wait_closed)
        stack.callback(server.close)
        port = server.sockets[0].getsockname()[1]
        bad.url = f"http://127.0.0.1:{port}"
        path = tmp_path / "routes.yaml"
        path.write_text(routes(bad.url))
        app = create_app(TableHolder(path, (KEY,)))
        url = await stack.enter_async_context(serving(app))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        environment = Env(url, app, bad, http)
        await environment.still_serves()  # warm: the watcher and pools exist from here on
        await settled(environment, baseline=10**6)
        baseline = len(other_tasks())
        yield environment
        await environment.still_serves()
        await settled(environment, baseline)
    # Everything is closed: no socket or file was left open on the way.
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        gc.collect()
        if open_fds() <= fds or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.02)
    assert open_fds() <= fds, sorted(os.listdir("/proc/self/fd"))


# --- expected results ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Refused:
    """A real HTTP error before anything was committed."""

    status: int
    code: str
    says: str


@dataclass(frozen=True)
class Broken:
    """A committed stream that ends with one error event, then [DONE]. `before` is how many
    data events reach the client first (the role chunk, and any upstream chunk relayed)."""

    code: str
    says: str
    before: int = 1


@dataclass(frozen=True)
class Served:
    """A complete answer, whatever the upstream got wrong on the side."""

    events: int = 0  # stream only: how many data events before [DONE]


Outcome = Refused | Broken | Served

NOT_COMPLETION = Refused(502, "upstream_error", "not a chat completion")
NOT_SSE = Refused(502, "upstream_error", "without an event stream")
CUT = "closed the connection in the middle of the stream"
UNAVAILABLE = Refused(502, "upstream_unavailable", "is unavailable")
LONG_LINE = f"SSE line longer than {MAX_LINE} bytes"
TOO_BIG = Refused(502, "upstream_error", f"more than {64 * MIB} bytes")

# (scenario, stream) -> outcome, for the openai kind.
OPENAI_CASES: list[tuple[str, bool, Outcome]] = [
    ("html500", False, Refused(502, "upstream_error", "failed with HTTP 500")),
    ("html500", True, Refused(502, "upstream_error", "failed with HTTP 500")),
    ("html503", False, Refused(502, "upstream_error", "failed with HTTP 503")),
    ("deep-detail", False, Refused(502, "upstream_error", "failed with HTTP 500")),
    ("deep-detail", True, Refused(502, "upstream_error", "failed with HTTP 500")),
    ("html200", False, NOT_COMPLETION),
    ("html200", True, NOT_SSE),
    ("html-as-sse", False, NOT_COMPLETION),
    # Lines without a colon are fields SSE ignores: the stream holds no event at all.
    ("html-as-sse", True, Refused(502, "upstream_error", "without a finish_reason")),
    ("not-json", False, NOT_COMPLETION),
    ("not-json", True, NOT_SSE),
    ("json-not-completion", False, NOT_COMPLETION),
    ("json-array", False, NOT_COMPLETION),
    ("sse-for-sync", False, NOT_COMPLETION),
    # Chunks are relayed without parsing their JSON (see proxy/upstreams/openai.py), but an
    # event that has not even the shape of a JSON object ends the stream with an error event:
    # a client SDK would raise a decode error on it instead of reporting an API error.
    ("invalid-json-chunks", True, Broken("upstream_error", "not a JSON object", before=1)),
    ("no-done", True, Broken("upstream_error", "without [DONE]", before=3)),
    # Cut inside its last line, but that line is the whole `data: [DONE]`: a complete stream.
    ("done-without-line-end", True, Served(events=3)),
    ("no-finish", True, Broken("upstream_error", "without a finish_reason", before=2)),
    # The half-sent event never reaches the client, framed or not.
    ("cut-in-data-line", True, Broken("upstream_error", CUT)),
    ("cut-in-chunk", True, Broken("upstream_error", CUT)),
    ("cut-in-chunk", False, Refused(502, "upstream_error", "in the middle of the answer")),
    ("cut-in-length", True, Broken("upstream_error", CUT)),
    ("cut-in-length", False, Refused(502, "upstream_error", "in the middle of the answer")),
    ("error-event", True, Broken("upstream_error", "reported an error mid-stream: model crashed")),
    ("error-event-first", True, Refused(502, "upstream_error", "overloaded")),
    # An `error` member is an error wherever it is and however it is spaced; the chunk that
    # carries it is not passed on (the client gets the proxy's error event, scrubbed).
    ("error-event-spaced", True, Broken("upstream_error", "mid-stream: boom", before=2)),
    ("error-beside-choices", True,
     Broken("upstream_error", "mid-stream: Provider disconnected unexpectedly", before=2)),
    ("error-beside-choices", False,
     Refused(502, "upstream_error", "in its answer: Provider returned error")),
    ("endless-line", True, Refused(502, "upstream_error", LONG_LINE)),
    ("endless-line-later", True, Broken("upstream_error", LONG_LINE)),
    ("endless-body", False, TOO_BIG),
    ("huge-body", False, TOO_BIG),
    ("closed-at-once", False, UNAVAILABLE),
    ("closed-at-once", True, UNAVAILABLE),
    ("not-http", False, UNAVAILABLE),
    ("not-http", True, UNAVAILABLE),
    ("header-too-long", True, UNAVAILABLE),
    ("gzip-that-is-not", False, Refused(502, "upstream_error", "in the middle of the answer")),
    ("sse-gzip-that-is-not", True, Refused(502, "upstream_error", CUT)),
]

LETTA_CASES: list[tuple[str, bool, Outcome]] = [
    ("html500", True, Refused(502, "upstream_error", "failed with HTTP 500")),
    ("html500", False, Refused(502, "upstream_error", "failed with HTTP 500")),
    ("deep-detail", True, Refused(502, "upstream_error", "failed with HTTP 500")),
    ("deep-detail", False, Refused(502, "upstream_error", "failed with HTTP 500")),
    ("html200", True, Refused(502, "upstream_error", "without an event stream")),
    ("html200", False, Refused(502, "upstream_error", "without an event stream")),
    ("invalid-json-chunks", True, Broken("upstream_error", "not a JSON object")),
    ("invalid-json-chunks", False, Refused(502, "upstream_error", "not a JSON object")),
    ("no-done", True, Broken("upstream_error", "ended before the agent run finished", 2)),
    ("cut-in-data-line", True, Broken("upstream_error", "not a JSON object")),
    ("cut-in-chunk", True, Broken("upstream_error", CUT)),
    ("cut-in-chunk", False, Refused(502, "upstream_error", CUT)),
    ("endless-line-later", True, Broken("upstream_error", LONG_LINE)),
    ("endless-line-later", False, Refused(502, "upstream_error", LONG_LINE)),
    ("closed-at-once", True, UNAVAILABLE),
    ("not-http", False, UNAVAILABLE),
]

CASES = [
    pytest.param(f"o-{name}", stream, outcome, id=f"openai-{name}-{'stream' if stream else 'sync'}")
    for name, stream, outcome in OPENAI_CASES
] + [
    pytest.param(f"l-{name}", stream, outcome, id=f"letta-{name}-{'stream' if stream else 'sync'}")
    for name, stream, outcome in LETTA_CASES
]


@pytest.mark.parametrize(("model", "stream", "outcome"), CASES)
async def test_a_misbehaving_upstream_gets_the_client_an_exact_clean_answer(
    env: Env, model: str, stream: bool, outcome: Outcome
) -> None:
    answer = await env.post(model, stream)
    upstream = f"'{model}'"
    if isinstance(outcome, Refused):
        assert answer.status == outcome.status, answer
        err = answer.error()
        assert (err["type"], err["code"]) == ("upstream_error", outcome.code), err
        assert outcome.says in err["message"], err
        if model.startswith("o-"):
            assert upstream in err["message"], err
    elif isinstance(outcome, Broken):
        events = answer.events()
        assert events[-1] == DONE, events
        assert len(events) == outcome.before + 2, events
        assert all(e.startswith(b"data: {") for e in events[:-1]), events
        assert b'"role":"assistant"' in events[0]
        err = orjson.loads(events[-2].removeprefix(b"data: "))["error"]
        assert (err["type"], err["code"]) == ("upstream_error", outcome.code), err
        assert outcome.says in err["message"], err
        assert not any(b'"finish_reason":"stop"' in e for e in events[:-2] if model[0] == "l")
        if outcome.says == CUT:
            # The half-sent chunk is not passed on.
            assert not any(e.endswith(b'"obj') for e in events)
    else:
        if stream:
            events = answer.events()
            assert events[-1] == DONE and len(events) == outcome.events + 1, events
        else:
            assert answer.status == 200


async def test_a_never_ending_line_is_cut_off_near_the_decoders_limit(env: Env) -> None:
    # The relay holds at most one line of max_line bytes: past it the proxy hangs up, so the
    # upstream cannot push much more than that (plus what the sockets buffer).
    for model in ("o-endless-line", "o-endless-line-later", "l-endless-line-later"):
        env.bad.sent = 0
        await env.post(model, True)
        await settled(env, baseline=10**6)
        assert MAX_LINE <= env.bad.sent < MAX_LINE + 16 * MIB, (model, env.bad.sent)
    assert env.bad.hung_up >= 3


async def test_a_never_ending_sync_body_is_cut_off_at_the_answer_limit(env: Env) -> None:
    await env.post("o-endless-body", False)
    await settled(env, baseline=10**6)
    assert 64 * MIB <= env.bad.sent < 80 * MIB, env.bad.sent
    assert env.bad.hung_up == 1


async def test_every_scenario_in_a_row_leaves_the_proxy_serving(env: Env) -> None:
    """All of them on one proxy, sync and stream, both kinds: it still serves (fixture)."""
    for name in sorted(set(SCENARIOS) - {"good", "huge-body"} - ENDLESS):
        for stream in (False, True):
            answer = await env.post(f"o-{name}", stream)
            if answer.status == 200 and stream:
                assert answer.events()[-1] == DONE
            elif answer.status != 200:
                assert answer.error()["type"] == "upstream_error"
    for name in sorted(set(LETTA_SCENARIOS) - ENDLESS):
        answer = await env.post(f"l-{name}", True)
        assert answer.status == 200 and answer.events()[-1] == DONE


# --- answers the proxy holds whole: bounded; token counts: capped --------------------------------

TOO_LARGE = f"answered with more than {MAX_ANSWER} bytes"
COUNT_CAP = 2**53


def sdk(env: Env) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=env.url + "/v1", api_key=KEY, max_retries=0)


@pytest.mark.parametrize(
    ("model", "api"),
    [
        pytest.param("l-endless-tokens", "chat", id="letta-chat"),
        pytest.param("c-endless-tokens", "chat", id="custom-chat"),
        pytest.param("l-endless-tokens", "responses", id="letta-responses"),
    ],
)
async def test_an_endless_answer_to_a_sync_client_is_a_502_at_the_answer_limit(
    env: Env, model: str, api: str
) -> None:
    """The answer is built from the upstream's stream and held until it ends: past the limit
    the proxy gives up on it (and hangs up: the fixture checks no handler still runs)."""
    async with sdk(env) as client:
        with pytest.raises(openai.APIStatusError) as info:
            if api == "chat":
                await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "hi"}]
                )
            else:
                await client.responses.create(model=model, input="hi")
    assert info.value.status_code == 502
    assert info.value.type == "upstream_error"
    assert TOO_LARGE in info.value.message
    await settled(env, baseline=10**6)
    assert env.bad.sent < MAX_ANSWER + 32 * MIB, env.bad.sent
    if model.startswith("l-"):
        assert env.bad.cancels == 1  # the run it gave up on is stopped at Letta too


async def test_an_endless_responses_stream_fails_at_the_answer_limit(env: Env) -> None:
    """A Responses stream keeps every text for its final object: past the limit it ends with
    `response.failed` (then `[DONE]`) though the client reads everything."""
    async with sdk(env) as client:
        stream = await client.responses.create(model="o-endless-tokens", input="hi", stream=True)
        events = [event async for event in stream]
    assert events[0].type == "response.created"
    last = events[-1]
    assert last.type == "response.failed", [e.type for e in events[-3:]]
    error = last.response.error
    assert error is not None and TOO_LARGE in error.message
    assert sum(e.type == "response.output_text.delta" for e in events) <= MAX_ANSWER // MIB + 1
    await settled(env, baseline=10**6)
    assert env.bad.sent < MAX_ANSWER + 32 * MIB, env.bad.sent


@pytest.mark.parametrize("model", ["l-huge-usage", "c-huge-usage"], ids=["letta", "custom"])
async def test_token_counts_no_client_can_read_are_capped_in_chat_usage(
    env: Env, model: str
) -> None:
    """Counts past 64 bits, past 2^53, negative, booleans and floats, and sums past 2^53:
    a 200 with counts between 0 and 2^53, sync and streamed."""
    hi: Any = [{"role": "user", "content": "hi"}]
    async with sdk(env) as client:
        reply = await client.chat.completions.create(model=model, messages=hi)
        chunks = [
            chunk async for chunk in await client.chat.completions.create(
                model=model, messages=hi, stream=True, stream_options={"include_usage": True}
            )
        ]
    assert reply.choices[0].message.content == "fine"
    streamed = chunks[-1].usage
    assert streamed is not None and reply.usage is not None
    assert streamed.model_dump() == reply.usage.model_dump()
    if model == "l-huge-usage":
        # prompt past 64 bits, completion -5, total `true` (not a number: prompt + completion),
        # cached 1e300, reasoning `true` (not reported).
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens,
                reply.usage.total_tokens) == (COUNT_CAP, 0, COUNT_CAP)
        details = reply.usage.prompt_tokens_details
        assert details is not None and details.cached_tokens == COUNT_CAP
        assert reply.usage.completion_tokens_details is None
    else:
        # Three reports added up: prompt past 64 bits + `true` + 1, completion -5 + 1e300 + 1,
        # total three times 2^52 + 1.
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens,
                reply.usage.total_tokens) == (COUNT_CAP, COUNT_CAP, COUNT_CAP)
