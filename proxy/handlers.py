"""HTTP handlers. They speak only OpenAI: parse, resolve, hand to an adapter, render."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from contextlib import aclosing
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from proxy.app_keys import DRAIN, EXCHANGE, HTTP, METRICS, TABLES
from proxy.auth import Grant
from proxy.chat_request import check_content_type, parse_chat_request
from proxy.errors import InternalError, InvalidRequest, ProxyError
from proxy.failover import Failover, is_failure
from proxy.metrics import Exchange, has_token
from proxy.routing import RouteTable
from proxy.sessions import session_hint
from proxy.shutdown import shutting_down
from proxy.sse import DONE
from proxy.upstreams.base import Call, EventStream, Upstream

log = logging.getLogger(__name__)

_JSON_TYPE = ("Content-Type", "application/json")
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


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
    return json_response(orjson.dumps(body), 503 if holder.draining else 200)


async def _open_stream(
    upstream: Upstream, call: Call, http: aiohttp.ClientSession
) -> tuple[EventStream, bytes | None]:
    """The stream and its first event, before anything is committed to the client.

    Waiting for the first event (not only the upstream's headers) lets an upstream that
    fails or stays silent at once still get a real HTTP error, and the next upstream its
    turn. The wait lasts at most the keep-alive interval: then the first event is the
    keep-alive comment, and the 200 goes out with it.
    """
    events = await upstream.open_stream(call, http)
    try:
        first: bytes | None = await anext(aiter(events))
    except StopAsyncIteration:
        first = None
    except BaseException:
        await events.aclose()
        raise
    return events, first


async def chat_completions(request: web.Request) -> web.StreamResponse:
    exchange = request[EXCHANGE]
    exchange.chat = True
    app = request.app
    table = app[TABLES].current
    grant = _authenticate(request, table)
    check_content_type(request.content_type if request.body_exists else "")
    chat = parse_chat_request(await request.read())
    model = chat.model or table.default_model
    if model is None:
        raise InvalidRequest("You must provide a model parameter.", param="model")
    route, upstream_model = table.resolve(model, grant)
    exchange.model, exchange.route, exchange.stream = model, route.name, chat.stream
    call = Call(
        body=chat.body,
        client_model=model,
        upstream_model=upstream_model,
        stream=chat.stream,
        include_usage=chat.include_usage,
        headers=request.headers,
        request_id=exchange.request_id,
        key_id=grant.key_id,
        route=route.spec,
        task=exchange.task,
    )
    if route.stateful:
        call.session_hint = session_hint(
            request.headers, chat.body, model, from_user=route.spec.session.from_user
        )
    http = app[HTTP]
    metrics = app[METRICS]

    def on_error(upstream: Upstream, exc: ProxyError) -> None:
        exchange.upstream = upstream.name
        # The class's code, not the instance's: an upstream's own codes are unbounded.
        metrics.upstream_error(upstream.name, type(exc).code)

    def on_failover(upstream: Upstream) -> None:
        metrics.failover(upstream.name)

    failover = Failover(route.upstreams, call, on_error, on_failover)
    while True:
        upstream = failover.next() or await failover.queue()
        try:
            if chat.stream:
                events, first = await _open_stream(upstream, call, http)
            else:
                body = await upstream.complete(call, http)
        except BaseException as exc:
            if failover.retry(upstream, exc):
                continue
            raise
        break
    failover.succeeded(upstream)
    exchange.upstream = upstream.name
    exchange.upstream_ms = call.upstream_ms
    if not chat.stream:
        upstream.health.release()
        return json_response(body, headers=call.response_headers)
    try:
        return await _relay_stream(request, call, events, first, upstream)
    finally:
        upstream.health.release()


async def _relay_stream(
    request: web.Request,
    call: Call,
    events: EventStream,
    first: bytes | None,
    upstream: Upstream,
) -> web.StreamResponse:
    response = web.StreamResponse(headers=SSE_HEADERS)
    response.headers.extend(call.response_headers)
    exchange = request[EXCHANGE]
    metrics = request.app[METRICS]
    async with aclosing(events):
        # The proxy's share of a stream is its time to the commit.
        exchange.overhead = stamp_headers(exchange, response)
        await response.prepare(request)
        exchange.status = response.status
        metrics.stream_opened()
        try:
            if first is not None:
                if has_token(first):
                    exchange.ttft = time.perf_counter() - exchange.started
                await response.write(first)
            async for data in events:
                if exchange.ttft is None and has_token(data):
                    exchange.ttft = time.perf_counter() - exchange.started
                await response.write(data)
        except ProxyError as exc:
            if is_failure(exc):
                upstream.health.failed(time.monotonic())
            exchange.error = exc.code
            metrics.upstream_error(exchange.upstream, type(exc).code)
            await response.write(b"data: " + exc.to_json() + b"\n\n")
        except ConnectionResetError:
            # The client left: aclosing() closes the upstream request on the way out.
            exchange.error = "client_closed"
            return response
        except asyncio.CancelledError:
            task = exchange.task
            if task is None or not request.app[DRAIN].ended(task):
                raise
            # The drain deadline passed: the client gets a clean end instead of a cut.
            task.uncancel()
            err = shutting_down()
            exchange.error = err.code
            await response.write(b"data: " + err.to_json() + b"\n\n")
        except Exception:
            log.exception("stream %s failed", call.request_id)
            exchange.error = InternalError.code
            await response.write(b"data: " + InternalError(call.request_id).to_json() + b"\n\n")
        finally:
            metrics.stream_closed()
    # [DONE] and the end of the chunked body in one write: one send to the client, not two.
    await response.write_eof(DONE)
    return response
