"""The one owner of an upstream answer's deadlines: connect, first event, idle, total, and the
keep-alive pace.

`connect` and `total` are aiohttp's own (`client_timeout`), and `expired()` turns the
TimeoutError they raise into the proxy's UpstreamTimeout. `first_event`, `idle` and the
keep-alive pace are kept here, by one timer per answer, because an upstream answer is read
in microseconds per chunk: no `asyncio.timeout` per read (a timer handle scheduled and
cancelled every time) and no task per read. The timer fires at the earliest deadline,
compares it with timestamps the reads keep, and either re-arms itself (the usual case: there
was activity) or, only while the request waits in `answer()` or `read()`, interrupts the
request through the one protocol of proxy/exchange.py. The waiting method takes the
interruption back and turns it into a keep-alive or an UpstreamTimeout. Cancelling a pending
`StreamReader.readany()` loses nothing: the data stays buffered for the next read.

Even one timer per answer is worth avoiding: nearly every answer ends long before its
deadline (300 s by default, 15 s to the first keep-alive). So while a deadline is more than
the wheel's horizon away, the answer only parks in the app's `Wheel` (a set, looked at once a
tick) and gets a real timer when the wheel finds its deadline near. Deadlines stay exact.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aiohttp

from proxy.config import Timeouts
from proxy.errors import UpstreamTimeout
from proxy.exchange import DEADLINES, Exchange, Reason
from proxy.upstreams.bulk_read import read_any

T = TypeVar("T")
# Event loops may run a timer slightly before its time (uvloop counts in milliseconds): a
# deadline this close counts as reached, or the timer would re-arm for the same instant.
_EARLY = 0.002


class Wheel:
    """The answers of one app whose deadlines are still far away. Created with the app (see
    proxy/state.py) and stopped with it, so no timer outlives the app."""

    __slots__ = ("_handle", "_loop", "_parked", "horizon", "tick")

    def __init__(self, tick: float = 1.0, horizon: float = 2.0) -> None:
        # More than a tick of horizon, so no deadline is found late.
        self.tick = tick
        self.horizon = horizon
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._parked: set[Deadlines] = set()

    @property
    def parked(self) -> int:
        """How many answers wait in the wheel (no timer of their own)."""
        return len(self._parked)

    @property
    def ticking(self) -> bool:
        return self._handle is not None

    def park(self, deadlines: Deadlines, loop: asyncio.AbstractEventLoop) -> None:
        self._parked.add(deadlines)
        if self._handle is None:
            self._loop = loop
            self._handle = loop.call_at(loop.time() + self.tick, self._tick)

    def unpark(self, deadlines: Deadlines) -> bool:
        if deadlines in self._parked:
            self._parked.discard(deadlines)
            return True
        return False

    def leave(self, deadlines: Deadlines) -> None:
        """`deadlines` ended: out of the wheel, if it was in it."""
        self._parked.discard(deadlines)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._parked.clear()

    def _tick(self) -> None:
        self._handle = None
        loop = self._loop
        assert loop is not None
        near = loop.time() + self.horizon
        for deadlines in [d for d in self._parked if d.deadline() <= near]:
            self._parked.discard(deadlines)
            deadlines.schedule()
        if self._parked:
            self._handle = loop.call_at(loop.time() + self.tick, self._tick)


class Deadlines:
    """The deadlines of one upstream answer.

    `started` is the loop time the request was sent (now, when None): `first_event` counts
    from it, and so does the keep-alive pace, since the client has been waiting from then on.
    `keepalive` None means no keep-alives (an answer that is not streamed to the client).
    The timer starts at once; `close()` stops it and must be called when the answer ends.
    """

    __slots__ = (
        "_exchange", "_first_deadline", "_handle", "_idle", "_keepalive", "_loop", "_time",
        "_wheel", "_when", "first_event", "last_in", "last_out", "seen", "timeouts", "upstream",
        "waiting",
    )

    def __init__(
        self,
        upstream: str,
        timeouts: Timeouts,
        exchange: Exchange,
        wheel: Wheel,
        keepalive: float | None = None,
        started: float | None = None,
    ) -> None:
        task = exchange.task
        assert task is not None
        # From the task: get_running_loop() costs a getpid() system call on Python 3.11, and
        # this runs once per upstream request.
        loop = task.get_loop()
        if started is None:
            started = loop.time()
        self._loop = loop
        self._time = loop.time
        self._exchange = exchange
        self._wheel = wheel
        self.upstream = upstream
        self.timeouts = timeouts
        self.first_event = timeouts.first_event
        self._first_deadline = started + timeouts.first_event
        self._idle = timeouts.idle
        self._keepalive = keepalive
        # When the upstream last sent bytes, and when the client was last sent something.
        self.last_in = started
        self.last_out = started
        self.seen = False
        # True only while the request waits in answer() or read(): the one place a deadline
        # may interrupt it.
        self.waiting = False
        # A timer of its own, due at `_when`; or none while parked in the wheel (or closed).
        self._handle: asyncio.TimerHandle | None = None
        self._when = 0.0
        self.schedule()

    # -- what adapters call ----------------------------------------------------------------

    async def answer(self, awaitable: Awaitable[T]) -> T:
        """Awaits the upstream's answer (a response, a whole body) within first_event."""
        self.waiting = True
        try:
            return await awaitable
        except asyncio.CancelledError:
            reason = self._exchange.take(DEADLINES)
            if reason is not None:
                raise self.timed_out(reason) from None
            raise
        finally:
            self.waiting = False

    async def read(
        self,
        content: aiohttp.StreamReader,
        take: Callable[[aiohttp.StreamReader], Awaitable[bytes]] = read_any,
    ) -> bytes | None:
        """The upstream's next bytes (b"" at the end), or None when a keep-alive is due.
        `take` reads them: `read_any`, or aiohttp's `readany`.

        Raises UpstreamTimeout when first_event or idle ran out.
        """
        self.waiting = True
        try:
            chunk = await take(content)
        except asyncio.CancelledError as exc:
            self.interrupted(exc)
            return None
        self.arrived()
        return chunk

    # A read's protocol, for a loop that awaits the upstream itself (the openai relay's, once
    # per event: a coroutine call per read cost more than its own Python): set `waiting`,
    # await, then `arrived()`, or on CancelledError `interrupted(exc)`, which returns when a
    # keep-alive is due. `read` is this protocol.

    def arrived(self) -> None:
        """The awaited read gave bytes: the upstream is not idle."""
        self.waiting = False
        self.last_in = self._time()
        if not self.seen:
            self.seen = True
            # The deadline is now idle's, which may come before first_event's.
            self._rearm()

    def relayed(self) -> None:
        """`arrived()` then `sent()`, in one call: what was read goes straight on."""
        self.waiting = False
        self.last_in = self.last_out = self._time()
        if not self.seen:
            self.seen = True
            self._rearm()

    def interrupted(self, exc: asyncio.CancelledError) -> None:
        """The awaited read was cancelled: returns when a keep-alive is due; raises
        UpstreamTimeout when first_event or idle ran out, and `exc` itself when the cancel
        was not a deadline's."""
        self.waiting = False
        reason = self._exchange.take(DEADLINES)
        if reason is None:
            raise exc
        if reason != "keepalive":
            raise self.timed_out(reason) from None
        self.last_out = self._time()
        self.schedule()

    def sent(self) -> None:
        """The adapter is about to yield what it read: the client is not idle."""
        self.last_out = self.last_in

    def set_keepalive(self, keepalive: float | None) -> None:
        """Keep-alives from now on, counted from when the request was sent."""
        self._keepalive = keepalive
        self._rearm()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._wheel.leave(self)

    def client_timeout(self) -> aiohttp.ClientTimeout:
        return client_timeout(self.timeouts)

    def expired(self, exc: TimeoutError) -> UpstreamTimeout:
        """What aiohttp's own connect or total timeout means to the client."""
        return timeout_error(self.upstream, self.timeouts, exc)

    def timed_out(self, reason: Reason) -> UpstreamTimeout:
        if reason == "first_event":
            return UpstreamTimeout(
                f"Upstream '{self.upstream}' sent no event within {self.first_event:g} s "
                "(timeouts.first_event)."
            )
        return UpstreamTimeout(
            f"Upstream '{self.upstream}' sent nothing for {self._idle:g} s (timeouts.idle)."
        )

    # -- the timer -------------------------------------------------------------------------

    def deadline(self) -> float:
        hard = self.last_in + self._idle if self.seen else self._first_deadline
        if self._keepalive is None:
            return hard
        return min(hard, self.last_out + self._keepalive)

    def schedule(self) -> None:
        """A timer at the deadline, or a place in the wheel while the deadline is far."""
        when = self.deadline()
        if when - self._time() > self._wheel.horizon:
            self._wheel.park(self, self._loop)
        else:
            self._when = when
            self._handle = self._loop.call_at(when, self._fire)

    def _rearm(self) -> None:
        """The deadline may have come nearer: make sure it is looked at in time."""
        if self._handle is not None:
            if self.deadline() < self._when - _EARLY:
                self._handle.cancel()
                self._handle = None
                self.schedule()
        elif self.deadline() - self._time() <= self._wheel.horizon and self._wheel.unpark(self):
            self.schedule()

    def _due(self, now: float) -> Reason | None:
        now += _EARLY
        if self.seen:
            if now >= self.last_in + self._idle:
                return "idle"
        elif now >= self._first_deadline:
            return "first_event"
        if self._keepalive is not None and now >= self.last_out + self._keepalive:
            return "keepalive"
        return None

    def _fire(self) -> None:
        self._handle = None
        now = self._time()
        if self.waiting:
            reason = self._due(now)
            if reason is not None:
                # The waiting method re-arms the timer once it has handled the interruption.
                self._exchange.interrupt(reason)
                return
        elif self.deadline() <= now + _EARLY:
            # Busy writing to a client that reads slowly: nothing to add to its buffer, and
            # the upstream is not silent, only unread. Look again shortly.
            self._when = now + 0.1
            self._handle = self._loop.call_at(self._when, self._fire)
            return
        self.schedule()


def client_timeout(timeouts: Timeouts) -> aiohttp.ClientTimeout:
    """aiohttp's share of the deadlines: connect and total."""
    return aiohttp.ClientTimeout(total=timeouts.total, sock_connect=timeouts.connect)


def timeout_error(upstream: str, timeouts: Timeouts, exc: TimeoutError) -> UpstreamTimeout:
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamTimeout(
            f"Upstream '{upstream}' did not accept a connection within "
            f"{timeouts.connect:g} s (timeouts.connect)."
        )
    total = timeouts.total
    limit = f"within {total:g} s " if total is not None else ""
    return UpstreamTimeout(f"Upstream '{upstream}' did not finish {limit}(timeouts.total).")
