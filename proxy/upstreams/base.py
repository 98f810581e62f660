"""What every upstream kind implements, and what a request hands it."""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from proxy.config import ModelSpec, UpstreamSpec
from proxy.upstreams.health import HEALTH
from proxy.upstreams.watch import Watch


@dataclass(slots=True)
class Call:
    """One chat-completions request, as the handler hands it to an upstream adapter."""

    body: dict[str, Any]
    client_model: str
    upstream_model: str | None
    stream: bool
    include_usage: bool
    headers: Mapping[str, str]
    request_id: str
    key_id: str
    route: ModelSpec | None = None
    session_hint: str | None = None
    # The task serving the request, for the adapter's Watch (None: the current task).
    task: asyncio.Task[Any] | None = None
    # Filled in by the adapter: when the upstream answered, for Server-Timing and metrics.
    upstream_ms: float = 0.0
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    # Set by an adapter once the upstream may have acted on the request (a Letta message
    # sent): from then on a failure is reported, never retried on the next upstream.
    delivered: bool = False

    def mark_answered(self, started: float) -> None:
        self.upstream_ms = (time.perf_counter() - started) * 1000.0


class EventStream:
    """The SSE events of one upstream answer, and what must be let go when it ends.

    Iterating yields the events themselves (no wrapper per event); `aclose()` closes the
    generator and then runs `on_close` exactly once, even if iteration never started, which
    a bare async generator would not do. A `watch` that paces the events is disarmed first,
    so its timer can never cancel the request's task after the stream has ended.
    """

    __slots__ = ("_events", "_on_close", "_watch")

    def __init__(
        self,
        events: AsyncGenerator[bytes, None],
        on_close: Callable[[], Awaitable[None]] | None = None,
        watch: Watch | None = None,
    ) -> None:
        self._events = events
        self._on_close = on_close
        self._watch = watch

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._events

    async def aclose(self) -> None:
        if self._watch is not None:
            self._watch.disarm()
        try:
            await self._events.aclose()
        finally:
            on_close, self._on_close = self._on_close, None
            if on_close is not None:
                await on_close()


class Upstream(ABC):
    """One configured upstream. Adapters raise only ProxyError subclasses.

    `open_stream` returns only once the upstream accepted the request, so the handler commits
    the 200 after that; errors raised while iterating become the stream's terminal error event.
    The iterator yields whole SSE events (bytes) and never the final `data: [DONE]`, which the
    handler writes; it raises instead of ending quietly when the upstream stream was truncated.
    """

    kind: str = ""

    def __init__(self, spec: UpstreamSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.health = HEALTH.get(spec)

    @abstractmethod
    async def complete(self, call: Call, http: aiohttp.ClientSession) -> bytes:
        """The JSON body of an OpenAI chat.completion."""

    @abstractmethod
    async def open_stream(self, call: Call, http: aiohttp.ClientSession) -> EventStream:
        """SSE events, already encoded, after the upstream accepted the request."""

    async def list_models(self, http: aiohttp.ClientSession) -> list[dict[str, Any]]:
        """Model cards the upstream offers, for `prefix/*` routes."""
        return []
