"""A fast fake OpenAI upstream for benchmarks.

Answers `POST /v1/chat/completions` (a plain chat.completion, or an SSE stream of
chat.completion.chunk events) and `GET /v1/models`. Every response body is built once per
(model, stream, include_usage) and then served from memory, so the fake spends its CPU on
HTTP, not on JSON, and stays far cheaper per request than anything put in front of it.

    python bench/fake_upstream.py --port 0 --chunks 50

With `--port 0` it binds a free port; it always prints the port it listens on, alone on a
line, once it accepts connections (bench/run.py reads that line).
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass

import orjson
from aiohttp import web
from runtime import serve_forever

CREATED = 1_700_000_000
COMPLETION_ID = "chatcmpl-bench0000000000000000000000"
FINGERPRINT = "fp_bench"
WORDS = ("The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ".")
PROMPT_TOKENS = 9
# Bodies are cached per model name; a client sending random names must not grow it forever.
CACHE_LIMIT = 64


@dataclass(frozen=True, slots=True)
class Settings:
    chunks: int
    delay_first: float
    delay_chunk: float


def _text(n: int) -> str:
    return "".join(WORDS[i % len(WORDS)] for i in range(n))


def completion_body(model: str, chunks: int) -> bytes:
    tokens = max(1, chunks - 2)
    return orjson.dumps(
        {
            "id": COMPLETION_ID,
            "object": "chat.completion",
            "created": CREATED,
            "model": model,
            "system_fingerprint": FINGERPRINT,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": _text(tokens), "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": PROMPT_TOKENS,
                "completion_tokens": tokens,
                "total_tokens": PROMPT_TOKENS + tokens,
            },
        }
    )


def stream_events(model: str, chunks: int, include_usage: bool) -> tuple[bytes, ...]:
    """`chunks` events (role, chunks-2 contents, finish), the usage event if asked, [DONE]."""

    def event(choices: list[dict[str, object]], usage: object = None) -> bytes:
        chunk: dict[str, object] = {
            "id": COMPLETION_ID,
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
        }
        # OpenAI adds `"usage": null` to every chunk only when the client asked for usage.
        if include_usage:
            chunk["usage"] = usage
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def delta(d: dict[str, object], finish: str | None = None) -> list[dict[str, object]]:
        return [{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}]

    tokens = max(0, chunks - 2)
    events = [event(delta({"role": "assistant", "content": "", "refusal": None}))]
    events += [event(delta({"content": WORDS[i % len(WORDS)]})) for i in range(tokens)]
    events.append(event(delta({}, "stop")))
    if include_usage:
        usage = {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": tokens,
            "total_tokens": PROMPT_TOKENS + tokens,
        }
        events.append(event([], usage))
    events.append(b"data: [DONE]\n\n")
    return tuple(events)


class Fake:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._sync: dict[str, bytes] = {}
        self._stream: dict[tuple[str, bool], tuple[bytes, ...]] = {}
        self._models = orjson.dumps(
            {
                "object": "list",
                "data": [
                    {"id": "fake-model", "object": "model", "created": CREATED, "owned_by": "bench"}
                ],
            }
        )

    def _sync_body(self, model: str) -> bytes:
        body = self._sync.get(model)
        if body is None:
            if len(self._sync) >= CACHE_LIMIT:
                self._sync.clear()
            body = self._sync[model] = completion_body(model, self.settings.chunks)
        return body

    def _stream_body(self, model: str, include_usage: bool) -> tuple[bytes, ...]:
        key = (model, include_usage)
        events = self._stream.get(key)
        if events is None:
            if len(self._stream) >= CACHE_LIMIT:
                self._stream.clear()
            events = self._stream[key] = stream_events(model, self.settings.chunks, include_usage)
        return events

    async def models(self, request: web.Request) -> web.Response:
        return web.Response(body=self._models, content_type="application/json")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            req = orjson.loads(await request.read())
            model = str(req.get("model") or "fake-model")
        except (orjson.JSONDecodeError, AttributeError):
            return web.Response(
                status=400,
                body=b'{"error":{"message":"invalid JSON body","type":"invalid_request_error"}}',
                content_type="application/json",
            )
        s = self.settings
        if s.delay_first:
            await asyncio.sleep(s.delay_first)
        if not req.get("stream"):
            return web.Response(body=self._sync_body(model), content_type="application/json")

        opts = req.get("stream_options")
        include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        # One write per event, as a model server does: a proxy must handle many small chunks,
        # not one coalesced body.
        try:
            await resp.prepare(request)
            for i, ev in enumerate(self._stream_body(model, include_usage)):
                if i and s.delay_chunk:
                    await asyncio.sleep(s.delay_chunk)
                await resp.write(ev)
            await resp.write_eof()
        except ConnectionResetError:
            # A load generator stopping at its deadline cuts streams mid-way; that is expected.
            pass
        return resp

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    p.add_argument("--chunks", type=int, default=50, help="SSE events per stream, >= 2")
    p.add_argument("--delay-first", type=float, default=0.0, help="seconds before first byte")
    p.add_argument("--delay-chunk", type=float, default=0.0, help="seconds between events")
    a = p.parse_args()
    if a.chunks < 2:
        p.error("--chunks must be at least 2 (role chunk and finish chunk)")
    raise_open_files_limit()
    fake = Fake(Settings(a.chunks, a.delay_first, a.delay_chunk))
    serve_forever(fake.app(), a.host, a.port)


def raise_open_files_limit() -> None:
    """Thousands of open streams (bench/many_streams.py) need as many sockets."""
    try:
        import resource
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


if __name__ == "__main__":
    main()
