"""Relaying an upstream stream to a client: what every ingress's stream has in common.

An ingress supplies an `Encoder` (chunks -> its API's events, its error event, its end); this
module commits the 200, writes what the upstream sends as it comes, and ends the stream in
every case: the upstream's terminal error becomes the encoder's error event, the drain ends
it cleanly, a client that stopped reading is cut off after the send timeout, and a client
that left just stops it. However it ends, the upstream request is closed (`aclosing`) and the
upstream's concurrency slot given back. A failure of the proxy's own (an event it cannot
encode) is an internal error, not the upstream's; should even the error end fail, the front
cuts the connection (proxy/front.py): nothing is ever written after a committed stream but
its own events.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import aclosing
from typing import Any, Protocol

from aiohttp import HttpVersion11, web

from proxy.app_keys import EXCHANGE, METRICS, STATE
from proxy.chunks import Comment, Out, TextRun
from proxy.dispatch import Served
from proxy.errors import InternalError, ProxyError, UpstreamFailed
from proxy.exchange import ENDINGS, Exchange
from proxy.failover import is_failure
from proxy.handlers import stamp_headers
from proxy.metrics import has_token
from proxy.shutdown import shutting_down
from proxy.sse import SSE_HEADERS
from proxy.sse_writer import SSEWriter
from proxy.upstreams.base import ByteStream, ChunkStream

log = logging.getLogger(__name__)
_JSON = "application/json"


class Encoder(Protocol):
    def batch(self, batch: list[Out]) -> bytes:
        """The client's bytes for a batch of chunks and keep-alives."""

    def error(self, err: ProxyError) -> bytes:
        """The event that reports a failure after the commit."""

    def end(self) -> bytes:
        """What closes the stream (after `error`, too), `[DONE]` last."""


async def relay(request: web.Request, served: Served, encoder: Encoder) -> web.StreamResponse:
    stream = served.stream
    assert stream is not None
    exchange = request[EXCHANGE]
    app = request.app
    metrics = app[METRICS]
    response = web.StreamResponse(headers=SSE_HEADERS)
    response.headers.extend(stream.headers)
    writer = SSEWriter(request, response, exchange, app[STATE].streams)
    tail: bytes | None = None
    lease = served.lease
    try:
        async with aclosing(stream):
            # The proxy's share of a stream is its time to the commit.
            exchange.overhead = stamp_headers(exchange, response)
            try:
                await writer.commit()
            except ValueError:
                return _unwritable(request, exchange)
            except ConnectionResetError:
                # The client left after the answer began and before its head went out (the
                # transport closing, its connection_lost not yet run): a disconnect like any
                # later one, not a failure of the proxy's. Nothing more can be written: the
                # status is only for the log and metrics, nginx's for a client that left.
                exchange.error = "client_closed"
                gone = web.Response(status=499)
                gone.force_close()
                return gone
            exchange.status = response.status
            metrics.stream_opened()
            try:
                if isinstance(stream, ByteStream):
                    whole = await _pump(writer, stream, served.first, exchange, None, has_token)
                else:
                    whole = await _pump(
                        writer, stream, served.first, exchange, encoder.batch, _has_token
                    )
                if whole:
                    tail = encoder.end()
                else:
                    # The client left: aclosing() closes the upstream request on the way out.
                    exchange.error = "client_closed"
            except ProxyError as exc:
                if is_failure(exc):
                    lease.upstream.health.failed(time.monotonic())
                exchange.error = exc.code
                metrics.upstream_error(exchange.upstream, type(exc).code)
                await writer.write(encoder.error(exc))
                tail = encoder.end()
            except asyncio.CancelledError:
                reason = exchange.take(ENDINGS)
                if reason is None:
                    exchange.error = exchange.error or "client_closed"
                    raise
                if reason == "send":
                    exchange.error = "send_timeout"
                    writer.abandon()
                else:
                    # The drain deadline passed: the client gets a clean end, not a cut.
                    err = shutting_down()
                    exchange.error = err.code
                    await writer.write(encoder.error(err))
                    tail = encoder.end()
            except Exception:
                log.exception("stream %s failed", exchange.request_id)
                exchange.error = InternalError.code
                await writer.write(encoder.error(InternalError(exchange.request_id)))
                tail = encoder.end()
            finally:
                metrics.stream_closed()
    except BaseException:
        # A client that left raises through here: the send timeout stops watching the stream.
        writer.detach()
        raise
    finally:
        lease.release()
    try:
        # Watched until its last write is out: a client that stops reading can block it too.
        await writer.end(tail if tail is not None else b"")
    except asyncio.CancelledError:
        reason = exchange.take(ENDINGS)
        if reason is None:
            raise
        if reason == "send":
            exchange.error = "send_timeout"
        writer.abandon()
    finally:
        writer.detach()
    return response


def _unwritable(request: web.Request, exchange: Exchange) -> web.Response:
    """The answer when aiohttp refused to write the stream's headers (a control character
    in a relayed value that the upstream adapter let through). Nothing was sent, but the
    failed prepare already set chunked framing for the connection (HTTP/1.1): the 502 is
    framed the same way and the connection closed after it, so the client's connection is
    never left out of step."""
    log.exception("stream %s: its response headers could not be written", exchange.request_id)
    err = UpstreamFailed(
        f"Upstream '{exchange.upstream}' sent a response header that cannot be relayed."
    )
    exchange.error = err.code
    response = web.Response(body=err.to_json(), status=err.status, content_type=_JSON)
    if request.version >= HttpVersion11:
        response.enable_chunked_encoding()
    response.force_close()
    return response


async def _pump(
    writer: SSEWriter,
    stream: ByteStream | ChunkStream,
    first: bytes | list[Out] | None,
    exchange: Exchange,
    encode: Callable[[Any], bytes] | None,
    token: Callable[[Any], bool],
) -> bool:
    """Writes the upstream's answer as it comes: an openai upstream's chat events as bytes
    (`encode` None, the byte fast path), or chunk batches through the ingress's encoder."""
    if first is not None:
        if token(first):
            exchange.ttft = time.perf_counter() - exchange.started
        data: bytes = first if encode is None else encode(first)  # type: ignore[assignment]
        if not await writer.write(data):
            return False
    return await writer.pump(stream, encode, token)


def _has_token(batch: list[Out]) -> bool:
    """Whether a batch carries generated output: text, reasoning, or a tool call (the role
    chunk that opens every stream does not count, so the time to it is not "first token").

    A choice without a delta, or of the wrong shape, is no token: whether such a chunk is
    the upstream's failure is the encoder's to say (as the upstream's, never a crash)."""
    for out in batch:
        if isinstance(out, Comment):
            continue
        if isinstance(out, TextRun):
            if any(out.texts):
                return True
            continue
        try:
            for choice in out["choices"]:
                delta = choice.get("delta")
                if delta and (
                    delta.get("content") or delta.get("reasoning_content")
                    or delta.get("tool_calls")
                ):
                    return True
        except AttributeError:
            continue
    return False
