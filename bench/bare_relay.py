"""The ceiling: the least an aiohttp relay can do for `POST /v1/chat/completions`.

Bytes in, bytes out, through one pooled keep-alive ClientSession; streams are relayed chunk
by chunk as they arrive. No auth, routing, validation, header hygiene, timeouts or logging,
so no real proxy should beat it: the gap between agentproxy and this is what agentproxy's own
features cost, and the gap between this and the upstream is what aiohttp itself costs.

    python bench/bare_relay.py --port 0 --upstream http://127.0.0.1:8001/v1

Prints its port, alone on a line, once it accepts connections.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

# Startup only (event loop, listening socket): the request path stays in this file.
from runtime import serve_forever

SESSION = web.AppKey("session", aiohttp.ClientSession)
TARGET = web.AppKey("target", str)


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
    async with request.app[SESSION].post(
        request.app[TARGET], data=body, headers=headers
    ) as upstream:
        ctype = upstream.headers.get("Content-Type", "application/json")
        if not ctype.startswith("text/event-stream"):
            return web.Response(
                status=upstream.status, body=await upstream.read(), headers={"Content-Type": ctype}
            )
        resp = web.StreamResponse(
            status=upstream.status, headers={"Content-Type": ctype, "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
        except ConnectionResetError:
            # The client left mid-stream (a load generator at its deadline); nothing to relay to.
            pass
        return resp


def make_app(upstream: str) -> web.Application:
    app = web.Application()
    app[TARGET] = upstream.rstrip("/") + "/chat/completions"

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        # limit=0: the pool never queues a request behind others; keep-alive reuses sockets.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
        async with aiohttp.ClientSession(
            connector=connector, auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None)
        ) as session:
            app[SESSION] = session
            yield

    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/chat/completions", chat)
    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    p.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:8001/v1")
    a = p.parse_args()
    serve_forever(make_app(a.upstream), a.host, a.port)


if __name__ == "__main__":
    main()
