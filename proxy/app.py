"""create_app(): middlewares, routes and the one outgoing ClientSession."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from proxy import handlers
from proxy.app_keys import (
    DRAIN,
    EXCHANGE,
    HTTP,
    MAX_BODY,
    METRICS,
    REQUEST_ID,
    STARTED,
    TABLES,
    UPSTREAM_MS,
)
from proxy.errors import (
    HeadersTooLarge,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ProxyError,
    ServiceUnavailable,
)
from proxy.handlers import stamp_headers
from proxy.metrics import CONTENT_TYPE, Exchange, Metrics, access_log, log_exchange
from proxy.reload import Outcome, TableHolder, watch
from proxy.shutdown import DEFAULT_DRAIN_TIMEOUT, Drain, shutting_down

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 16 * 1024 * 1024
DEFAULT_MAX_CONNECTIONS = 1000
# The request's header lines, names and values together. The HTTP parser's own limits sit
# above it (one line at most twice as long, 128 lines), so an oversized header section meets
# this check first and gets an OpenAI-shaped 431; only what exceeds the parser's limits is
# refused by aiohttp itself, with a plain-text 400, before any of the proxy's code runs.
MAX_HEADER_BYTES = 16 * 1024
_PARSER_LIMITS = {"max_line_size": 2 * MAX_HEADER_BYTES, "max_field_size": 2 * MAX_HEADER_BYTES}
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
# Probes and scrapes arrive every few seconds: their log lines are debug, not info.
_QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


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


def _front(max_connections: int) -> Middleware:
    """The one middleware: request id, drain tracking, admission, errors rendered as OpenAI
    JSON, the stamped headers, and the metrics and log line of every request.

    One middleware, not a chain: aiohttp wraps each in a coroutine (and adds one of its own
    whenever there are any), and every layer is paid again at each suspension of a request.
    """

    @web.middleware
    async def front(request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get("X-Request-Id")
        request[REQUEST_ID] = (
            given if given and _REQUEST_ID.fullmatch(given) else "req_" + secrets.token_hex(12)
        )
        started = request[STARTED] = time.perf_counter()
        exchange = request[EXCHANGE] = Exchange(started)
        drain = request.app[DRAIN]
        task = asyncio.current_task()
        assert task is not None
        drain.track(task)
        response: web.StreamResponse | None = None
        try:
            response = _refusal(request, drain, max_connections)
            if response is None:
                response = await handler(request)
        except ProxyError as err:
            response = render(err)
        except web.HTTPException as exc:
            response = render(_from_http_exception(request, exc))
        except asyncio.CancelledError:
            if not drain.ended(task):
                # aiohttp cancels the handler when the client disconnects.
                exchange.error = exchange.error or "client_closed"
                raise
            task.uncancel()
            response = render(shutting_down())
        except web.RequestPayloadError:
            # The client's body cannot be read: a Content-Encoding it does not have, or broken
            # chunked framing. Its fault, not a 500; the connection cannot be reused.
            response = render(InvalidRequest("The request body could not be read: malformed "
                                             "Content-Encoding or Transfer-Encoding."))
            response.force_close()
        except Exception:
            log.exception("request %s failed", request[REQUEST_ID])
            response = render(InternalError(request[REQUEST_ID]))
        finally:
            drain.untrack(task)
            if response is not None and not response.prepared:
                # A stream stamped its own headers before it committed them.
                stamp_headers(request, response)
            _finish(request, exchange, response)
        return response

    return front


def _finish(
    request: web.Request, ex: Exchange, response: web.StreamResponse | None
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
            upstream_ms = request.get(UPSTREAM_MS)
            if upstream_ms is not None:
                overhead = max(duration - upstream_ms / 1000.0, 0.0)
            elif not ex.upstream:
                overhead = duration  # refused before any upstream: all of it is the proxy's
            # else an upstream was tried and never answered: its share is unknown.
        request.app[METRICS].observe(ex, duration, overhead)
    level = logging.DEBUG if request.path in _QUIET_PATHS else logging.INFO
    if access_log.isEnabledFor(level):
        sent = 0
        if response is not None:
            sent = response.body_length if response.prepared else response.content_length or 0
        log_exchange(
            request[REQUEST_ID], request.method, request.path, ex, duration, sent, level
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
    body = await asyncio.to_thread(metrics.render)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def _expect(request: web.Request) -> None:
    """`Expect: 100-continue` as aiohttp does it; other expectations are ignored (RFC 9110
    §10.1.1 allows it, nginx does it). aiohttp's own handler answers them with a plain-text
    417 that echoes the value, and with a 500 when the value is not UTF-8."""
    if request.headers.get("Expect", "").lower() != "100-continue":
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
) -> web.Application:
    """`reload_interval`: seconds between looks at the routes file (0: on SIGHUP only);
    `drain_timeout`: how long requests in flight may run on after shutdown begins;
    `max_connections`: requests served at once before new ones get a 503 (0: no limit)."""
    app = web.Application(
        middlewares=[_front(max_connections)],
        client_max_size=max_body,
        handler_args=_PARSER_LIMITS,
    )
    app[TABLES] = holder
    app[MAX_BODY] = max_body
    app[METRICS] = metrics if metrics is not None else Metrics()
    app[DRAIN] = Drain(holder, drain_timeout)
    app.cleanup_ctx.append(_http_session_ctx)
    app.cleanup_ctx.append(_watcher_ctx(reload_interval))
    app.on_shutdown.append(_drain_on_shutdown)
    chat = handlers.chat_completions
    # aiohttp handles `Expect` before the middlewares run: see _expect.
    app.router.add_post("/v1/chat/completions", chat, expect_handler=_expect)
    app.router.add_post("/chat/completions", chat, expect_handler=_expect)
    app.router.add_get("/v1/models", handlers.list_models, expect_handler=_expect)
    app.router.add_get("/models", handlers.list_models, expect_handler=_expect)
    app.router.add_get("/v1/models/{model:.+}", handlers.get_model, expect_handler=_expect)
    app.router.add_get("/models/{model:.+}", handlers.get_model, expect_handler=_expect)
    app.router.add_get("/healthz", handlers.healthz, expect_handler=_expect)
    app.router.add_get("/readyz", handlers.readyz, expect_handler=_expect)
    app.router.add_get("/metrics", metrics_endpoint, expect_handler=_expect)
    return app
