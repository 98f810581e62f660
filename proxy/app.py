"""create_app(): the routes, each wrapped by the front (proxy/front.py), and what lives with
the app: the one outgoing ClientSession, the state, the routes watcher, the drain."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from proxy import handlers
from proxy.app_keys import (
    DRAIN,
    HTTP,
    MAX_BODY,
    METRICS,
    RESPONSE_IDS,
    STATE,
    TABLES,
)
from proxy.connection_limits import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_KEEPALIVE_TIMEOUT,
    ConnectionLimits,
)
from proxy.errors import (
    AuthenticationFailed,
)
from proxy.front import MAX_HEADER_BYTES, Front, new_request_id
from proxy.http_server import serve_connections
from proxy.ingress.chat import chat_completions
from proxy.ingress.embeddings import embeddings
from proxy.ingress.responses import create_response, stored_response, unoffered_endpoint
from proxy.metrics import CONTENT_TYPE, Metrics
from proxy.reload import Outcome, TableHolder, watch
from proxy.response_ids import ENV_SECRET, ResponseIds
from proxy.shutdown import DEFAULT_DRAIN_TIMEOUT, Drain
from proxy.state import AppState

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 16 * 1024 * 1024
DEFAULT_MAX_CONNECTIONS = 1000
DEFAULT_SEND_TIMEOUT = 60.0
# The request's header lines, names and values together: the HTTP parser's own limits sit
# above the front's check (proxy/front.py), so an oversized header section meets that check
# first and gets an OpenAI-shaped 431; what exceeds the parser's limits gets the JSON answer
# of proxy/bad_requests.py.
_PARSER_LIMITS = {"max_line_size": 2 * MAX_HEADER_BYTES, "max_field_size": 2 * MAX_HEADER_BYTES}
_CATCH_ALL = "/{path:.*}"


async def unmatched(request: web.Request) -> web.StreamResponse:
    """The catch-all route: 405 with `Allow` when another route has the path, else 404."""
    allowed: set[str] = set()
    this = request.match_info.route.resource
    for resource in request.app.router.resources():
        if resource is not this:
            allowed |= (await resource.resolve(request))[1]
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


def _http_session_ctx(app: web.Application) -> AsyncIterator[None]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30)
        # No cookie jar: cookies an upstream sets for one client must not ride along on every
        # other client's requests, and the jar's bookkeeping is work on every request.
        async with aiohttp.ClientSession(
            connector=connector,
            trust_env=False,
            raise_for_status=False,
            cookie_jar=aiohttp.DummyCookieJar(),
        ) as session:
            app[HTTP] = session
            yield

    return ctx(app)


def _state_ctx(app: web.Application) -> AsyncIterator[None]:
    """The state that outlives route tables (proxy/state.py): its streams swept for the send
    timeout while the app runs; its background tasks awaited, then cancelled, at the end."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        state = app[STATE]
        sweeper = asyncio.create_task(_sweep(state), name="send-timeout-sweep")
        yield
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
        await state.close()

    return ctx(app)


async def _sweep(state: AppState) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(1.0)
        if len(state.streams):
            state.streams.sweep(loop.time())


def _watcher_ctx(interval: float) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        holder, metrics = app[TABLES], app[METRICS]
        metrics.table(holder.current.version, holder.current.loaded_at)

        def counted(outcome: Outcome) -> None:
            metrics.reloaded(outcome != "failed")
            metrics.table(holder.current.version, holder.current.loaded_at)

        stop = asyncio.Event()
        task = asyncio.create_task(
            watch(holder, interval, counted, stop), name="routes-watcher"
        )
        yield
        stop.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return ctx


async def _drain_on_shutdown(app: web.Application) -> None:
    await app[DRAIN].wait()


