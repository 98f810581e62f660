"""Which upstream of a route serves a request, and when the next one may take over.

The rules (docs/resilience.md explains why):

* Upstreams are tried in the route's order, skipping those whose circuit is open (or
  half-open with its probe under way) and those with no free `max_concurrency` slot. If the
  circuit of every upstream is open, the one that failed least recently is tried anyway:
  a route is never refused without trying.
* The next upstream takes over when one fails before the proxy committed anything to the
  client: it refused the connection, answered 5xx or 429, or sent nothing in time. A 4xx that
  is the client's fault goes back to the client, since every upstream would refuse it too.
* A request the upstream may already have acted on (its error says `delivered`: a Letta
  message that was sent) is never sent to another upstream, whatever happened to it.
* When every upstream with a free slot failed or none had one, the request queues for the
  first busy one, up to its `queue_timeout`, then gets a 429 with `Retry-After`. If that
  upstream's circuit opened (or its probe began) during the wait, the slot goes back and
  the request ends as if it had found it so, unless a later busy one now has a free slot.
* A request that must wait for its session's previous turn gives its slot back for the wait
  (`SessionSlot`) and queues for one again, up to `queue_timeout`, once the session is free.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

from proxy.errors import (
    ProxyError,
    RateLimited,
    UpstreamFailed,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.upstreams.base import Upstream

# The upstream is not working: counted by its circuit breaker.
FAILURES = (UpstreamUnavailable, UpstreamFailed, UpstreamTimeout)
# Another upstream may well succeed where this one did not.
_PASS_ON = (*FAILURES, RateLimited)


class UpstreamBusy(RateLimited):
    code = "upstream_busy"


def upstream_busy(upstream: Upstream) -> UpstreamBusy:
    health = upstream.health
    retry = max(1, math.ceil(health.queue_timeout))
    return UpstreamBusy(
        f"Upstream '{upstream.name}' is busy: {health.limit} requests are running "
        f"(max_concurrency) and none finished within {health.queue_timeout:g} s "
        "(queue_timeout). Retry later.",
        headers={"Retry-After": str(retry)},
    )


def is_failure(exc: BaseException) -> bool:
    return isinstance(exc, FAILURES)


def plan(upstreams: tuple[Upstream, ...], now: float) -> list[Upstream]:
    """The upstreams to try, in order, as their circuits stand at `now`."""
    usable = [u for u in upstreams if u.health.usable(now)]
    if usable:
        return usable
    return [min(upstreams, key=lambda u: u.health.last_failure)]


class Lease:
    """One upstream's concurrency slot, held for one attempt; it owns its own release.

    `release()` may be called any number of times and gives the slot back once, so whoever
    ends the attempt (failover on a failure, the writer at the end of a stream) just calls it.
    """

    __slots__ = ("_held", "probe", "upstream")

    def __init__(self, upstream: Upstream, probe: float) -> None:
        self.upstream = upstream
        # Its probe's start when it probes an open circuit (Health.begin), else 0.0.
        self.probe = probe
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self.upstream.health.release()

    def succeeded(self) -> None:
        """The upstream answered: its circuit closes."""
        self.upstream.health.succeeded()

    def failed(self, exc: BaseException) -> None:
        """The attempt ended with `exc`: the circuit is told, the slot given back."""
        self.release()
        health = self.upstream.health
        if is_failure(exc):
            health.failed(time.monotonic())
        else:
            health.abandoned(self.probe)


class SessionSlot:
    """The slot of a request that waits for its session's previous turn
    (proxy/session_locks.py `Slot`): given back for the wait, taken again after it.

    The request's lease still gives one slot back when it ends, so each path keeps the count
    whole: `take_again` holds a slot when it returns, and `restore` (also on the way out of a
    failed or cancelled `take_again`) counts one at once, over the limit if need be, which
    that lease's release ends the moment the error reaches the failover loop.
    """

    __slots__ = ("upstream",)

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    def give_back(self) -> None:
        self.upstream.health.release()

    def restore(self) -> None:
        self.upstream.health.active += 1

    async def take_again(self) -> None:
        health = self.upstream.health
        try:
            # In arrival order behind the requests already queued for a slot.
            taken = await health.acquire(health.queue_timeout)
        except BaseException:
            self.restore()
            raise
        if not taken:
            self.restore()
            raise upstream_busy(self.upstream)


class Failover:
    """The rules above for one request, as a state machine the caller drives:

        failover = Failover(route.upstreams, on_error, on_failover)
        while True:
            lease = failover.next() or await failover.queue()
            try:
                result = await attempt(lease.upstream)
            except BaseException as exc:
                if failover.retry(lease, exc):
                    continue
                raise
            lease.succeeded()
            break

    The lease returned holds a concurrency slot until `lease.release()`. A loop in the
    caller, not a coroutine that runs the attempts: every coroutine layer is paid again at
    each suspension of the request.
    """

    __slots__ = (
        "_busy", "_failed", "_i", "_last", "_on_error", "_on_failover", "_order", "_queued",
    )

    def __init__(
        self,
        upstreams: tuple[Upstream, ...],
        on_error: Callable[[Upstream, ProxyError], None],
        on_failover: Callable[[Upstream], None],
    ) -> None:
        # One upstream is tried whatever its circuit says (open, it is also the least
        # recently failed): no clock and no plan for the most common route.
        self._order: Sequence[Upstream] = (
            upstreams if len(upstreams) == 1 else plan(upstreams, time.monotonic())
        )
        self._on_error = on_error
        self._on_failover = on_failover
        self._i = 0
        self._busy: list[Upstream] = []
        self._queued = False
        self._failed: Upstream | None = None
        self._last: ProxyError | None = None

    def next(self) -> Lease | None:
        """A lease on the next upstream with a free slot; None when only the queue of the
        first busy one is left (call `queue`). Raises the last error when none is left."""
        order = self._order
        while self._i < len(order):
            upstream = order[self._i]
            self._i += 1
            if self._failed is not None and not upstream.health.usable(time.monotonic()):
                # The plan is as old as the request: since then this circuit may have opened,
                # or another request begun its probe (only one may).
                continue
            if upstream.health.try_acquire():
                return self._begin(upstream)
            self._busy.append(upstream)
        if self._busy and not self._queued:
            return None
        assert self._last is not None
        raise self._last

    async def queue(self) -> Lease:
        """A lease on the first busy upstream, once a slot frees up within its
        queue_timeout; once."""
        upstream = self._busy[0]
        health = upstream.health
        self._queued = True
        if not await health.acquire(health.queue_timeout):
            raise upstream_busy(upstream)
        if health.usable(time.monotonic()) or (self._last is None and len(self._order) == 1):
            return self._begin(upstream)
        # Its circuit opened, or another request began the probe, during the wait: a second
        # probe must not follow. With nothing else to try and nothing failed, the request
        # goes anyway, as one that finds every circuit open does.
        health.release()
        for other in self._busy[1:]:
            if other.health.usable(time.monotonic()) and other.health.try_acquire():
                return self._begin(other)
        if self._last is not None:
            raise self._last
        raise UpstreamUnavailable(
            f"Upstream '{upstream.name}' stopped taking requests while this one waited for "
            "a slot (its circuit opened after failures). Retry later."
        )

    def _begin(self, upstream: Upstream) -> Lease:
        failed = self._failed
        if failed is not None:
            failed.health.failovers += 1
            self._on_failover(failed)
        return Lease(upstream, upstream.health.begin())

    def retry(self, lease: Lease, exc: BaseException) -> bool:
        """After an attempt raised `exc`: the lease let go and the circuit told; True when
        the next upstream may take the request, False when `exc` must go to the client."""
        lease.failed(exc)
        if not isinstance(exc, ProxyError):
            return False
        self._on_error(lease.upstream, exc)
        if self._queued or exc.delivered or not isinstance(exc, _PASS_ON):
            return False
        self._last, self._failed = exc, lease.upstream
        return True
