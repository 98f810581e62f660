"""`--workers N`: N processes with their own event loops, sharing the port through
SO_REUSEPORT, and what they share besides: a metrics directory (any worker serves the pod's
totals) and the file of their session locks (one turn per session across workers).
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxy.cli import ServeOptions

# Set by the parent for its workers: the file of their shared session locks.
SESSION_LOCKS_ENV = "AGENTPROXY_SESSION_LOCK_FILE"
# What the parent passes on to every worker.
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# Past the drain deadline: the worker's ending grace (proxy/shutdown.py), its server's close,
# and a second more.
_DRAIN_MARGIN = 7.0
_POLL = 0.5


def run_workers(options: ServeOptions, worker: Callable[[ServeOptions], Any]) -> int:
    """N processes with their own event loops, sharing the port through SO_REUSEPORT."""
    from multiprocessing.connection import wait

    from prometheus_client.multiprocess import mark_process_dead

    metrics_dir, owned = _metrics_dir()
    if metrics_dir is None:
        return 1
    # The workers' shared session locks: a file in the run's own directory.
    os.environ[SESSION_LOCKS_ENV] = os.path.join(metrics_dir, "sessions.lock")
    ctx = multiprocessing.get_context("spawn")
    children = [
        ctx.Process(target=_start_worker, args=(worker, options))
        for _ in range(options.workers)
    ]
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = stopping or signum != signal.SIGHUP
        for child in children:
            if child.pid is not None and child.is_alive():
                os.kill(child.pid, signum)

    # Before the first worker starts: a signal in between would end this process alone.
    for signum in _FORWARDED:
        signal.signal(signum, forward)
    # A new worker is a fresh interpreter, killed by a SIGHUP (its default action) until its
    # handlers are set: the signals stay blocked while the workers start, and a worker, which
    # inherits the mask, holds what was sent to it until it can take it (_start_worker).
    signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)
    try:
        try:
            for child in children:
                child.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
        running = list(children)
        kill_at: float | None = None
        killed = False
        while running:
            if stopping and kill_at is None:
                # A worker's own drain ends by its deadline plus its grace; one still alive
                # after that is stuck (stopped, or blocked outside its event loop).
                kill_at = time.monotonic() + options.drain_timeout + _DRAIN_MARGIN
            # A signal does not end the wait (PEP 475): it is bounded so the stop is seen.
            timeout = _POLL if kill_at is None or killed else kill_at - time.monotonic()
            ended = wait([child.sentinel for child in running], max(timeout, 0.0))
            if not ended and kill_at is not None and not killed and time.monotonic() >= kill_at:
                killed = True
                for child in running:
                    print(f"agentproxy: worker {child.pid} did not finish its drain within "
                          f"{options.drain_timeout:g} s; killing it", file=sys.stderr,
                          flush=True)
                    child.kill()
            for child in [c for c in running if not c.is_alive()]:
                running.remove(child)
                child.join()
                # A dead worker's open streams must stop counting in the pod's gauges.
                mark_process_dead(child.pid, metrics_dir)  # type: ignore[no-untyped-call]
                if not stopping:
                    # Serving on with fewer workers would hide the loss from the supervisor:
                    # end them all (they drain), exit 1, and let it restart the proxy.
                    _report_lost(child.pid, child.exitcode)
                    forward(signal.SIGTERM, None)
    finally:
        if owned:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0 if all(child.exitcode == 0 for child in children) else 1


def _start_worker(worker: Callable[[ServeOptions], Any], options: ServeOptions) -> None:
    """A worker's first code: its start-up handlers set, the signals the parent blocked (and
    any that came meanwhile) are let in."""
    from proxy.process_setup import handle_signals_while_starting

    handle_signals_while_starting()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
    worker(options)


def _report_lost(pid: int | None, code: int | None) -> None:
    if code == 1:
        return  # the worker said why itself (it could not listen)
    if code is not None and code < 0:
        how = f"was killed by signal {-code} ({signal.strsignal(-code)})"
    else:
        how = f"exited with status {code}"
    print(f"agentproxy: worker {pid} {how}; stopping the other workers", file=sys.stderr,
          flush=True)


def _metrics_dir() -> tuple[str | None, bool]:
    """The directory where the workers keep their metrics, so that any one of them can serve
    the totals; set in the environment before the workers start, as prometheus_client reads it
    when it is imported. Returns (directory, whether this process made it)."""
    from proxy.metrics import MULTIPROC_ENV

    given = os.environ.get(MULTIPROC_ENV)
    try:
        if given:
            os.makedirs(given, exist_ok=True)
            # Files left by an earlier run would be added to this run's totals.
            for stale in Path(given).glob("*.db"):
                stale.unlink()
            return given, False
        made = tempfile.mkdtemp(prefix="agentproxy-metrics-")
    except OSError as exc:
        print(
            f"agentproxy: --workers needs a writable directory for metrics ({exc}); set "
            f"{MULTIPROC_ENV} or TMPDIR to one (in Kubernetes, an emptyDir volume)",
            file=sys.stderr,
        )
        return None, False
    os.environ[MULTIPROC_ENV] = made
    return made, True
