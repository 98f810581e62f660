"""Graceful shutdown: stop being ready, let requests in flight finish, end the rest on time.

On SIGTERM the CLI calls `Drain.begin()` (so `/readyz` answers 503 from that instant), then
the aiohttp runner closes the listening sockets and the idle keep-alive connections, and
calls the app's on_shutdown hook, `Drain.wait()`: it waits until every request in flight has
finished or the drain deadline has passed, then cancels the ones left. A cancelled stream ends
with an error event and `[DONE]` (see handlers._relay_stream), any other request answers 503,
so no client is left with a connection that just drops.
"""

from __future__ import annotations

import asyncio
import logging

from proxy.errors import ServiceUnavailable
from proxy.reload import TableHolder

log = logging.getLogger(__name__)

# After the deadline, how long the cancelled requests get to write their last words.
ENDING_GRACE = 5.0
DEFAULT_DRAIN_TIMEOUT = 30.0


def shutting_down() -> ServiceUnavailable:
    return ServiceUnavailable("The proxy is shutting down; retry the request.")


class Drain:
    __slots__ = ("_ended", "_tracked", "deadline", "holder", "timeout")

    def __init__(self, holder: TableHolder, timeout: float = DEFAULT_DRAIN_TIMEOUT) -> None:
        self.holder = holder
        self.timeout = timeout
        self.deadline: float | None = None
        self._tracked: set[asyncio.Task[object]] = set()
        self._ended: set[asyncio.Task[object]] = set()

    def track(self, task: asyncio.Task[object]) -> None:
        self._tracked.add(task)

    def untrack(self, task: asyncio.Task[object]) -> None:
        self._tracked.discard(task)

    def ended(self, task: asyncio.Task[object]) -> bool:
        """True when the drain deadline, not the client, cancelled this request."""
        return task in self._ended

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
        pending = set(self._tracked)
        if pending:
            log.info(
                "draining: %d requests in flight, waiting up to %.3g s", len(pending),
                max(self.deadline - asyncio.get_running_loop().time(), 0.0),
            )
            remaining = self.deadline - asyncio.get_running_loop().time()
            if remaining > 0:
                _, pending = await asyncio.wait(pending, timeout=remaining)
        pending &= self._tracked
        if not pending:
            return
        log.warning("drain deadline reached: ending %d requests still in flight", len(pending))
        for task in pending:
            self._ended.add(task)
            task.cancel()
        await asyncio.wait(pending, timeout=ENDING_GRACE)
