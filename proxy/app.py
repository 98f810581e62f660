"""create_app(): the front around every handler, routes and the one outgoing ClientSession."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from random import getrandbits

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from proxy import handlers
from proxy.access_log import access_log, log_exchange
from proxy.app_keys import (
    DRAIN,
    EXCHANGE,
    HTTP,
    MAX_BODY,
    METRICS,
    RESPONSE_IDS,
    STATE,
    TABLES,
)
from proxy.bad_requests import check_content_encoding
from proxy.connection_limits import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_KEEPALIVE_TIMEOUT,
    ConnectionLimits,
)
from proxy.errors import (
    AuthenticationFailed,
    HeadersTooLarge,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ProxyError,
    ServiceUnavailable,
)
from proxy.exchange import DRAIN as DRAINED
from proxy.exchange import Exchange
from proxy.handlers import stamp_headers
from proxy.http_server import serve_connections
from proxy.ingress.chat import chat_completions
from proxy.ingress.embeddings import embeddings
from proxy.ingress.responses import create_response, stored_response
from proxy.metrics import CONTENT_TYPE, Metrics
from proxy.reload import Outcome, TableHolder, watch
from proxy.response_ids import ENV_SECRET, ResponseIds
from proxy.shutdown import DEFAULT_DRAIN_TIMEOUT, Drain, shutting_down
from proxy.state import AppState

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 16 * 1024 * 1024
DEFAULT_MAX_CONNECTIONS = 1000
DEFAULT_SEND_TIMEOUT = 60.0
# The request's header lines, names and values together. The HTTP parser's own limits sit
# above it (one line at most twice as long, 128 lines), so an oversized header section meets
# this check first and gets an OpenAI-shaped 431; only what exceeds the parser's limits is
# refused by aiohttp itself, with a plain-text 400, before any of the proxy's code runs.
MAX_HEADER_BYTES = 16 * 1024
_PARSER_LIMITS = {"max_line_size": 2 * MAX_HEADER_BYTES, "max_field_size": 2 * MAX_HEADER_BYTES}
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
# Probes and scrapes arrive every few seconds: their log lines are debug, not info.
_QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_CATCH_ALL = "/{path:.*}"


def render(err: ProxyError) -> web.Response:
    response = web.Response(
        body=err.to_json(), status=err.status, content_type="application/json"
    )
    response.headers.update(err.headers)
    return response


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> ProxyError:
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return MethodNotAllowed(
            f"Method {request.method} is not allowed for {request.path}; use {allowed}.",
            headers={"Allow": allowed},
        )
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return PayloadTooLarge(
            f"Request body too large: the limit is {request.app[MAX_BODY]} bytes."
        )
    if exc.status == 404:
        return NotFound(f"Invalid URL ({request.method} {request.path}).")
    err = ProxyError(exc.reason)
    err.status = exc.status
    err.type = "invalid_request_error" if exc.status < 500 else "server_error"
    err.code = None
    return err


class _Front:
    """What every request goes through first and last: request id, drain tracking,
    admission, errors rendered as OpenAI JSON, the stamped headers, and the metrics and log
    line of the request.

    A wrapper around each route's handler, not an aiohttp middleware: with any middleware
    aiohttp adds a layer of its own (`_fix_request_current_app`) and a cached handler chain,
    and every coroutine layer is paid again at each suspension of a request. A catch-all
    route (`unmatched`) gives unknown paths and methods the same treatment.
    """

    __slots__ = ("drain", "loop", "max_connections", "metrics")

    def __init__(self, drain: Drain, metrics: Metrics, max_connections: int) -> None:
        self.drain = drain
        self.metrics = metrics
        self.max_connections = max_connections
        # Set at startup: passing the loop to current_task() spares the request a
        # get_running_loop(), which on Python 3.11 costs a getpid() system call.
        self.loop: asyncio.AbstractEventLoop | None = None

    async def on_startup(self, app: web.Application) -> None:
        self.loop = asyncio.get_running_loop()

    def wrap(self, handler: Handler) -> Handler:
        front = self

        async def guarded(request: web.Request) -> web.StreamResponse:
            given = request.headers.get("X-Request-Id")
            task = asyncio.current_task(front.loop)
            assert task is not None
            exchange = request[EXCHANGE] = Exchange(
                time.perf_counter(),
                given if given and _REQUEST_ID.fullmatch(given) else new_request_id(),
                task,
            )
            drain = front.drain
            drain.track(exchange)
            response: web.StreamResponse | None = None
            try:
                response = _refusal(request, drain, front.max_connections)
                if response is None:
                    response = await handler(request)
            except ProxyError as err:
                response = render(err)
            except web.HTTPException as exc:
                response = render(_from_http_exception(request, exc))
            except asyncio.CancelledError:
                if exchange.take(DRAINED) is None:
                    # aiohttp cancels the handler when the client disconnects.
                    exchange.error = exchange.error or "client_closed"
                    raise
                response = render(shutting_down())
            except web.RequestPayloadError:
                # The client's body cannot be read: a Content-Encoding it does not have, or
                # broken chunked framing. Its fault, not a 500; the connection cannot be reused.
                response = render(InvalidRequest("The request body could not be read: "
                                                 "malformed Content-Encoding or "
                                                 "Transfer-Encoding."))
                response.force_close()
            except Exception:
                log.exception("request %s failed", exchange.request_id)
                response = render(InternalError(exchange.request_id))
            finally:
                drain.untrack(exchange)
                if response is not None and not response.prepared:
                    # A stream stamped its own headers before it committed them.
                    stamp_headers(exchange, response)
                _finish(request, front.metrics, exchange, response)
            return response

        return guarded


def new_request_id() -> str:
    # An id to find a request by in logs, not a secret: a random prefix per process (so
    # workers and restarts do not collide) and a counter. `secrets` would cost every request
    # a getrandom() system call, and even a random 96-bit number costs more to format.
    return f"req_{_ID_PREFIX}{next(_ID_COUNTER):08x}"


_ID_PREFIX = f"{getrandbits(64):016x}"
_ID_COUNTER = itertools.count(1)


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


def _finish(
    request: web.Request, metrics: Metrics, ex: Exchange, response: web.StreamResponse | None
) -> None:
    """Metrics and the log line of a request that has ended, however it ended."""
    duration = time.perf_counter() - ex.started
    if response is not None:
        ex.status = response.status
    elif not ex.status:
        ex.status = 499  # cancelled before an answer: the client went away (nginx's code)
    if ex.chat:
        overhead = ex.overhead
        if overhead is None:
            upstream_ms = ex.upstream_ms
            if upstream_ms is not None:
                overhead = max(duration - upstream_ms / 1000.0, 0.0)
            elif not ex.upstream:
                overhead = duration  # refused before any upstream: all of it is the proxy's
            # else an upstream was tried and never answered: its share is unknown.
        metrics.observe(ex, duration, overhead)
    level = logging.DEBUG if request.path in _QUIET_PATHS else logging.INFO
    if access_log.isEnabledFor(level):
        sent = 0
        if response is not None:
            sent = response.body_length if response.prepared else response.content_length or 0
        log_exchange(
            ex.request_id, request.method, request.path, ex, duration, sent, level
        )


def _refusal(
    request: web.Request, drain: Drain, max_connections: int
) -> web.StreamResponse | None:
    """Limits that protect the worker, checked before any other work: a response that
    refuses the request, or None to serve it."""
    # Each connection carries one request at a time, so the requests in flight are the
    # connections in use; idle keep-alive connections cost a socket and nothing else.
    # Probes and scrapes are always answered, so an overloaded pod is not also restarted.
    if (
        max_connections
        and drain.in_flight > max_connections
        and request.path not in _QUIET_PATHS
    ):
        response = render(
            ServiceUnavailable(
                f"The proxy is serving its limit of {max_connections} connections "
                "(--max-connections); retry shortly.",
                code="too_many_connections",
                headers={"Retry-After": "1"},
            )
        )
        # Closing frees the socket too, which is what the limit is for.
        response.force_close()
        return response
    size = 0
    for name, value in request.raw_headers:
        size += len(name) + len(value)
    if size > MAX_HEADER_BYTES:
        raise HeadersTooLarge(
            f"Request headers too large: {size} bytes, the limit is {MAX_HEADER_BYTES}."
        )
    check_content_encoding(request)
    return None


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

        task = asyncio.create_task(watch(holder, interval, counted), name="routes-watcher")
        yield
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
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


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
    front = _Front(drain, metrics, max_connections)
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
