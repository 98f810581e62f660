"""Which upstream of a route serves a request, and when the next one may take over.

The rules (docs/resilience.md explains why):

* Upstreams are tried in the route's order, skipping those whose circuit is open (or
  half-open with its probe under way) and those with no free `max_concurrency` slot. If the
  circuit of every upstream is open, the one that failed least recently is tried anyway:
  a route is never refused without trying.
* The next upstream takes over when one fails before the proxy committed anything to the
  client: it refused the connection, answered 5xx or 429, or sent nothing in time. A 4xx that
  is the client's fault goes back to the client, since every upstream would refuse it too.
* A request the upstream may already have acted on (`call.delivered`: a Letta message that
  was sent) is never sent to another upstream, whatever happened to it.
* When every upstream with a free slot failed or none had one, the request queues for the
  first busy one, up to its `queue_timeout`, then gets a 429 with `Retry-After`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from proxy.errors import (
    ProxyError,
    RateLimited,
    UpstreamFailed,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.upstreams.base import Call, Upstream

T = TypeVar("T")

# The upstream is not working: counted by its circuit breaker.
FAILURES = (UpstreamUnavailable, UpstreamFailed, UpstreamTimeout)
# Another upstream may well succeed where this one did not.
_PASS_ON = (*FAILURES, RateLimited)


class UpstreamBusy(RateLimited):
    code = "upstream_busy"


def is_failure(exc: BaseException) -> bool:
    return isinstance(exc, FAILURES)


def plan(upstreams: tuple[Upstream, ...], now: float) -> list[Upstream]:
    """The upstreams to try, in order, as their circuits stand at `now`."""
    usable = [u for u in upstreams if u.health.usable(now)]
    if usable:
        return usable
    return [min(upstreams, key=lambda u: u.health.last_failure)]


async def serve(
    upstreams: tuple[Upstream, ...],
    call: Call,
    attempt: Callable[[Upstream], Awaitable[T]],
    on_error: Callable[[Upstream, ProxyError], None],
    on_failover: Callable[[Upstream], None],
) -> tuple[T, Upstream]:
    """The first answer an upstream gives, and that upstream, which holds a concurrency
    slot until the caller calls `upstream.health.release()`."""
    busy: list[Upstream] = []
    failed: Upstream | None = None
    last: ProxyError | None = None
    order = plan(upstreams, time.monotonic())
    queued = False
    i = 0
    while True:
        # The next upstream with a free slot; when none is left, the queue of the first busy
        # one, once.
        if i < len(order):
            upstream = order[i]
            i += 1
            health = upstream.health
            if not health.try_acquire():
                busy.append(upstream)
                continue
        elif busy and not queued:
            upstream = busy[0]
            health = upstream.health
            queued = True
            if not await health.acquire(health.queue_timeout):
                retry = max(1, math.ceil(health.queue_timeout))
                raise UpstreamBusy(
                    f"Upstream '{upstream.name}' is busy: {health.limit} requests are running "
                    f"(max_concurrency) and none finished within {health.queue_timeout:g} s "
                    "(queue_timeout). Retry later.",
                    headers={"Retry-After": str(retry)},
                )
        else:
            assert last is not None
            raise last
        if failed is not None:
            _failed_over(failed, on_failover)
        # One try, with its slot taken: the slot is given back unless it succeeds. (Inline,
        # not a helper coroutine: each coroutine layer costs at every suspension.)
        probe = health.begin()
        call.delivered = False
        try:
            result = await attempt(upstream)
        except BaseException as exc:
            health.release()
            if is_failure(exc):
                health.failed(time.monotonic())
            else:
                health.abandoned(probe)
            if not isinstance(exc, ProxyError):
                raise
            on_error(upstream, exc)
            if queued or call.delivered or not isinstance(exc, _PASS_ON):
                raise
            last, failed = exc, upstream
            continue
        health.succeeded()
        return result, upstream


def _failed_over(upstream: Upstream, on_failover: Callable[[Upstream], None]) -> None:
    upstream.health.failovers += 1
    on_failover(upstream)
