"""From a resolved route and a call to an upstream's answer: failover, leases, first event.

Both ingresses (chat completions, Responses) hand their call here and get back a `Served`:
the lease on the upstream that answered and either its whole answer or its open stream with
the first event already read. Nothing is committed to the client before this returns, so a
failure here is still a real HTTP error, and the next upstream still gets its turn.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp

from proxy.errors import ProxyError
from proxy.exchange import Exchange
from proxy.failover import Failover, Lease
from proxy.metrics import Metrics
from proxy.routing import Route
from proxy.upstreams.base import Answer, ByteStream, Call, ChunkStream, Upstream


@dataclass(slots=True)
class Served:
    lease: Lease
    answer: Answer | None = None
    stream: ChunkStream | ByteStream | None = None
    # The stream's first event (read before the commit), or None when it ended at once.
    first: Any = None
    # The upstream relayed the client's Responses request as it is (`native_responses`):
    # the answer's `raw` and the stream's bytes are already Responses.
    native: bool = False


T = TypeVar("T")


async def serve(
    route: Route, call: Call, http: aiohttp.ClientSession, metrics: Metrics
) -> Served:
    exchange = call.exchange
    # The loop of `with_failover`, written out: this is every chat and Responses request's
    # path, and each coroutine layer is paid again at each of its suspensions.
    failover = Failover(route.upstreams, _on_error(metrics), metrics.failover)
    while True:
        lease = failover.next() or await failover.queue()
        upstream = lease.upstream
        # Named from the start of the attempt: a client that leaves during it is logged and
        # counted against the upstream it was waiting for.
        exchange.upstream = upstream.name
        # Per upstream: a route may list one that relays Responses and one that translates.
        native = call.responses is not None and upstream.native_responses
        try:
            if call.stream:
                served = await _open(lease, call, http, native)
            elif native:
                served = Served(lease, answer=await upstream.respond(call, http), native=True)
            else:
                served = Served(lease, answer=await upstream.complete(call, http))
        except BaseException as exc:
            if failover.retry(lease, exc):
                continue
            raise
        break
    lease.succeeded()
    _record(exchange, served)
    return served


def _on_error(metrics: Metrics) -> Callable[[Upstream, ProxyError], None]:
    # The exchange already names the upstream: each attempt sets it as it begins.
    def on_error(upstream: Upstream, exc: ProxyError) -> None:
        # The class's code, not the instance's: an upstream's own codes are unbounded.
        metrics.upstream_error(upstream.name, type(exc).code)

    return on_error


async def with_failover(
    route: Route,
    exchange: Exchange,
    metrics: Metrics,
    attempt: Callable[[Lease], Awaitable[T]],
) -> T:
    """`attempt` on the route's upstreams in turn, by the failover and circuit rules, until
    one succeeds; its lease is the caller's to release (the result holds it or the caller
    releases it at once)."""

    failover = Failover(route.upstreams, _on_error(metrics), metrics.failover)
    while True:
        lease = failover.next() or await failover.queue()
        exchange.upstream = lease.upstream.name
        try:
            result = await attempt(lease)
        except BaseException as exc:
            if failover.retry(lease, exc):
                continue
            raise
        lease.succeeded()
        return result


async def _open(
    lease: Lease, call: Call, http: aiohttp.ClientSession, native: bool = False
) -> Served:
    """The stream and its first event, before anything is committed to the client.

    Waiting for the first event (not only the upstream's headers) lets an upstream that
    fails or stays silent at once still get a real HTTP error, and the next upstream its
    turn. The wait lasts at most the keep-alive interval: then the first event is the
    keep-alive, and the 200 goes out with it.
    """
    upstream = lease.upstream
    stream: ChunkStream | ByteStream = await (
        upstream.open_responses(call, http) if native else upstream.open_stream(call, http)
    )
    try:
        first = await anext(aiter(stream))
    except StopAsyncIteration:
        first = None
    except BaseException:
        await stream.aclose()
        raise
    return Served(lease, stream=stream, first=first, native=native)


def _record(exchange: Exchange, served: Served) -> None:
    result = served.answer or served.stream
    assert result is not None
    exchange.upstream_ms = result.upstream_ms
