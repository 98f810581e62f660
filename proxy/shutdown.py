"""Graceful shutdown: stop being ready, let requests in flight finish, end the rest on time.

On SIGTERM the CLI calls `Drain.begin()` (so `/readyz` answers 503 from that instant), then
the aiohttp runner closes the listening sockets and the idle keep-alive connections, and
calls the app's on_shutdown hook, `Drain.wait()`: it waits until every request in flight has
finished or the drain deadline has passed, then cancels the ones left. A cancelled stream ends
with an error event and `[DONE]` (see proxy/ingress/streaming.py), any other request answers 503,
so no client is left with a connection that just drops.
"""

from __future__ import annotations

import asyncio
import logging

from proxy.errors import ServiceUnavailable
from proxy.exchange import Exchange
from proxy.reload import TableHolder

log = logging.getLogger(__name__)

# After the deadline, how long the cancelled requests get to write their last words.
ENDING_GRACE = 5.0
DEFAULT_DRAIN_TIMEOUT = 30.0


def shutting_down() -> ServiceUnavailable:
    return ServiceUnavailable("The proxy is shutting down; retry the request.")


class Drain:
    """The requests in flight, and ending them at the drain deadline through the one
    interruption protocol of proxy/exchange.py (reason `drain`)."""

    __slots__ = ("_tracked", "deadline", "holder", "timeout")

    def __init__(self, holder: TableHolder, timeout: float = DEFAULT_DRAIN_TIMEOUT) -> None:
        self.holder = holder
        self.timeout = timeout
        self.deadline: float | None = None
        self._tracked: set[Exchange] = set()

    def track(self, exchange: Exchange) -> None:
        self._tracked.add(exchange)

    def untrack(self, exchange: Exchange) -> None:
        self._tracked.discard(exchange)

    @property
    def in_flight(self) -> int:
        return len(self._tracked)

    def begin(self) -> None:
        if self.deadline is None:
            self.holder.draining = True
            self.deadline = asyncio.get_running_loop().time() + self.timeout

    async def wait(self) -> None:
        self.begin()
        assert self.deadline is not None
        tasks = {ex.task: ex for ex in self._tracked if ex.task is not None}
        pending = set(tasks)
        if pending:
            log.info(
                "draining: %d requests in flight, waiting up to %.3g s", len(pending),
                max(self.deadline - asyncio.get_running_loop().time(), 0.0),
            )
            remaining = self.deadline - asyncio.get_running_loop().time()
            if remaining > 0:
                _, pending = await asyncio.wait(pending, timeout=remaining)
        left = [tasks[t] for t in pending if tasks[t] in self._tracked]
        if not left:
            return
        log.warning("drain deadline reached: ending %d requests still in flight", len(left))
        for exchange in left:
            exchange.interrupt("drain")
        await asyncio.wait([ex.task for ex in left if ex.task], timeout=ENDING_GRACE)
