"""The one per-request record, and the one protocol by which a request is interrupted.

Every request fills one `Exchange` as it goes (model, upstream, first token, status); the
front wrapper (proxy/app.py) hands it to the metrics and the access log when the request ends.
It never holds keys or content.

Interrupting a request: three things may end a request's wait from outside, a deadline of
its upstream answer (proxy/upstreams/deadlines.py), the drain at shutdown (proxy/shutdown.py)
and the send timeout of a client that stopped reading (proxy/sse.py). All do it the way
`asyncio.timeout` does, by cancelling the request's task, and all go through
`interrupt(reason)`, which records why before it cancels. Whoever catches the
`CancelledError` calls `take(reasons)`: it returns the reason when it is one of `reasons`
and the cancellation is only that (the task is then uncancelled and carries on), or None when
it is not this catcher's to take, or when something else cancelled the task too (the client
left: aiohttp cancels the handler). A reason not taken stays recorded for an outer catcher,
so a drain that lands while a read waits on a deadline still reaches the handler.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

# first_event / idle: an upstream deadline; keepalive: time to write a keep-alive comment;
# drain: the shutdown deadline passed; send: the client has not taken a write for too long.
Reason = Literal["first_event", "idle", "keepalive", "drain", "send"]
DEADLINES: frozenset[Reason] = frozenset({"first_event", "idle", "keepalive"})
# What ends a request from outside its upstream: the stream writer takes both, the front
# (answers that are not streams) the drain only.
ENDINGS: frozenset[Reason] = frozenset({"drain", "send"})
DRAIN: frozenset[Reason] = frozenset({"drain"})


class Exchange:
    """What one request is and did, for its headers, metrics and log line."""

    __slots__ = (
        "_reason", "body_offset", "chat", "error", "model", "overhead", "request_id", "route",
        "started", "status", "stream", "task", "ttft", "upstream", "upstream_ms",
    )

    # Set by a stream when it commits, with `status` (proxy/sse_writer.py), and read only
    # when `status` was set so: no cost to the requests that are not streams. What the
    # connection's writer counted that is not body handed to the transport: the head, and
    # a write the closing transport refused. The stream's body bytes are the count less it.
    body_offset: int

    def __init__(
        self, started: float, request_id: str, task: asyncio.Task[Any] | None = None
    ) -> None:
        self.started = started
        self.request_id = request_id
        # The task serving the request: what a deadline or the drain interrupts.
        self.task = task
        self._reason: Reason | None = None
        self.chat = False
        self.stream = False
        # The model the client asked for (logs) and the route that served it (metric label:
        # a `prefix/*` route would otherwise let clients mint unbounded label values).
        self.model = ""
        self.route = ""
        self.upstream = ""
        self.status = 0
        self.ttft: float | None = None
        # Seconds, fixed when the response headers go out (Server-Timing's `proxy` value).
        self.overhead: float | None = None
        # The error code a stream ended with after its 200 was committed.
        self.error: str | None = None
        # Milliseconds spent waiting for the upstream's answer (Server-Timing's `upstream`);
        # None until an upstream answered.
        self.upstream_ms: float | None = None

    def interrupt(self, reason: Reason) -> None:
        """Ends the request's current wait for `reason` (see the module's docstring)."""
        task = self.task
        if task is None or task.done():
            return
        if self._reason is not None:
            # Already cancelled for another reason and not yet taken: an ending outranks a
            # deadline, and one cancellation is enough.
            if reason in ENDINGS:
                self._reason = reason
            return
        self._reason = reason
        task.cancel()

    def take(self, reasons: frozenset[Reason]) -> Reason | None:
        """After a CancelledError: the recorded reason if it is one of `reasons` and nothing
        else cancelled the task (it is then uncancelled), else None."""
        reason = self._reason
        if reason is None or reason not in reasons:
            return None
        self._reason = None
        task = self.task
        if task is None or task.uncancel() > 0:
            return None
        return reason

    @property
    def interrupted(self) -> Reason | None:
        """The reason recorded and not yet taken."""
        return self._reason
