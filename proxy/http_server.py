"""aiohttp's HTTP server, with the proxy's answer to what never reaches a handler.

Four things happen below the application, in aiohttp's connection protocol, that the proxy
must do its own way:
- a request the HTTP parser refuses, or whose target no route can match, or in an HTTP version
  other than 1.0 and 1.1, gets an OpenAI-shaped error, one log line without header values, and
  a count (proxy/bad_requests.py);
- a request that asks for a protocol upgrade is served as if it had not, and its connection
  closes after it (aiohttp's parser does not parse what was pipelined behind it);
- a client too slow to send its request, or that does not read its answer, is cut off
  (proxy/connection_limits.py): one sweep over the open connections, a few times per shortest
  limit, instead of a timer per request;
- an answer given while the body still arrives, or during the drain, closes its connection
  (the first after a bounded discard, where aiohttp would discard whatever comes for 10 s).

aiohttp offers no public way to choose the protocol class, so `serve_connections` wraps this
one application's `_make_handler` (what every runner calls to build its Server): the Server
is aiohttp's with `__call__` building a ProxyRequestHandler, aiohttp's RequestHandler with a
few methods overridden. Per request that adds three calls, a set lookup and a few attribute
reads (`_handle_request`, `finish_response` and its checks of the body's end and the drain,
about 0.2 µs); the rest runs per connection, per sweep or on errors only. The overrides read
some of aiohttp's private state (the connection's request count, current request and message
queue, a body's waiter, the request's parsed message, the drain waiter of a blocked write, the
lingering time): tests/test_connection_limits.py, tests/test_bad_requests.py and
tests/test_expect_and_methods.py fail if an aiohttp upgrade moves it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from aiohttp import HttpVersion10, HttpVersion11, web
from aiohttp.http_exceptions import BadHttpMethod, BadStatusLine, HttpProcessingError
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import ERROR, RequestHandler, RequestPayloadError, _ErrInfo
from aiohttp.web_request import BaseRequest

from proxy import bad_requests
from proxy.app_keys import EXCHANGE, MAX_BODY, STATE, TABLES
from proxy.connection_limits import SEND_SLACK, ConnectionLimits
from proxy.errors import InternalError, ProxyError, RequestTimeout
from proxy.metrics import Metrics
from proxy.reload import TableHolder
from proxy.sse_writer import Streams
from proxy.upstreams.bulk_read import read_any

log = logging.getLogger("agentproxy.http")

# What the proxy's handlers answer with (errors included: proxy.app.render).
_HANDLER_ANSWERS = frozenset({web.Response, web.StreamResponse})
_SERVED_VERSIONS = (HttpVersion11, HttpVersion10)
# What the proxy reads and discards of a body still arriving after its answer, at most: the
# default --max-body, or --max-body if larger, so that an upload of any size the proxy accepts,
# or one over the limit by as much, finishes and its client reads the answer.
DISCARD_BUDGET = 16 * 2**20


class _Policy:
    """What every connection of one server shares."""

    __slots__ = ("discard_budget", "holder", "limits", "metrics", "new_id", "streams")

    def __init__(
        self,
        limits: ConnectionLimits,
        metrics: Metrics,
        new_id: Callable[[], str],
        streams: Streams | None,
        max_body: int,
        holder: TableHolder | None = None,
    ) -> None:
        # Whether the app drains (its answers then close their connections).
        self.holder = holder
        self.limits = limits
        self.metrics = metrics
        self.new_id = new_id
        # Holds the app's --send-timeout.
        self.streams = streams
        self.discard_budget = max(max_body, DISCARD_BUDGET)


def serve_connections(
    app: web.Application,
    limits: ConnectionLimits,
    metrics: Metrics,
    new_id: Callable[[], str],
) -> None:
    """Makes every runner of `app` serve it with ProxyServer. `new_id` mints request ids."""
    state = app.get(STATE)
    policy = _Policy(limits, metrics, new_id, state.streams if state is not None else None,
                     app.get(MAX_BODY, 0), app.get(TABLES))
    make_plain = app._make_handler

    def make_handler(**kwargs: Any) -> web.Server:
        return ProxyServer(make_plain(**kwargs), policy)

    app._make_handler = make_handler  # type: ignore[method-assign]


class ProxyServer(web.Server):
    """aiohttp's Server, building ProxyRequestHandlers and sweeping them."""

    def __init__(self, plain: web.Server, policy: _Policy) -> None:
        # Everything as the application built it, and the keep-alive limit for aiohttp's own
        # timer (it also bounds the wait for the first request).
        kwargs = {**plain._kwargs, "keepalive_timeout": policy.limits.keepalive_timeout}
        super().__init__(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=plain._loop,
            **kwargs,
        )
        self.policy = policy
        self._sweeping: asyncio.TimerHandle | None = None

    def __call__(self) -> RequestHandler:
        return ProxyRequestHandler(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if self._sweeping is None:
            self._sweeping = self._loop.call_later(
                self.policy.limits.sweep_interval, self._sweep
            )

    def _sweep(self) -> None:
        self._sweeping = None
        now = self._loop.time()
        try:
            for handler in list(self._connections):
                if isinstance(handler, ProxyRequestHandler):
                    handler.sweep(now)
        finally:
            # Only while there is something to watch: an idle server does no work.
            if self._connections:
                self._sweeping = self._loop.call_later(
                    self.policy.limits.sweep_interval, self._sweep
                )

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (aiohttp's)
        if self._sweeping is not None:
            self._sweeping.cancel()
            self._sweeping = None
        await super().shutdown(timeout)


class ProxyRequestHandler(RequestHandler):
    """One connection: aiohttp's protocol with the proxy's refusals and limits."""

    __slots__ = (
        "_accepted", "_blocked_on", "_blocked_since", "_body_of", "_body_seen", "_body_since",
        "_policy",
    )

    def __init__(
        self, manager: ProxyServer, *, loop: asyncio.AbstractEventLoop, **kwargs: Any
    ) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._policy = manager.policy
        self._accepted = 0.0
        # The body a handler waits for, how much of it had come at the last sweep, and since
        # when no more has.
        self._body_of: StreamReader | None = None
        self._body_seen = 0
        self._body_since = 0.0
        # The drain a write waits on (the client does not read), and since which sweep.
        self._blocked_on: asyncio.Future[None] | None = None
        self._blocked_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._accepted = self._loop.time()
        super().connection_made(transport)

    # -- the sweep ------------------------------------------------------------------------

    def sweep(self, now: float) -> None:
        """Ends what overran its limit: a first request head that has not come, a body that
        stopped coming, a body the parser gave up on, a write the client does not read."""
        if self.transport is None or self._force_close:
            return
        if self._write_overdue(now):
            return
        policy = self._policy
        if self._request_count == 0:  # no request head parsed on this connection yet
            if policy.limits.header_overdue(self._accepted, now):
                policy.metrics.timed_out("header")
                log.debug("closed a connection that sent no request head in time")
                self.force_close()
            return
        request = self._current_request
        payload = request.content if request is not None else None
        if request is None or payload is None or payload.is_eof():
            self._body_of = None
            return
        messages = self._messages
        if messages and isinstance(messages[-1][0], _ErrInfo):
            # The parser failed inside this request's body (bad chunked framing): it queues
            # its refusal for after the handler, which would wait for the body forever.
            self._refuse_body(request, payload, messages[-1][0].exc)
            return
        if payload._waiter is None:  # the handler is not reading the body
            self._body_of = None
            return
        seen = payload.total_raw_bytes
        if payload is not self._body_of or seen != self._body_seen:
            # The handler began to wait, or some more came: a stall would start now.
            self._body_of, self._body_seen, self._body_since = payload, seen, now
            return
        if policy.limits.body_stalled(self._body_since, now):
            policy.metrics.timed_out("body")
            self._body_of = None
            timeout = policy.limits.body_timeout
            self._end_body(payload, RequestTimeout(
                f"The request body stopped arriving: no byte for {timeout:g} s "
                "(--body-timeout).",
                headers={"Connection": "close"},
            ))

    def _write_overdue(self, now: float) -> bool:
        """Drops the connection if one write has waited on a full socket buffer for longer
        than --send-timeout, whatever wrote it: a sync answer's body, which aiohttp writes
        after the handler returned, or a stream's last write. Watching aiohttp's drain waiter
        costs nothing per request. A stream's writes are also watched one by one
        (proxy/sse_writer.py), which ends the stream with its error logged; SEND_SLACK leaves
        that sweep its turn first."""
        waiter = self._drain_waiter
        if waiter is None:
            self._blocked_on = None
            return False
        if waiter is not self._blocked_on:
            self._blocked_on, self._blocked_since = waiter, now
            return False
        streams = self._policy.streams
        if streams is None or now - self._blocked_since < streams.send_timeout + SEND_SLACK:
            return False
        log.debug("dropped a connection whose client stopped reading (--send-timeout)")
        self._blocked_on = None
        transport = self.transport
        if transport is not None:
            # Not close(): it would wait for the unread buffer to be sent.
            transport.abort()
        return True

    def _refuse_body(self, request: BaseRequest, payload: StreamReader, exc: BaseException) -> None:
        refusal = bad_requests.parser_refusal(exc)
        exchange = request.get(EXCHANGE)
        request_id = exchange.request_id if exchange is not None else None
        bad_requests.report(self._policy.metrics, refusal, request_id)
        self._end_body(payload, refusal.error)

    def _end_body(self, payload: StreamReader, err: Exception) -> None:
        """The handler's read raises `err` (its answer); the connection closes after it."""
        payload.set_exception(err)
        # At its end: aiohttp does not then wait to discard the rest of a body that will not
        # come.
        payload.feed_eof()
        self.close()

    # -- refusals ---------------------------------------------------------------------------

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to a request its parser refused, or to a failure outside any of
        the proxy's handlers (which answer their own)."""
        if request.writer.output_size > 0:
            raise ConnectionError(
                "Response is sent already, cannot send another response with the error message"
            )
        request_id = self._policy.new_id()
        if isinstance(exc, HttpProcessingError):
            refusal = bad_requests.parser_refusal(exc)
            # As aiohttp does: TLS and other noise on a fresh connection, from scanners.
            quiet = isinstance(exc, BadHttpMethod) and self._request_count == 1
            bad_requests.report(self._policy.metrics, refusal, request_id, quiet=quiet)
            return bad_requests.respond(refusal.error, request_id)
        log.error("request %s failed outside any handler", request_id, exc_info=exc)
        err = InternalError(request_id)
        err.status = status
        return bad_requests.respond(err, request_id)

    def _handle_request(
        self,
        request: BaseRequest,
        start_time: float | None,
        request_handler: Callable[[BaseRequest], Awaitable[web.StreamResponse]],
    ) -> Coroutine[Any, Any, tuple[web.StreamResponse, bool]]:
        # Not a coroutine of its own, like finish_response. The C parser gives 1.0 and 1.1 as
        # these very objects, so `in` settles a served request by identity.
        message = request._message
        if message.upgrade or message.version not in _SERVED_VERSIONS:
            request, request_handler = self._unserved(request, request_handler)
        return RequestHandler._handle_request(self, request, start_time, request_handler)

    def _unserved(
        self,
        request: BaseRequest,
        request_handler: Callable[[BaseRequest], Awaitable[web.StreamResponse]],
    ) -> tuple[BaseRequest, Callable[[BaseRequest], Awaitable[web.StreamResponse]]]:
        """A request in an HTTP version the proxy does not serve (llhttp lets 0.9 and 2.0
        through), answered as the parser's own refusals are; or one that asks for a protocol
        upgrade, which the proxy never does (RFC 9110 §7.8 lets it ignore the header): it is
        served, then the connection closes, saying so, since aiohttp's parser has dropped, or
        kept for the new protocol, whatever was pipelined behind it."""
        message = request._message
        if message.version in _SERVED_VERSIONS:
            message = message._replace(should_close=True)
        else:
            exc = BadStatusLine(error="Unsupported HTTP version")
            message = ERROR
            request_handler = self._make_error_handler(
                _ErrInfo(status=400, exc=exc, message=exc.message)
            )
        assert self._request_factory is not None
        request = self._request_factory(
            message, request.content, self, request.writer, request.task
        )
        return request, request_handler

    def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> Coroutine[Any, Any, tuple[web.StreamResponse, bool]]:
        # Not a coroutine of its own: no extra layer on every request's way out; and the
        # handlers' own classes are let through by a set lookup (isinstance against aiohttp's
        # ABC-based classes costs about 150 ns).
        if type(resp) not in _HANDLER_ANSWERS and isinstance(resp, web.HTTPException):
            # Raised outside the proxy's handlers, which answer in JSON: the router found no
            # route (every path has one, so the target is not a path, or holds a newline).
            resp = self._refuse_target(request, resp)
        holder = self._policy.holder
        if holder is not None and holder.draining:
            # The drain closes connections: an answer given meanwhile says so (a stream's
            # head, already sent, is followed by the close), or a reused one drops a request.
            resp.force_close()
        if not request.content.is_eof():
            return self._answer_then_discard(request, resp, start_time)
        return RequestHandler.finish_response(self, request, resp, start_time)

    async def _answer_then_discard(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        """An answer given while the body still arrives (a 401, 404 or 413 before it was
        read), then the connection's end. Closing at once would reset the connection under a
        client still writing (the SDK's upload past --max-body would see no answer); aiohttp
        would discard whatever comes for 10 s (an endless body: gigabytes, a core busy). The
        rest is discarded up to a budget in bytes within those 10 s, then the close."""
        resp.force_close()
        # A client waiting for a 100 Continue never sent (its key was refused) sends no body;
        # the writer's buffer_size is not reset after a 100 (proxy/app.py), its output_size is.
        waiting = request.writer.buffer_size == 0 and request.headers.get(
            "Expect", "").lower() == "100-continue"
        answered = await RequestHandler.finish_response(self, request, resp, start_time)
        payload = request.content
        budget = payload.total_raw_bytes + self._policy.discard_budget
        holder = self._policy.holder
        if (waiting and payload.total_raw_bytes == 0) or (holder is not None and holder.draining):
            # Nothing will come, or the process is stopping: no discarding to hold it.
            budget = -1
        try:
            async with asyncio.timeout(self._lingering_time):
                while payload.total_raw_bytes <= budget and await read_any(payload):
                    pass
        except RequestPayloadError as exc:
            # A body aiohttp could not decode: the handler answered its 400; counted here, as
            # in log_exception.
            bad_requests.report(self._policy.metrics, bad_requests.body_refusal(exc), None)
        except Exception:
            # Too slow, broken framing, the client gone: whatever ends the read ends the
            # discarding, and the connection closes as it would have.
            pass
        finally:
            # Nothing left for aiohttp to discard, and what still comes is not parsed.
            self.close()
            payload.feed_eof()
        return answered

    def _refuse_target(self, request: BaseRequest, exc: web.HTTPException) -> web.Response:
        request_id = self._policy.new_id()
        if exc.status not in (404, 405):  # not the router's: keep its status
            err = ProxyError(exc.reason)
            err.status, err.code = exc.status, None
            err.type = "invalid_request_error" if exc.status < 500 else "server_error"
            return bad_requests.respond(err, request_id)
        refusal = bad_requests.target_refusal(request.method, request.path)
        bad_requests.report(self._policy.metrics, refusal, request_id)
        return bad_requests.respond(refusal.error, request_id)

    def log_exception(self, *args: Any, **kw: Any) -> None:
        exc = kw.get("exc_info")
        if isinstance(exc, RequestPayloadError):
            # A body aiohttp could not decode: the handler has answered (400); aiohttp met the
            # fault again while discarding the rest, and would log it with a traceback.
            bad_requests.report(self._policy.metrics, bad_requests.body_refusal(exc), None)
            return
        super().log_exception(*args, **kw)