async def metrics_endpoint(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    metrics.tasks.sample()  # on the loop: render's thread has none to count the tasks of
    metrics.flush()
    body = await asyncio.to_thread(metrics.render)
    return handlers.probe_answer(
        request, web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
    )


async def _expect(request: web.Request) -> None:
    """`Expect: 100-continue` as aiohttp does it; other expectations are ignored (RFC 9110
    §10.1.1 allows it, nginx does it). aiohttp's own handler answers them with a plain-text
    417 that echoes the value, and with a 500 when the value is not UTF-8."""
    headers = request.headers
    if headers.get("Expect", "").lower() != "100-continue":
        return
    try:
        # A caller that will be refused is refused before it sends its body: no 100 first.
        request.app[TABLES].current.auth.check(
            headers.get("Authorization"), headers.get("X-Api-Key")
        )
    except AuthenticationFailed:
        return
    if request.version == aiohttp.HttpVersion11:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        # The interim answer is not part of the response body.
        request.writer.output_size = 0


def create_app(
    holder: TableHolder,
    *,
    max_body: int = DEFAULT_MAX_BODY,
    reload_interval: float = 1.0,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    metrics: Metrics | None = None,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT,
    send_timeout: float = DEFAULT_SEND_TIMEOUT,
    response_ids: ResponseIds | None = None,
) -> web.Application:
    """`reload_interval`: seconds between looks at the routes file (0: on SIGHUP only);
    `drain_timeout`: how long requests in flight may run on after shutdown begins;
    `max_connections`: requests served at once before new ones get a 503 (0: no limit);
    `header_timeout`, `body_timeout`, `keepalive_timeout`: proxy/connection_limits.py;
    `send_timeout`: how long one write to a client that does not read may block a stream;
    `response_ids`: the keyring of signed response ids (default: from AGENTPROXY_ID_SECRET)."""
    app = web.Application(client_max_size=max_body, handler_args=_PARSER_LIMITS)
    app[TABLES] = holder
    app[STATE] = holder.state
    holder.state.streams.send_timeout = send_timeout
    app[MAX_BODY] = max_body
    if response_ids is None and ENV_SECRET in os.environ:
        # A secret that is set is checked now, not at the first chained response.
        response_ids = ResponseIds.from_env(os.environ)
    app[RESPONSE_IDS] = (
        functools.cache(lambda: ResponseIds.from_env(os.environ))
        if response_ids is None
        else lambda: response_ids
    )
    app[METRICS] = metrics = metrics if metrics is not None else Metrics()
    app[DRAIN] = drain = Drain(holder, drain_timeout)
    front = Front(drain, metrics, max_connections)
    limits = ConnectionLimits(header_timeout, body_timeout, keepalive_timeout)
    serve_connections(app, limits, metrics, new_request_id)
    app.on_startup.append(front.on_startup)
    app.cleanup_ctx.append(_http_session_ctx)
    app.cleanup_ctx.append(_state_ctx)
    app.cleanup_ctx.append(_watcher_ctx(reload_interval))
    app.on_shutdown.append(_drain_on_shutdown)
    routes: list[tuple[str, str, Handler]] = [
        ("POST", "/v1/chat/completions", chat_completions),
        ("POST", "/chat/completions", chat_completions),
        ("POST", "/v1/responses", create_response),
        ("POST", "/responses", create_response),
        ("POST", "/v1/responses/compact", unoffered_endpoint),
        ("POST", "/v1/responses/input_tokens", unoffered_endpoint),
        ("POST", "/responses/compact", unoffered_endpoint),
        ("POST", "/responses/input_tokens", unoffered_endpoint),
        ("GET", "/v1/responses/{response_id}", stored_response),
        ("DELETE", "/v1/responses/{response_id}", stored_response),
        ("POST", "/v1/responses/{response_id}/cancel", stored_response),
        ("GET", "/v1/responses/{response_id}/input_items", stored_response),
        ("GET", "/responses/{response_id}", stored_response),
        ("DELETE", "/responses/{response_id}", stored_response),
        ("POST", "/responses/{response_id}/cancel", stored_response),
        ("GET", "/responses/{response_id}/input_items", stored_response),
        ("POST", "/v1/embeddings", embeddings),
        ("POST", "/embeddings", embeddings),
        ("GET", "/v1/models", handlers.list_models),
        ("GET", "/models", handlers.list_models),
        ("GET", "/v1/models/{model:.+}", handlers.get_model),
        ("GET", "/models/{model:.+}", handlers.get_model),
        ("GET", "/healthz", handlers.healthz),
        ("GET", "/readyz", handlers.readyz),
        ("GET", "/metrics", metrics_endpoint),
        # Last: the router tries it only after every other route.
        ("*", _CATCH_ALL, unmatched),
    ]
    for method, path, handler in routes:
        # aiohttp handles `Expect` before any handler runs: see _expect.
        if method == "GET":  # and HEAD, as aiohttp's add_get does
            app.router.add_get(path, front.wrap(handler), expect_handler=_expect)
        else:
            app.router.add_route(method, path, front.wrap(handler), expect_handler=_expect)
    return app
