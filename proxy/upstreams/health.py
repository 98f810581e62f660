"""What the proxy knows about each upstream beyond one request: its circuit and its load.

The registry lives with the app (proxy/state.py), not with a route table: a reload that
leaves an upstream alone (its `health_key`) must neither forget that it keeps failing nor let a
new table's requests past the concurrency limit that the old table's requests still fill.
Settings (thresholds, limits) are taken from the newest table that names the upstream, when
that table is committed (`RouteTable.commit`): a table rejected half-way through its build
must leave the served one's settings alone.

Circuit: after `circuit.failures` consecutive failures the upstream is "open" for
`circuit.cooldown` seconds: routes that list another upstream skip it. Then it is
"half-open": one real request is let through as a probe while the others still go elsewhere;
its success closes the circuit, its failure opens it for another cool-down.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Iterable
from typing import Any, Literal

from proxy.config import UpstreamSpec

State = Literal["closed", "open", "half-open"]


class Health:
    __slots__ = (
        "_waiters",
        "active",
        "cooldown",
        "failovers",
        "failures",
        "last_failure",
        "limit",
        "name",
        "opened_at",
        "probe_began",
        "probing",
        "queue_timeout",
        "threshold",
    )

    def __init__(self, spec: UpstreamSpec) -> None:
        self.name = spec.name
        self.failures = 0
        self.opened_at = 0.0
        self.last_failure = -math.inf
        self.probing = False
        self.probe_began = 0.0
        self.failovers = 0
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.configure(spec)

    def configure(self, spec: UpstreamSpec) -> None:
        self.threshold = spec.circuit.failures
        self.cooldown = spec.circuit.cooldown
        self.limit = spec.max_concurrency
        self.queue_timeout = spec.queue_timeout
        # A raised limit lets waiting requests in at once.
        self._wake()

    # -- circuit ---------------------------------------------------------------------------

    def state(self, now: float) -> State:
        if self.failures < self.threshold:
            return "closed"
        if now < self.opened_at + self.cooldown:
            return "open"
        return "half-open"

    def usable(self, now: float) -> bool:
        """May a request be sent here without every other upstream having been ruled out?"""
        if self.failures < self.threshold:
            return True
        # A probe that hangs (no `first_event` limit, or one longer than the cool-down) would
        # keep the circuit from closing for as long: one more is let through each cool-down.
        return now >= self.opened_at + self.cooldown and (
            not self.probing or now >= self.probe_began + self.cooldown)

    def begin(self) -> float:
        """A request starts here: when it is the probe of an open or half-open circuit, the
        probe's start (which names it to `abandoned`); else 0.0."""
        if self.failures < self.threshold:
            return 0.0
        self.probing = True
        began = self.probe_began = time.monotonic()
        return began

    def succeeded(self) -> None:
        self.failures = 0
        self.probing = False

    def failed(self, now: float) -> None:
        self.failures += 1
        self.last_failure = now
        self.probing = False
        if self.failures >= self.threshold:
            self.opened_at = now

    def abandoned(self, probe: float) -> None:
        """The request ended without telling whether the upstream works (the client left).
        `probe` is its `begin()`: a probe given up on after a newer one began (a hung one,
        past its cool-down) must not end the newer one's turn."""
        if probe and probe == self.probe_began:
            self.probing = False

    # -- concurrency -----------------------------------------------------------------------

    def try_acquire(self) -> bool:
        if self.limit is not None and (self.active >= self.limit or self._waiters):
            return False
        self.active += 1
        return True

    async def acquire(self, wait: float) -> bool:
        """Waits up to `wait` seconds for a slot, in arrival order; False if none came."""
        if self.try_acquire():
            return True
        if wait <= 0:
            return False
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(wait):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed over just as the wait ended: pass it on.
                self.release()
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                return False
            raise
        return True

    def release(self) -> None:
        self.active -= 1
        self._wake()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def _wake(self) -> None:
        while self._waiters and (self.limit is None or self.active < self.limit):
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.active += 1
                waiter.set_result(None)

    # -- reporting -------------------------------------------------------------------------

    def snapshot(self, now: float) -> dict[str, Any]:
        state = self.state(now)
        report: dict[str, Any] = {"state": state, "consecutive_failures": self.failures}
        if state == "open":
            report["retry_in_s"] = round(self.opened_at + self.cooldown - now, 1)
        report["active"] = self.active
        if self.limit is not None:
            report["max_concurrency"] = self.limit
            report["queued"] = len(self._waiters)
        report["failovers"] = self.failovers
        return report


# What makes an upstream the same server to its circuit: its name, kind, URL and what it is
# sent on every request (credentials, headers). A 401 that opened the circuit says nothing
# about the key that replaced the one it refused.
Key = tuple[str, str, str, str, tuple[tuple[str, str], ...]]


def health_key(spec: UpstreamSpec) -> Key:
    headers = tuple(sorted((name.lower(), value) for name, value in spec.headers.items()))
    return (spec.name, spec.kind, spec.url or "", spec.api_key or "", headers)


class HealthRegistry:
    def __init__(self) -> None:
        self._by_upstream: dict[Key, Health] = {}

    def get(self, spec: UpstreamSpec) -> Health:
        """The state of the upstream `spec` describes, kept while its `health_key` stays. An
        existing one keeps its settings until `configure` (the table's commit)."""
        key = health_key(spec)
        health = self._by_upstream.get(key)
        if health is None:
            health = self._by_upstream[key] = Health(spec)
        return health

    def retain(self, used: Iterable[Health]) -> None:
        """Forgets every upstream but those of `used` (the served table's) and those still
        holding or awaiting a slot: a request of an older table counts against the limit of
        the upstream it runs on, should a later table name that upstream again."""
        keep = {id(health) for health in used}
        self._by_upstream = {
            key: health for key, health in self._by_upstream.items()
            if id(health) in keep or health.active > 0 or health.queued > 0
        }

    def __len__(self) -> int:
        return len(self._by_upstream)
