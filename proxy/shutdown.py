"""Graceful shutdown: stop being ready, let requests in flight finish, end the rest on time.

On SIGTERM the CLI calls `Drain.begin()` (so `/readyz` answers 503 from that instant), then
the aiohttp runner closes the listening sockets and the idle keep-alive connections, and
calls the app's on_shutdown hook, `Drain.wait()`: it waits until every request in flight has
finished or the drain deadline has passed, then cancels the ones left. A cancelled stream ends
with an error event and `[DONE]` (see proxy/ingress/streaming.py), any other request answers 503,
so no client is left with a connection that just drops. In `agentproxy serve`, a second
SIGTERM or SIGINT during the wait moves the deadline to that instant.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from proxy.errors import ServiceUnavailable
from proxy.exchange import Exchange
from proxy.process_setup import owns_signals
from proxy.reload import TableHolder

log = logging.getLogger(__name__)

# After the deadline, how long the cancelled requests get to write their last words.
ENDING_GRACE = 5.0
DEFAULT_DRAIN_TIMEOUT = 30.0
_STOPS = (signal.SIGTERM, signal.SIGINT)


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
        loop = asyncio.get_running_loop()
        tasks = {ex.task: ex for ex in self._tracked if ex.task is not None}
        pending = set(tasks)
        if pending:
            log.info(
                "draining: %d requests in flight, waiting up to %.3g s", len(pending),
                max(self.deadline - loop.time(), 0.0),
            )
            remaining = self.deadline - loop.time()
            if remaining > 0:
                await self._until_done_or_cut(pending, remaining)
                pending = {t for t in pending if not t.done()}
        left = [tasks[t] for t in pending if tasks[t] in self._tracked]
        if not left:
            return
        log.warning("drain deadline reached: ending %d requests still in flight", len(left))
        for exchange in left:
            exchange.interrupt("drain")
        await asyncio.wait([ex.task for ex in left if ex.task], timeout=ENDING_GRACE)

    async def _until_done_or_cut(self, pending: set[asyncio.Task[Any]], within: float) -> None:
        """Waits for `pending` up to `within` s; in `agentproxy serve`, a second SIGTERM or
        SIGINT cuts the wait short (an operator who does not want to wait for the deadline)."""
        loop = asyncio.get_running_loop()
        all_done = asyncio.ensure_future(asyncio.wait(pending, timeout=within))
        if not owns_signals():
            await all_done
            return
        cut: asyncio.Future[None] = loop.create_future()

        def again() -> None:
            if not cut.done():
                log.warning("second signal: ending the drain now")
                cut.set_result(None)

        for signum in _STOPS:
            loop.add_signal_handler(signum, again)
        try:
            first: set[asyncio.Future[Any]] = {all_done, cut}
            await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
        finally:
            all_done.cancel()
