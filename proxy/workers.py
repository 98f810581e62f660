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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxy.cli import ServeOptions

# Set by the parent for its workers: the file of their shared session locks.
SESSION_LOCKS_ENV = "AGENTPROXY_SESSION_LOCK_FILE"


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
    children = [ctx.Process(target=worker, args=(options,)) for _ in range(options.workers)]
    try:
        for child in children:
            child.start()

        def forward(signum: int, _frame: object) -> None:
            for child in children:
                if child.pid is not None and child.is_alive():
                    os.kill(child.pid, signum)

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, forward)
        running = list(children)
        while running:
            wait([child.sentinel for child in running])
            for child in [c for c in running if not c.is_alive()]:
                running.remove(child)
                child.join()
                # A dead worker's open streams must stop counting in the pod's gauges.
                mark_process_dead(child.pid, metrics_dir)  # type: ignore[no-untyped-call]
    finally:
        if owned:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0 if all(child.exitcode == 0 for child in children) else 1


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
