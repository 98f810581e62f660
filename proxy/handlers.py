"""The small handlers (models, probes) and what every handler shares: authentication, model
resolution, JSON answers and the headers every response carries. The chat completions and
Responses handlers are in proxy/ingress/."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import orjson
from aiohttp import web

from proxy.app_keys import EXCHANGE, HTTP, MAX_BODY, TABLES
from proxy.auth import Grant
from proxy.chat_request import check_content_type
from proxy.errors import InvalidRequest, PayloadTooLarge
from proxy.exchange import Exchange
from proxy.routing import Route, RouteTable
from proxy.upstreams.bulk_read import read_whole

_JSON_TYPE = ("Content-Type", "application/json")


def stamp_headers(exchange: Exchange, response: web.StreamResponse) -> float:
    """X-Request-Id and Server-Timing, which every response carries, set just before its
    headers go out (the front wrapper does it for all but streams, which commit first).
    Returns the proxy's own seconds so far."""
    headers = response.headers
    headers["X-Request-Id"] = exchange.request_id
    total = (time.perf_counter() - exchange.started) * 1000.0
    upstream = exchange.upstream_ms or 0.0
    proxy = max(total - upstream, 0.0)
    headers["Server-Timing"] = f"upstream;dur={upstream:.2f}, proxy;dur={proxy:.2f}"
    return proxy / 1000.0


def json_response(
    body: bytes, status: int = 200, headers: Iterable[tuple[str, str]] = ()
) -> web.Response:
    return web.Response(body=body, status=status, headers=[_JSON_TYPE, *headers])


async def read_body(request: web.Request) -> bytes:
    """The request's body, as `request.read()` gives it, with the same limit (`--max-body`):
    read with `read_whole`. A compressed body is aiohttp's to inflate, and to bound."""
    if "Content-Encoding" in request.headers:
        return await request.read()
    limit = request.app[MAX_BODY]
    declared = request.content_length
    if declared is not None and declared > limit:
        # Refused before it is sent, rather than once --max-body bytes of it have come.
        raise body_too_large(limit)
    body = await read_whole(request.content, limit)
    if body is None:
        raise body_too_large(limit)
    return body


def body_too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"Request body too large: the limit is {limit} bytes.")


def authenticate(request: web.Request, table: RouteTable) -> Grant:
    headers = request.headers
    return table.auth.check(headers.get("Authorization"), headers.get("X-Api-Key"))


def accept(request: web.Request) -> tuple[Exchange, RouteTable, Grant]:
    """What every API request starts with: its record, the one route table it keeps to its
    end, and the caller, authenticated before the body is read (which the caller does next:
    one coroutine less on every request's path)."""
    exchange = request[EXCHANGE]
    exchange.chat = True
    table = request.app[TABLES].current
    grant = authenticate(request, table)
    given = request.headers.get("Content-Type")
    # The type every SDK sends, as it sends it, needs no parsing.
    if given != "application/json":
        check_content_type(request.content_type if request.body_exists else "")
    return exchange, table, grant


def resolve_model(
    table: RouteTable, model: str | None, grant: Grant
) -> tuple[Route, str, str]:
    """The route, the model's name for the client, and its name for the upstream. A request
    without `model` gets the default model, unless the key may not use it; then the 400
    does not name it."""
    if model is None:
        model = table.default_model
        if model is None or not grant.allows(model):
            raise InvalidRequest("You must provide a model parameter.", param="model")
    route, upstream_model = table.resolve(model, grant)
    return route, model, upstream_model


async def list_models(request: web.Request) -> web.Response:
    table = request.app[TABLES].current
    grant = authenticate(request, table)
    cards = await table.model_cards(request.app[HTTP], request[EXCHANGE], grant)
    return json_response(orjson.dumps({"object": "list", "data": cards}))


async def get_model(request: web.Request) -> web.Response:
    table = request.app[TABLES].current
    grant = authenticate(request, table)
    card = await table.model_card(
        request.match_info["model"], request.app[HTTP], request[EXCHANGE], grant
    )
    return json_response(orjson.dumps(card))


def probe_answer(request: web.Request, response: web.Response) -> web.Response:
    """A probe's or scrape's answer, which closes the connection while a request body is still
    arriving. Nothing reads the body, and aiohttp would read on and discard it after the
    answer, for up to 10 s (its lingering close) at whatever rate the client sends it (an
    endless chunked body: some 15 GB on loopback, a core kept busy). The connection stops
    parsing what comes (a closing one ignores it) and the body is ended here, so aiohttp has
    nothing left to discard and closes the connection once the answer is out."""
    payload = request.content
    if not payload.is_eof():
        request.protocol.close()
        payload.feed_eof()
        response.force_close()
    return response


async def healthz(request: web.Request) -> web.Response:
    return probe_answer(request, json_response(b'{"status":"ok"}'))


async def readyz(request: web.Request) -> web.Response:
    holder = request.app[TABLES]
    table = holder.current
    body: dict[str, Any] = {
        "status": "draining" if holder.draining else "ready",
        "version": table.version,
        "loaded_at": table.loaded_at,
        "last_error": holder.last_error,
    }
    # Upstream trouble does not make the proxy unready: it fails over, or answers 502/504
    # itself; a probe that pulled the pod for it would only move the same trouble elsewhere.
    now = time.monotonic()
    body["upstreams"] = {name: up.health.snapshot(now) for name, up in table.upstreams.items()}
    answer = json_response(orjson.dumps(body), 503 if holder.draining else 200)
    return probe_answer(request, answer)
