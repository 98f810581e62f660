"""What outlives one route table but not the app: circuits, concurrency slots, session locks,
the deadline wheel, the streams being written, and background tasks.

A reload that leaves an upstream alone (its name, URL and credentials) must neither forget
that it keeps failing nor let a new table's requests past the concurrency limit or into a
session that the old table's requests still hold; so this state belongs to the table
holder, not to a table.
It is created with the holder, handed to the app under the `STATE` key, and closed by the
app's cleanup: background tasks (Letta run cancels) get a short grace, then are cancelled,
and the wheel's timer stops. Nothing here is a process-wide singleton, so two apps in one
process (tests, `--workers` children) never share it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

from proxy.session_locks import KeyedLocks
from proxy.sse_writer import Streams
from proxy.upstreams.deadlines import Wheel
from proxy.upstreams.health import HealthRegistry

log = logging.getLogger(__name__)

# How long background tasks may run on once the app is closing.
BACKGROUND_GRACE = 3.0


class AppState:
    __slots__ = ("_background", "health", "session_locks", "streams", "wheel")

    def __init__(self) -> None:
        self.health = HealthRegistry()
        self.session_locks = KeyedLocks()
        self.wheel = Wheel()
        self.streams = Streams()
        self._background: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Runs `coro` beside the requests; it is awaited (or cancelled) when the app closes."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    @property
    def background(self) -> int:
        return len(self._background)

    async def close(self, grace: float = BACKGROUND_GRACE) -> None:
        pending = set(self._background)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=grace)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.wheel.stop()
        self.session_locks.close()
