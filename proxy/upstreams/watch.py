"""One timer per upstream answer: the first_event and idle timeouts, and the keep-alive pace.

The relay handles each upstream chunk in a few microseconds, so nothing here runs per chunk
but two attribute stores and a clock read: no `asyncio.timeout` per read (a timer handle
scheduled and cancelled every time) and no task per read. Instead one `loop.call_at` timer
per answer fires at the earliest deadline, compares it with timestamps the reads keep, and
either re-arms itself (the usual case: there was activity) or, only while the request's task
is suspended in an upstream read, cancels that task. `read()` catches that cancellation,
takes it back with `Task.uncancel()` (as `asyncio.timeout` does) and turns it into a
keep-alive or an `UpstreamTimeout`. Cancelling a pending `StreamReader.readany()` loses
nothing: the data stays buffered for the next read.

Keep-alives are yielded by the adapter's own generator like any other event, so the one
coroutine that writes to the client's StreamResponse stays the only writer.

Even one timer per answer is a cost worth avoiding: scheduling and cancelling a loop timer
takes microseconds (uvloop allocates a libuv timer each time), and nearly every answer ends
long before its deadline (300 s by default, 15 s to the first keep-alive). So a watch whose
deadline is more than `_HORIZON` seconds away only parks in its loop's wheel (a set, looked
at once a `_TICK`), and gets a real timer when the wheel finds its deadline near. Deadlines
stay exact; an answer that ends early costs a set insert and a set removal.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any, Literal

import aiohttp

from proxy.config import Timeouts
from proxy.errors import UpstreamTimeout

Reason = Literal["first_event", "idle", "keepalive"]
# Event loops may run a timer slightly before its time (uvloop counts in milliseconds): a
# deadline this close counts as reached, or the timer would re-arm for the same instant.
_EARLY = 0.002
# Seconds between the wheel's looks at its parked watches, and how near a deadline must be
# for its watch to get a timer of its own: more than a tick, so none is found late.
_TICK = 1.0
_HORIZON = 2.0


class _Wheel:
    """The watches of one event loop whose deadlines are still far away."""

    __slots__ = ("_handle", "_loop", "parked")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._handle: asyncio.TimerHandle | None = None
        self.parked: set[Watch] = set()

    def park(self, watch: Watch) -> None:
        self.parked.add(watch)
        if self._handle is None:
            self._handle = self._loop.call_at(self._loop.time() + _TICK, self._tick)

    def _tick(self) -> None:
        self._handle = None
        near = self._loop.time() + _HORIZON
        for watch in [w for w in self.parked if w._deadline() <= near]:
            self.parked.discard(watch)
            watch._schedule()
        if self.parked:
            self._handle = self._loop.call_at(self._loop.time() + _TICK, self._tick)


_WHEELS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Wheel] = (
    weakref.WeakKeyDictionary()
)


_last: _Wheel | None = None


def _wheel(loop: asyncio.AbstractEventLoop) -> _Wheel:
    global _last
    # A process serves from one loop: skip the weak-keyed lookup (it makes a weakref each
    # time) while the loop is the last one asked for.
    last = _last
    if last is not None and last._loop is loop:
        return last
    wheel = _WHEELS.get(loop)
    if wheel is None:
        wheel = _WHEELS[loop] = _Wheel(loop)
    _last = wheel
    return wheel


class Watch:
    """Deadlines of one upstream answer, checked by a timer instead of by every read.

    `started` is the loop time the request was sent (now, when None): `first_event` counts
    from it, and so does the keep-alive pace, since the client has been waiting from then on.
    `task` is the request's task, the one that reads and that a deadline interrupts. `keepalive`
    None means no keep-alives (an answer that is not streamed to the client).
    """

    __slots__ = (
        "_fired",
        "_first_deadline",
        "_handle",
        "_idle",
        "_keepalive",
        "_loop",
        "_task",
        "_time",
        "_wheel",
        "_when",
        "first_event",
        "last_in",
        "last_out",
        "seen",
        "upstream",
        "waiting",
    )

    def __init__(
        self,
        upstream: str,
        timeouts: Timeouts,
        keepalive: float | None,
        started: float | None = None,
        task: asyncio.Task[Any] | None = None,
    ) -> None:
        # From the task when given: get_running_loop() costs a getpid() system call on
        # Python 3.11, and this runs once per upstream request.
        loop = task.get_loop() if task is not None else asyncio.get_running_loop()
        if started is None:
            started = loop.time()
        self._loop = loop
        self._time = loop.time
        self.upstream = upstream
        self.first_event = timeouts.first_event
        self._first_deadline = started + timeouts.first_event
        self._idle = timeouts.idle
        self._keepalive = keepalive
        # When the upstream last sent bytes, and when the client was last sent something.
        self.last_in = started
        self.last_out = started
        self.seen = False
        # True only while the task is suspended in `read()`: the one place it may be cancelled.
        self.waiting = False
        self._fired: Reason | None = None
        self._task: asyncio.Task[Any] | None = task
        # A timer of its own, due at `_when`; or none while parked in the wheel (or disarmed).
        self._handle: asyncio.TimerHandle | None = None
        self._when = 0.0
        self._wheel = _wheel(loop)

    def arm(self) -> None:
        """Starts the timer; the task given, or else the current one, is the one that reads."""
        if self._task is None:
            self._task = asyncio.current_task(self._loop)
        self._schedule()

    def _schedule(self) -> None:
        """A timer at the deadline, or a place in the wheel while the deadline is far."""
        when = self._deadline()
        if when - self._time() > _HORIZON:
            self._wheel.park(self)
        else:
            self._when = when
            self._handle = self._loop.call_at(when, self._fire)

    def _rearm(self) -> None:
        """The deadline may have come nearer: make sure the watch looks at it in time."""
        if self._handle is not None:
            if self._deadline() < self._when - _EARLY:
                self._handle.cancel()
                self._handle = None
                self._schedule()
        elif self in self._wheel.parked and self._deadline() - self._time() <= _HORIZON:
            self._wheel.parked.discard(self)
            self._schedule()

    def set_keepalive(self, keepalive: float | None) -> None:
        """Keep-alives from now on, counted from when the request was sent."""
        self._keepalive = keepalive
        self._rearm()

    def disarm(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._wheel.parked.discard(self)
        self._task = None

    async def read(self, content: aiohttp.StreamReader) -> bytes | None:
        """The upstream's next bytes (b"" at the end), or None when a keep-alive is due.

        Raises UpstreamTimeout when first_event or idle ran out.
        """
        self.waiting = True
        try:
            chunk = await content.readany()
        except asyncio.CancelledError:
            self.waiting = False
            if self._interrupted():
                return None
            raise
        self.waiting = False
        self.last_in = self._time()
        if not self.seen:
            self.seen = True
            # The deadline is now idle's, which may come before first_event's.
            self._rearm()
        return chunk

    def sent(self) -> None:
        """The adapter is about to yield what it read: the client is not idle."""
        self.last_out = self.last_in

    def timed_out(self, reason: Reason) -> UpstreamTimeout:
        if reason == "first_event":
            return UpstreamTimeout(
                f"Upstream '{self.upstream}' sent no event within {self.first_event:g} s "
                "(timeouts.first_event)."
            )
        return UpstreamTimeout(
            f"Upstream '{self.upstream}' sent nothing for {self._idle:g} s (timeouts.idle)."
        )

    def _deadline(self) -> float:
        hard = self.last_in + self._idle if self.seen else self._first_deadline
        if self._keepalive is None:
            return hard
        return min(hard, self.last_out + self._keepalive)

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
        task = self._task
        if task is None or task.done():
            return
        now = self._time()
        deadline = self._deadline()
        if self.waiting:
            reason = self._due(now)
            if reason is not None:
                # read() re-arms the timer once it has handled the interruption.
                self._fired = reason
                task.cancel()
                return
        elif deadline <= now + _EARLY:
            # Busy writing to a client that reads slowly: nothing to add to its buffer, and
            # the upstream is not silent, only unread. Look again shortly.
            self._when = now + 0.1
            self._handle = self._loop.call_at(self._when, self._fire)
            return
        self._schedule()

    def _interrupted(self) -> bool:
        """After a CancelledError in read(): True for a keep-alive; raises for a timeout.

        False when the cancellation is not this watch's, or not only: the client left.
        """
        reason = self.expired()
        if reason is None:
            return False
        if reason != "keepalive":
            raise self.timed_out(reason)
        self.last_out = self._time()
        self._schedule()
        return True

    def expired(self) -> Reason | None:
        """After a CancelledError while `waiting`: the deadline that cancelled the task (the
        cancellation is then taken back), or None when the cancellation is not this watch's,
        or not only: the client left."""
        reason, self._fired = self._fired, None
        if reason is None:
            return None
        task = self._task
        if task is None or task.uncancel() > 0:
            return None
        return reason
