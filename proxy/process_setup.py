"""The settings of a worker process that the proxy itself does not read: its limit on open
files, the cyclic garbage collector, the event loop it runs on, and the signals that arrive
while it starts."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import sys


def raise_open_files_limit() -> tuple[int, int] | None:
    """Raises the soft limit on open files to the hard limit: each stream holds two sockets
    (the client's and the upstream's), and a soft limit of 1024, common by default, would
    refuse connections after about 500 streams. Returns (soft, hard) as they are now, or None
    where there is no such limit (Windows)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Linux or macOS
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit cannot be the soft one; the kernel's own cap (nr_open) is
    # usually 1,048,576.
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    return limits[0], limits[1]


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


# A young collection after this many more allocations than frees (CPython's default: 700).
GC_THRESHOLDS = (7000, 20, 20)


def tune_gc() -> None:
    """Fewer, larger cyclic collections, and none over what was built at start.

    A request allocates hundreds of container objects (aiohttp's request and response, the
    upstream call, headers, parsed JSON); nearly all are freed by reference counting, but at
    CPython's default threshold the collector still runs a young collection every request or
    two, over every object of the requests in flight. Measured with bench/ this took 7-10 %
    of the CPU at concurrency 64 (docs/performance.md). `gc.freeze()` moves what exists now
    (modules, classes, the first route table) out of the collector's view, so the rare full
    collections do not walk it again and again; it is never garbage, except a route table
    that a reload replaces, which reference counting frees as it holds no cycles.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


# A SIGHUP that came before the server was up: it reloads once it is.
_hup_while_starting = False
# This process is `agentproxy serve` (or one of its workers), not an application embedding
# the app: the drain may take SIGTERM and SIGINT over (proxy/shutdown.py).
_owns_signals = False


def handle_signals_while_starting() -> None:
    """Until the CLI's `_serve` takes the signals over: SIGTERM or SIGINT ends the start
    quietly with status 0 (nothing is in flight), and SIGHUP, whose default would kill the
    process, is kept for later (`hup_while_starting`)."""

    global _owns_signals
    _owns_signals = True

    def stop(_signum: int, _frame: object) -> None:
        # Not SystemExit: a handler runs between any two bytecodes, also inside a weakref
        # callback or __del__ (an import's module lock has one), where the exception would be
        # printed with a traceback and swallowed, and the start would go on.
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(0)

    def hup(_signum: int, _frame: object) -> None:
        global _hup_while_starting
        _hup_while_starting = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, hup)


def hup_while_starting() -> bool:
    return _hup_while_starting


def owns_signals() -> bool:
    return _owns_signals
