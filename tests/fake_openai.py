"""A fake OpenAI-compatible upstream: a real aiohttp server that records what it received.

Behaviour is chosen per test through `FakeOpenAI.mode`; the default answers like a model
that echoes the user, and asks for the `get_weather` tool when the request offers tools.
The slow modes keep quiet for `delay` seconds: `slow_headers` before answering at all,
`slow_first_event` after the stream's headers, `silence_mid_stream` before the finish chunk.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

CREATED = 1_700_000_000


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
        return app

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
            message["tool_calls"] = [
                {"id": "call_abc123", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
            ]
        else:
            message["content"] = "".join(d["content"] for d in deltas)
        return {
            "id": "chatcmpl-fake1",
            "object": "chat.completion",
            "created": CREATED,
            "model": body["model"],
            "choices": [{"index": 0, "message": message,
                         "finish_reason": "tool_calls" if tool else "stop", "logprobs": None}],
            "usage": {"prompt_tokens": 11, "completion_tokens": len(deltas),
                      "total_tokens": 11 + len(deltas)},
        }

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
                await response.write(chunk({}, "tool_calls" if tool else "stop"))
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
