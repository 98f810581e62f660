"""The front: what every request goes through first and last, whatever its route.

Request id, drain tracking, admission (connection limit, header size, Content-Encoding),
errors rendered as OpenAI JSON, the stamped headers, and the metrics and access-log line of
the request.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from itertools import chain, count
from random import getrandbits

from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.access_log import access_log, log_exchange
from proxy.app_keys import EXCHANGE, MAX_BODY
from proxy.bad_requests import check_content_encoding
from proxy.errors import (
    HeadersTooLarge,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    ProxyError,
    ServiceUnavailable,
)
from proxy.exchange import DRAIN as DRAINED
from proxy.exchange import Exchange
from proxy.handlers import body_too_large, stamp_headers
from proxy.metrics import Metrics
from proxy.shutdown import Drain, shutting_down

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024
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
        return body_too_large(request.app[MAX_BODY])
    if exc.status == 404:
        # The path as sent: decoded, `/v1/chat%2Fcompletions` would read as a path that exists.
        return NotFound(f"Invalid URL ({request.method} {request.rel_url.raw_path}).")
    err = ProxyError(exc.reason)
    err.status = exc.status
    err.type = "invalid_request_error" if exc.status < 500 else "server_error"
    err.code = None
    return err


class Front:
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
                    if exchange.status:
                        # The handler raised after its stream committed (the relay sets the
                        # status then): the answer rendered above must not go out.
                        response = _cut(request, exchange)
                    else:
                        # A stream stamped its own headers before it committed them.
                        stamp_headers(exchange, response)
                _finish(request, front.metrics, exchange, response)
            return response

        return guarded


def _cut(request: web.Request, exchange: Exchange) -> web.StreamResponse:
    """The end of a stream whose handler raised after its 200 went out. Any response now
    would be written inside the stream's chunked body (a raw HTTP head the client cannot
    parse, and a connection left out of step), so the connection is cut: the client sees a
    stream that stopped short. The relay ends every failure it can foresee with the API's
    error event; this is for what it could not, a fault of the proxy's own."""
    log.error("request %s failed after its stream was committed: connection closed",
              exchange.request_id)
    exchange.error = InternalError.code
    transport = request.transport
    if transport is not None:
        transport.abort()
    # What aiohttp finishes the request with: nothing of it can be written to a closed
    # transport, so only its status (the committed one) reaches the metrics and the log.
    response = web.Response(status=exchange.status)
    response.force_close()
    return response


def new_request_id() -> str:
    # An id to find a request by in logs, not a secret: a random prefix per process (so
    # workers and restarts do not collide) and a counter. `secrets` would cost every request
    # a getrandom() system call, and even a random 96-bit number costs more to format.
    return f"req_{_ID_PREFIX}{next(_ID_COUNTER):08x}"


_ID_PREFIX = f"{getrandbits(64):016x}"
_ID_COUNTER = count(1)


def _finish(
    request: web.Request, metrics: Metrics, ex: Exchange, response: web.StreamResponse | None
) -> None:
    """Metrics and the log line of a request that has ended, however it ended."""
    duration = time.perf_counter() - ex.started
    # Only a stream sets the status before this, when it commits (proxy/ingress/streaming.py).
    streamed = ex.status != 0
    if response is not None:
        ex.status = response.status
    elif not streamed:
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
        if streamed:
            # The connection's own count, whatever ended the stream: a client that left
            # leaves no response, one cut short a response whose body_length stays 0.
            sent = request.writer.output_size - ex.body_offset
        elif response is not None and request.method != "HEAD":
            # HEAD (aiohttp answers it on GET routes) sends no body. A JSON answer (not yet
            # written: aiohttp writes it after this) is its bytes; its Content-Length would
            # cost a dozen property calls to say the same.
            body = response.body if type(response) is web.Response else None
            if type(body) is bytes:
                sent = len(body)
            elif response.prepared:
                sent = response.body_length
            else:
                sent = response.content_length or 0
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
    # One pass in C over every name and value: a loop of Python here cost a sync request
    # about 1 % of its instructions.
    size = sum(map(len, chain.from_iterable(request.raw_headers)))
    if size > MAX_HEADER_BYTES:
        raise HeadersTooLarge(
            f"Request headers too large: {size} bytes, the limit is {MAX_HEADER_BYTES}."
        )
    check_content_encoding(request)
    return None


