"""A fake OpenAI-compatible upstream: a real aiohttp server that records what it received.

Behaviour is chosen per test through `FakeOpenAI.mode`; the default answers like a model
that echoes the user, and asks for the `get_weather` tool when the request offers tools.
The slow modes keep quiet for `delay` seconds: `slow_headers` before answering at all,
`slow_first_event` after the stream's headers, `silence_mid_stream` before the finish chunk.
`length` stops with finish_reason `length`; `parallel_tools` asks for two calls at once.

`/v1/responses` answers as Letta Code's app server does (captured, fixtures/letta-code/), for
the `responses: native` relay; `/v1/embeddings` answers like OpenAI's, base64 or floats as
asked.
"""

from __future__ import annotations

import asyncio
import base64
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

CREATED = 1_700_000_000
LETTA_CODE = Path(__file__).parent / "fixtures" / "letta-code"


def embedding_of(text: str) -> list[float]:
    """The fake's embedding of a text: exact in float32, so a decoded base64 vector equals it."""
    return [float(len(text)), 0.5, -2.0]


@dataclass
class Received:
    method: str
    path: str
    headers: CIMultiDict[str]
    body: dict[str, Any] | None


@dataclass
class FakeOpenAI:
    mode: str = "normal"
    received: list[Received] = field(default_factory=list)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    models: list[str] = field(default_factory=lambda: ["llama-3-8b", "qwen-2.5"])
    url: str = ""
    # How long the deliberately slow modes keep quiet, in seconds.
    delay: float = 0.5
    # Extra headers on every chat answer (names may repeat, as Set-Cookie does).
    response_headers: list[tuple[str, str]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_post("/v1/embeddings", self.embeddings)
        return app

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.received.append(Received("POST", request.path, CIMultiDict(request.headers), body))
        if self.mode == "error500":
            return web.json_response({"error": {"message": "GPU on fire"}}, status=500)
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = []
        for i, text in enumerate(texts):
            vector: Any = embedding_of(str(text))
            if body.get("encoding_format") == "base64":
                vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": vector})
        return web.json_response({
            "object": "list", "data": data, "model": body["model"],
            "usage": {"prompt_tokens": len(texts), "total_tokens": len(texts)},
        })

    async def responses(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append(Received("POST", request.path, CIMultiDict(request.headers), body))
        if self.mode == "error400":
            return web.json_response(
                {"error": {"message": "Unsupported parameter.", "type": "invalid_request_error",
                           "param": "input", "code": None}},
                status=400,
            )
        if self.mode == "redirect":
            raise web.HTTPFound("http://127.0.0.1:9/elsewhere")
        if not body.get("stream"):
            return web.Response(
                body=(LETTA_CODE / "responses_sync.json").read_bytes(),
                content_type="application/json",
            )
        raw = (LETTA_CODE / "responses_stream.sse").read_bytes()
        events = [e + b"\n\n" for e in raw.split(b"\n\n") if e.strip()]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "X-Upstream-Note": "native"})
        await response.prepare(request)
        try:
            for n, event in enumerate(events):
                if n == 5 and self.mode == "stream_error_event":
                    await response.write(
                        b'event: error\ndata: {"type":"error","code":"server_error",'
                        b'"message":"model crashed","param":null,"sequence_number":5}\n\n'
                    )
                    return response
                if n == 5 and self.mode == "midstream_drop":
                    request.transport.close()  # type: ignore[union-attr]
                    return response
                await response.write(event)
            if self.mode == "native_done":
                await response.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnected.set()
            raise
        return response

    async def list_models(self, request: web.Request) -> web.Response:
        self.received.append(Received("GET", request.path, CIMultiDict(request.headers), None))
        data = [
            {"id": m, "object": "model", "created": CREATED, "owned_by": "fake"}
            for m in self.models
        ]
        return web.json_response({"object": "list", "data": data})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append(Received("POST", request.path, CIMultiDict(request.headers), body))
        mode = self.mode
        if mode == "error400":
            return web.json_response(
                {
                    "error": {
                        "message": "This model's maximum context length is 8192 tokens.",
                        "type": "invalid_request_error",
                        "param": "messages",
                        "code": "context_length_exceeded",
                    }
                },
                status=400,
            )
        if mode == "html500":
            return web.Response(
                text="<html><body><h1>502 Bad Gateway</h1></body></html>",
                status=500,
                content_type="text/html",
            )
        if mode == "error500":
            return web.json_response(
                {"error": {"message": "CUDA out of memory", "type": "server_error"}}, status=500
            )
        if mode == "slow_headers":
            await self._pause()
        if mode == "auth401":
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        if mode == "ratelimit":
            return web.json_response(
                {"error": {"message": "Slow down.", "type": "rate_limit_error"}},
                status=429,
                headers={"Retry-After": "7"},
            )
        if mode == "hang":
            await self._hold(request)
        chunks = self.answer_chunks(body)
        if not body.get("stream"):
            return web.json_response(
                self.completion(body, chunks), headers=CIMultiDict(self.response_headers)
            )
        return await self.stream(request, body, chunks)

    async def _pause(self) -> None:
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.disconnected.set()
            raise

    async def _hold(self, request: web.Request) -> None:
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.disconnected.set()
            raise

    def answer_chunks(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        """The deltas of the answer, as a streaming model would send them."""
        messages = body["messages"]
        last = messages[-1]
        if body.get("tools") and last.get("role") != "tool" and self.mode == "parallel_tools":
            return [
                {"tool_calls": [{"index": 0, "id": "call_one", "type": "function",
                                 "function": {"name": "get_weather", "arguments": ""}}]},
                {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Paris"}'}}]},
                {"tool_calls": [{"index": 1, "id": "call_two", "type": "function",
                                 "function": {"name": "get_time", "arguments": '{"tz": '}}]},
                {"tool_calls": [{"index": 1, "function": {"arguments": '"CET"}'}}]},
            ]
        if body.get("tools") and last.get("role") != "tool":
            return [
                {"tool_calls": [{"index": 0, "id": "call_abc123", "type": "function",
                                 "function": {"name": "get_weather", "arguments": ""}}]},
                {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
                {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]},
            ]
        if last.get("role") == "tool":
            text = f"The weather is {last['content']}."
        else:
            content = last.get("content")
            text = content if isinstance(content, str) else "?"
        words = text.split(" ")
        return [{"content": w if i == 0 else " " + w} for i, w in enumerate(words)]

    def completion(self, body: dict[str, Any], deltas: list[dict[str, Any]]) -> dict[str, Any]:
        tool = any("tool_calls" in d for d in deltas)
        message: dict[str, Any] = {"role": "assistant"}
        if tool:
            message["content"] = None
            calls: list[dict[str, Any]] = []
            for delta in deltas:
                for part in delta["tool_calls"]:
                    if "id" in part:
                        calls.append({"id": part["id"], "type": "function",
                                      "function": {"name": part["function"]["name"],
                                                   "arguments": ""}})
                    calls[part["index"]]["function"]["arguments"] += (
                        part["function"].get("arguments") or "")
            message["tool_calls"] = calls
        else:
            message["content"] = "".join(d["content"] for d in deltas)
        return {
            "id": "chatcmpl-fake1",
            "object": "chat.completion",
            "created": CREATED,
            "model": body["model"],
            "choices": [{"index": 0, "message": message,
                         "finish_reason": self.finish_reason(tool), "logprobs": None}],
            "usage": {"prompt_tokens": 11, "completion_tokens": len(deltas),
                      "total_tokens": 11 + len(deltas)},
        }

    def finish_reason(self, tool: bool) -> str:
        if self.mode == "length":
            return "length"
        return "tool_calls" if tool else "stop"

    async def stream(
        self, request: web.Request, body: dict[str, Any], deltas: list[dict[str, Any]]
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers=CIMultiDict([
            ("Content-Type", "text/event-stream"), ("X-Upstream-Note", "fake"),
            *self.response_headers,
        ]))
        await response.prepare(request)
        tool = any("tool_calls" in d for d in deltas)

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            data = {"id": "chatcmpl-fake1", "object": "chat.completion.chunk",
                    "created": CREATED, "model": body["model"],
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return b"data: " + orjson.dumps(data) + b"\n\n"

        try:
            if self.mode == "slow_first_event":
                await self._pause()
            if self.mode == "error_event_first":
                await response.write(b'data: {"error": {"message": "model not loaded"}}\n\n')
                return response
            await response.write(chunk({"role": "assistant", "content": ""}))
            for delta in deltas:
                await response.write(chunk(delta))
            if self.mode == "silence_mid_stream":
                await self._pause()
            if self.mode == "stream_hang":
                await self._hold(request)
            if self.mode == "midstream_drop":
                request.transport.close()  # type: ignore[union-attr]
                return response
            if self.mode == "stream_error_event":
                await response.write(b'data: {"error": {"message": "model crashed"}}\n\n')
                return response
            if self.mode != "no_finish":
                await response.write(chunk({}, self.finish_reason(tool)))
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"id": "chatcmpl-fake1", "object": "chat.completion.chunk",
                         "created": CREATED, "model": body["model"], "choices": [],
                         "usage": {"prompt_tokens": 11, "completion_tokens": len(deltas),
                                   "total_tokens": 11 + len(deltas)}}
                await response.write(b"data: " + orjson.dumps(usage) + b"\n\n")
            if self.mode not in ("no_done",):
                await response.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnected.set()
            raise
        return response
