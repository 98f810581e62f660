"""HTTP handlers. They speak only OpenAI: parse, resolve, hand to an adapter, render."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import TypeVar

import orjson
from aiohttp import web

from proxy.app_keys import HTTP, REQUEST_ID, TABLES, UPSTREAM_MS
from proxy.auth import Grant
from proxy.chat_request import check_content_type, parse_chat_request
from proxy.errors import InternalError, InvalidRequest, ProxyError, UpstreamUnavailable
from proxy.routing import Route, RouteTable
from proxy.sessions import session_hint
from proxy.sse import DONE
from proxy.upstreams.base import Call, EventStream, Upstream

log = logging.getLogger(__name__)

T = TypeVar("T")

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def json_response(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json")


def _authenticate(request: web.Request, table: RouteTable) -> Grant:
    headers = request.headers
    return table.auth.check(headers.get("Authorization"), headers.get("X-Api-Key"))


async def list_models(request: web.Request) -> web.Response:
    table = request.app[TABLES].current
    grant = _authenticate(request, table)
    cards = await table.model_cards(request.app[HTTP], grant)
    return json_response(orjson.dumps({"object": "list", "data": cards}))


async def get_model(request: web.Request) -> web.Response:
    table = request.app[TABLES].current
    grant = _authenticate(request, table)
    card = await table.model_card(request.match_info["model"], request.app[HTTP], grant)
    return json_response(orjson.dumps(card))


async def healthz(request: web.Request) -> web.Response:
    return json_response(b'{"status":"ok"}')


async def readyz(request: web.Request) -> web.Response:
    holder = request.app[TABLES]
    table = holder.current
    body = {
        "status": "draining" if holder.draining else "ready",
        "version": table.version,
        "loaded_at": table.loaded_at,
        "last_error": holder.last_error,
    }
    return json_response(orjson.dumps(body), 503 if holder.draining else 200)


async def _first_available(
    route: Route, attempt: Callable[[Upstream], Awaitable[T]]
) -> T:
    """The first upstream of the route that accepts the connection serves the request."""
    failure: UpstreamUnavailable | None = None
    for upstream in route.upstreams:
        try:
            return await attempt(upstream)
        except UpstreamUnavailable as exc:
            failure = exc
    assert failure is not None
    raise failure


async def chat_completions(request: web.Request) -> web.StreamResponse:
    table = request.app[TABLES].current
    grant = _authenticate(request, table)
    check_content_type(request.content_type if request.body_exists else "")
    chat = parse_chat_request(await request.read())
    model = chat.model or table.default_model
    if model is None:
        raise InvalidRequest("You must provide a model parameter.", param="model")
    route, upstream_model = table.resolve(model, grant)
    call = Call(
        body=chat.body,
        client_model=model,
        upstream_model=upstream_model,
        stream=chat.stream,
        include_usage=chat.include_usage,
        headers=request.headers,
        request_id=request[REQUEST_ID],
        key_id=grant.key_id,
        route=route.spec,
    )
    if route.stateful:
        call.session_hint = session_hint(
            request.headers, chat.body, model, from_user=route.spec.session.from_user
        )
    http = request.app[HTTP]
    if not chat.stream:
        body = await _first_available(route, lambda up: up.complete(call, http))
        request[UPSTREAM_MS] = call.upstream_ms
        response = json_response(body)
        response.headers.extend(call.response_headers)
        return response
    events = await _first_available(route, lambda up: up.open_stream(call, http))
    request[UPSTREAM_MS] = call.upstream_ms
    return await _relay_stream(request, call, events)


async def _relay_stream(
    request: web.Request, call: Call, events: EventStream
) -> web.StreamResponse:
    response = web.StreamResponse(headers=SSE_HEADERS)
    response.headers.extend(call.response_headers)
    async with aclosing(events):
        await response.prepare(request)
        try:
            async for data in events:
                await response.write(data)
        except ProxyError as exc:
            await response.write(b"data: " + exc.to_json() + b"\n\n")
        except ConnectionResetError:
            # The client left: aclosing() closes the upstream request on the way out.
            return response
        except Exception:
            log.exception("stream %s failed", call.request_id)
            await response.write(b"data: " + InternalError(call.request_id).to_json() + b"\n\n")
    await response.write(DONE)
    await response.write_eof()
    return response
