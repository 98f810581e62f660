"""create_app(): middlewares, routes and the one outgoing ClientSession."""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from proxy import handlers
from proxy.app_keys import HTTP, MAX_BODY, REQUEST_ID, STARTED, TABLES, UPSTREAM_MS
from proxy.errors import (
    InternalError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ProxyError,
)
from proxy.reload import TableHolder

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 16 * 1024 * 1024
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


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


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    given = request.headers.get("X-Request-Id")
    request[REQUEST_ID] = (
        given if given and _REQUEST_ID.fullmatch(given) else "req_" + secrets.token_hex(12)
    )
    request[STARTED] = time.perf_counter()
    try:
        return await handler(request)
    except ProxyError as err:
        return render(err)
    except web.HTTPException as exc:
        return render(_from_http_exception(request, exc))
    except Exception:
        log.exception("request %s failed", request[REQUEST_ID])
        return render(InternalError(request[REQUEST_ID]))


async def _stamp_headers(request: web.BaseRequest, response: web.StreamResponse) -> None:
    headers = response.headers
    request_id = request.get(REQUEST_ID)
    if request_id:
        headers["X-Request-Id"] = request_id
    started = request.get(STARTED)
    if started is not None:
        total = (time.perf_counter() - started) * 1000.0
        upstream = request.get(UPSTREAM_MS, 0.0)
        headers["Server-Timing"] = (
            f"upstream;dur={upstream:.2f}, proxy;dur={max(total - upstream, 0.0):.2f}"
        )


def _http_session_ctx(app: web.Application) -> AsyncIterator[None]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30)
        async with aiohttp.ClientSession(
            connector=connector, trust_env=False, raise_for_status=False
        ) as session:
            app[HTTP] = session
            yield

    return ctx(app)


def create_app(holder: TableHolder, *, max_body: int = DEFAULT_MAX_BODY) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=max_body)
    app[TABLES] = holder
    app[MAX_BODY] = max_body
    app.cleanup_ctx.append(_http_session_ctx)
    app.on_response_prepare.append(_stamp_headers)
    chat = handlers.chat_completions
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/chat/completions", chat)
    app.router.add_get("/v1/models", handlers.list_models)
    app.router.add_get("/models", handlers.list_models)
    app.router.add_get("/v1/models/{model:.+}", handlers.get_model)
    app.router.add_get("/models/{model:.+}", handlers.get_model)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    return app
