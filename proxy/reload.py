"""The holder of the current route table, and the watcher that keeps it current.

A request reads `holder.current` once and keeps that table to its end, so swapping the
reference is the whole of a reload as far as requests are concerned.

The watcher re-reads the file by its path every `interval` seconds (and at once on SIGHUP)
instead of waiting for file-system events. Opening the path resolves the directory's symlinks
anew each time, so the kubelet's ConfigMap update (it swaps the directory's `..data` symlink,
and no event ever names the file) is seen like an edit in place; network and FUSE volumes,
which give no events at all, work the same; and reading a few kilobytes once a second costs
nothing next to the kubelet's own propagation delay of up to a minute or more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

from proxy.config import Config, ConfigError, load_config, parse_config
from proxy.routing import RouteTable
from proxy.state import AppState

log = logging.getLogger(__name__)

# unchanged: nothing to do; reloaded: a new table is served; restored: the file is valid again
# and equals the table still served; failed: the file is broken, the last good table serves.
Outcome = Literal["unchanged", "reloaded", "restored", "failed"]


class TableHolder:
    def __init__(self, path: str | Path, extra_keys: Sequence[str] = ()) -> None:
        self.path = Path(path)
        self.extra_keys = tuple(extra_keys)
        # What outlives a table: circuits, slots, session locks (proxy/state.py).
        self.state = AppState()
        raw = self.path.read_bytes()
        self.current = RouteTable(self._parse(raw), self.extra_keys, self.state)
        # The content last tried, good or bad: a broken file is reported once, not every poll.
        self._seen: bytes | None = raw
        self._unreadable: str | None = None
        self._wakeup: asyncio.Event | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.last_attempt = time.time()
        self.draining = False

    def _parse(self, raw: bytes) -> Config:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            # load_config turns this into a ConfigError that names the line.
            return load_config(self.path)
        # load_config reads in text mode, which folds CRLF and CR; so does this, so the version
        # (a hash of the text) is the one `agentproxy check` prints.
        return parse_config(text.replace("\r\n", "\n").replace("\r", "\n"), str(self.path))

    def reload(self) -> bool:
        """Re-reads the file now, as SIGHUP does; False if it is broken (the old table serves)."""
        return self.update(read_routes(self.path), force=True) != "failed"

    def update(self, content: bytes | OSError, *, force: bool = False) -> Outcome:
        """Builds the whole new table first; on any problem keeps the last good one.

        Content equal to what was last tried is skipped unless `force`d, so a broken file is
        reported once and not at every poll.
        """
        self.last_attempt = time.time()
        if isinstance(content, OSError):
            message = f"{self.path}: cannot read the file: {content.strerror or content}"
            if message == self.last_error and not force:
                return "unchanged"
            if message != self._unreadable and not force:
                # An editor that saves by rename leaves the path missing for an instant: only
                # a failure seen on two polls in a row is reported.
                self._unreadable = message
                return "unchanged"
            self._unreadable = None
            self._seen = None
            return self._failed(message)
        self._unreadable = None
        if content == self._seen and not force:
            return "unchanged"
        self._seen = content
        try:
            config = self._parse(content)
            if config.version == self.current.version:
                was_broken, self.last_error = self.last_error is not None, None
                return "restored" if was_broken else "unchanged"
            table = RouteTable(config, self.extra_keys, self.state)
        except ConfigError as exc:
            return self._failed(str(exc))
        except OSError as exc:
            return self._failed(f"{self.path}: cannot read the file: {exc.strerror or exc}")
        except Exception as exc:
            # A bug while building adapters must not take the serving table down with it.
            log.exception("building the route table from %s failed", self.path)
            return self._failed(f"{self.path}: cannot build the route table: {exc}")
        self.current = table
        self.last_error = None
        return "reloaded"

    def _failed(self, message: str) -> Outcome:
        self.last_error = message
        self.last_error_at = time.time()
        return "failed"

    def request_reload(self) -> None:
        """SIGHUP: the watcher re-reads the file at once, even if it looks unchanged."""
        if self._wakeup is not None:
            self._wakeup.set()
        else:
            before = self.current.version
            report(self, self.update(read_routes(self.path), force=True), before)


def read_routes(path: Path) -> bytes | OSError:
    try:
        return path.read_bytes()
    except OSError as exc:
        return exc


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
        problems = (holder.last_error or "").replace("\n", "; ")
        log.error("route table not reloaded, still serving version %s: %s", before, problems)


async def watch(
    holder: TableHolder,
    interval: float = 1.0,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> None:
    """Keeps `holder` current until cancelled. `interval` 0 means SIGHUP only."""
    wakeup = holder._wakeup = asyncio.Event()
    try:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wakeup.wait(), interval if interval > 0 else None)
            forced = wakeup.is_set()
            wakeup.clear()
            # A thread: a stalled network volume must not stall the event loop with it.
            content = await asyncio.to_thread(read_routes, holder.path)
            before = holder.current.version
            outcome = holder.update(content, force=forced)
            report(holder, outcome, before)
            if on_outcome is not None and outcome != "unchanged":
                on_outcome(outcome)
    finally:
        if holder._wakeup is wakeup:
            holder._wakeup = None
