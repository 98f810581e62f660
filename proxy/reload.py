"""The holder of the current route table, and the watcher that keeps it current.

A request reads `holder.current` once and keeps that table to its end, so swapping the
reference is the whole of a reload as far as requests are concerned.

The watcher re-reads the file by its path every `interval` seconds (and at once on SIGHUP)
instead of waiting for file-system events. Opening the path resolves the directory's symlinks
anew each time, so the kubelet's ConfigMap update (it swaps the directory's `..data` symlink,
and no event ever names the file) is seen like an edit in place; network and FUSE volumes,
which give no events at all, work the same; and reading a few kilobytes once a second costs
nothing next to the kubelet's own propagation delay of up to a minute or more. New content is
applied only once two polls in a row read it alike, so a file caught half-written is not served.

Reading, parsing and building the table but its upstream adapters (which share health state
with the requests) run on a daemon thread of their own, never on the event loop and never in
the loop's default executor: the read is bounded (proxy/config/source.py: 4 MiB, a timeout for
pipes and devices), but a read stuck in the kernel (a dead network volume) can outlive any
timeout, and a thread in the default executor would then hold the process's exit forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal, TypeVar

from proxy.config import Config, ConfigError, Problem, parse_config
from proxy.config.source import READ_TIMEOUT, decode_source, read_source
from proxy.routing import RouteTable, build_upstreams
from proxy.state import AppState
from proxy.upstreams.base import Upstream

log = logging.getLogger(__name__)

# unchanged: nothing to do; reloaded: a new table is served; restored: the file is valid again
# and equals the table still served; failed: the file is broken, the last good table serves.
Outcome = Literal["unchanged", "reloaded", "restored", "failed"]

# Beyond the read's own timeout, how long the watcher waits for the reading thread.
_READ_GRACE = 1.0
# Problems named in /readyz's `last_error`; the log and `agentproxy check` have them all.
_SHOWN_PROBLEMS = 3
T = TypeVar("T")


class _Failure:
    """A reload that failed: `detail` for the log (every message), `public` for /readyz (the
    file's name, lines and paths: never the absolute path, never a value from the file)."""

    __slots__ = ("detail", "public")

    def __init__(self, detail: str, public: str) -> None:
        self.detail = detail
        self.public = public


class TableHolder:
    def __init__(
        self, path: str | Path, extra_keys: Sequence[str] = (), *,
        read_timeout: float = READ_TIMEOUT, source: bytes | None = None,
        parsed: Config | None = None, polled: bool | None = None,
    ) -> None:
        """`source`: the file's bytes when the caller has read them already; a pipe
        (`--routes <(...)`) can be read only once. `parsed`: those bytes' Config, when the
        caller has parsed them too (a table of 100,000 models takes seconds to parse).
        `polled`: whether to poll the path, when the caller decided it where the path was
        opened (a `--workers` child cannot see its parent's `/dev/fd/N`)."""
        self.path = Path(path)
        self.extra_keys = tuple(extra_keys)
        self.read_timeout = read_timeout
        # What outlives a table: circuits, slots, session locks (proxy/state.py).
        self.state = AppState()
        # Polling a pipe or a device would read nothing, or what the next writer sends, as a
        # new table: only a regular file (or one missing for now) is polled.
        self.polled = pollable(self.path) if polled is None else polled
        raw = source if source is not None else read_source(self.path, timeout=read_timeout)
        config = parsed if parsed is not None and source is not None else self._parse(raw)
        self.current = RouteTable(config, self.extra_keys, self.state)
        self.current.commit()
        # The content last tried, good or bad: a broken file is reported once, not every poll.
        self._seen: bytes | None = raw
        # New content read by the last poll: applied once the next poll reads it unchanged.
        self._pending: bytes | None = None
        self._unreadable: str | None = None
        self._wakeup: asyncio.Event | None = None
        self._reading: threading.Thread | None = None
        # For /readyz, which needs no key: see _Failure.
        self.last_error: str | None = None
        # For the log: every problem in full.
        self.last_error_detail: str | None = None
        self.last_attempt = time.time()
        self.draining = False

    def _parse(self, raw: bytes) -> Config:
        return parse_config(decode_source(raw, str(self.path)), str(self.path))

    def reload(self) -> bool:
        """Re-reads the file now, as SIGHUP does; False if it is broken (the old table serves)."""
        return self.update(self.read(), force=True) != "failed"

    def read(self) -> bytes | OSError:
        try:
            return read_source(self.path, timeout=self.read_timeout)
        except OSError as exc:
            return exc

    def update(self, content: bytes | OSError, *, force: bool = False) -> Outcome:
        """Builds the whole new table first; on any problem keeps the last good one.

        Content equal to what was last tried is skipped unless `force`d, so a broken file is
        reported once and not at every poll.
        """
        step = self._triage(content, force)
        if not isinstance(step, bytes):
            return step
        return self._install(self._build_config(step))

    async def refresh(self, *, force: bool = False) -> Outcome:
        """`update` with the reading, the parsing and the table (but its upstream adapters)
        built off the event loop."""
        if self._reading is not None and self._reading.is_alive():
            # The last read has not come back from the kernel: do not pile up another.
            content: bytes | OSError = TimeoutError(
                errno.ETIMEDOUT, "the last read of the file has not returned")
        else:
            thread, future = _in_thread(self.read)
            self._reading = thread
            try:
                content = await asyncio.wait_for(future, self.read_timeout + _READ_GRACE)
            except TimeoutError:
                content = TimeoutError(errno.ETIMEDOUT,
                                       f"no answer within {self.read_timeout:g} s")
        step = self._triage(content, force)
        if not isinstance(step, bytes):
            return step
        _, parsed = _in_thread(functools.partial(self._build_config, step))
        built = await parsed
        table: RouteTable | _Failure | None = None
        if isinstance(built, Config) and built.version != self.current.version:
            # A table of 100,000 models takes a quarter of a second to build: only the
            # adapters, which take their health from the shared state, are built on the loop.
            try:
                upstreams = build_upstreams(built, self.state)
            except Exception as exc:
                table = self._build_failed(exc)
            else:
                _, building = _in_thread(functools.partial(self._build_table, built, upstreams))
                table = await building
        return self._install(built, table)

    def _triage(self, content: bytes | OSError, force: bool) -> Outcome | bytes:
        """The outcome when nothing needs parsing, or the bytes to parse."""
        self.last_attempt = time.time()
        if isinstance(content, OSError):
            # str(content) may name the absolute path; strerror never does.
            why = content.strerror or type(content).__name__
            failure = _Failure(f"{self.path}: cannot read the file: {content.strerror or content}",
                               f"{self.path.name}: cannot read the file: {why}")
            if failure.detail == self.last_error_detail and not force:
                return "unchanged"
            if failure.detail != self._unreadable and not force:
                # An editor that saves by rename leaves the path missing for an instant: only
                # a failure seen on two polls in a row is reported.
                self._unreadable = failure.detail
                return "unchanged"
            self._unreadable = None
            self._seen = self._pending = None
            return self._failed(failure)
        self._unreadable = None
        if content == self._seen and not force:
            self._pending = None
            return "unchanged"
        if content != self._pending and not force:
            # A writer that truncates and then writes leaves a prefix, often a valid table
            # (a key without its `models`), for an instant: only content seen on two polls
            # in a row is applied. SIGHUP (`force`) says the file is complete.
            self._pending = content
            return "unchanged"
        self._pending = None
        self._seen = content
        return content

    def _build_config(self, raw: bytes) -> Config | _Failure:
        """The new table's Config, or why there is none. Safe on any thread."""
        try:
            return self._parse(raw)
        except ConfigError as exc:
            return _Failure(str(exc), self._public(exc.problems))
        except Exception as exc:
            # A bug in the reader must not take the serving table (or the watcher) down.
            log.exception("reading the route table from %s failed", self.path)
            return _Failure(f"{self.path}: cannot read the route table: {exc}",
                            f"{self.path.name}: cannot read the route table (the log has the "
                            "error)")

    def _build_table(
        self, built: Config, upstreams: Mapping[str, Upstream] | None = None
    ) -> RouteTable | _Failure:
        """With `upstreams` given, touches nothing shared: safe on any thread."""
        try:
            return RouteTable(built, self.extra_keys, self.state, upstreams)
        except Exception as exc:
            return self._build_failed(exc)

    def _build_failed(self, exc: Exception) -> _Failure:
        # A bug while building adapters must not take the serving table down with it.
        log.error("building the route table from %s failed", self.path, exc_info=exc)
        return _Failure(f"{self.path}: cannot build the route table: {exc}",
                        f"{self.path.name}: cannot build the route table (the log has the error)")

    def _install(
        self, built: Config | _Failure, table: RouteTable | _Failure | None = None
    ) -> Outcome:
        """Serves `built`, as `table` if that is built already; on the loop."""
        outcome = self._serve(built, table)
        # Whether served or rejected, the build may have made state for upstreams the served
        # table does not name: kept, a routes file edited for months would grow the process.
        self.state.health.retain(u.health for u in self.current.upstreams.values())
        return outcome

    def _serve(self, built: Config | _Failure, table: RouteTable | _Failure | None) -> Outcome:
        if isinstance(built, _Failure):
            return self._failed(built)
        if built.version == self.current.version:
            was_broken = self.last_error is not None
            self.last_error = self.last_error_detail = None
            return "restored" if was_broken else "unchanged"
        if table is None:
            table = self._build_table(built)
        if isinstance(table, _Failure):
            return self._failed(table)
        table.commit()
        self.current = table
        self.last_error = self.last_error_detail = None
        return "reloaded"

    def _public(self, problems: list[Problem]) -> str:
        where = [f"{self.path.name}:{p.line} {p.path}" for p in problems[:_SHOWN_PROBLEMS]]
        more = len(problems) - len(where)
        listed = ", ".join(where) + (f" and {more} more" if more > 0 else "")
        return f"{listed}: not valid; `agentproxy check` prints the problems"

    def _failed(self, failure: _Failure) -> Outcome:
        self.last_error = failure.public
        self.last_error_detail = failure.detail
        return "failed"

    def request_reload(self) -> None:
        """SIGHUP: the watcher re-reads the file at once, even if it looks unchanged."""
        if self.draining:
            # Shutting down, and the watcher may be gone: a read here, on the loop, could
            # hold the end of the drain for the read's whole timeout (a FIFO), for nothing.
            return
        if self._wakeup is not None:
            self._wakeup.set()
        else:
            before = self.current.version
            report(self, self.update(self.read(), force=True), before)


def pollable(path: Path) -> bool:
    """Whether a routes path is polled for changes: a regular file, or one missing for now."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return True


def _in_thread(work: Callable[[], T]) -> tuple[threading.Thread, asyncio.Future[T]]:
    """Runs `work()` on a daemon thread; the future gets its result on this loop. A cancelled
    or abandoned future leaves the thread to finish (or hang) on its own, holding neither the
    loop nor the process's exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        try:
            result = work()
        except BaseException as exc:
            deliver = functools.partial(_set_exception, future, exc)
        else:
            deliver = functools.partial(_set_result, future, result)
        # The loop may be closed by now (shutdown): nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(deliver)

    thread = threading.Thread(target=run, name="routes-reader", daemon=True)
    thread.start()
    return thread, future


def _set_result(future: asyncio.Future[T], result: T) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[T], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def report(holder: TableHolder, outcome: Outcome, before: str) -> None:
    """The one log line a reload earns: nothing when nothing changed."""
    path, table = holder.path, holder.current
    if outcome == "reloaded":
        log.info(
            "route table %s reloaded: version %s -> %s (%d models)",
            path, before, table.version, len(table.routes),
        )
    elif outcome == "restored":
        log.info("route table %s is valid again; serving version %s", path, table.version)
    elif outcome == "failed":
        problems = (holder.last_error_detail or "").replace("\n", "; ")
        log.error("route table not reloaded, still serving version %s: %s", before, problems)


async def watch(
    holder: TableHolder,
    interval: float = 1.0,
    on_outcome: Callable[[Outcome], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Keeps `holder` current until cancelled, or until `stop` is set. `interval` 0 means
    SIGHUP only. The app sets `stop` before it cancels: on Python 3.11 `asyncio.wait_for`
    can swallow a cancellation that lands as its wait ends, and the loop would go on, with
    the app's cleanup awaiting it forever."""
    wakeup = holder._wakeup = asyncio.Event()
    if interval > 0 and not holder.polled:
        log.info("route table %s is not a regular file (a pipe?): it is not polled; SIGHUP "
                 "reads it again", holder.path)
        interval = 0
    try:
        while stop is None or not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wakeup.wait(), interval if interval > 0 else None)
            forced = wakeup.is_set()
            wakeup.clear()
            if holder.draining:
                # Shutting down: a new table would serve nothing, and its reading must not
                # stand in the drain's way.
                continue
            before = holder.current.version
            outcome = await holder.refresh(force=forced)
            report(holder, outcome, before)
            if on_outcome is not None and outcome != "unchanged":
                on_outcome(outcome)
    finally:
        if holder._wakeup is wakeup:
            holder._wakeup = None
