"""The servers a benchmark starts, each in a session of its own: Ctrl-C then reaches only the
benchmark, and stopping a server ends its whole process group, workers it forked included;
and their logs, cut to a size worth keeping.

Imported by the scripts as `process_groups`: running `python bench/X.py` puts bench/ on
sys.path.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

# A server log over twice this size keeps only its head and tail after the run: with the
# access log on, agentproxy writes a line per request, over 100 MB in a full bench/run.py.
LOG_KEEP = 1 << 20


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_in_session(
    cmd: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Starts `cmd` with stdout and stderr in `log_path`; `env` is its whole environment
    (None: this process's)."""
    with log_path.open("wb") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=cwd, start_new_session=True,
        )


def signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def wait_or_kill(proc: subprocess.Popen[bytes], grace: float) -> None:
    """Gives `proc` `grace` seconds to exit, then kills its group."""
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        signal_group(proc, signal.SIGKILL)
        proc.wait(timeout=5)


def stop_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM to the group of a running `proc`; SIGKILL if it is still there after `grace` s."""
    if proc.poll() is None:
        signal_group(proc, signal.SIGTERM)
        wait_or_kill(proc, grace)


def trim_log(path: Path, keep: int = LOG_KEEP) -> None:
    """Cuts a server log to its first and last `keep` bytes (startup and the end are what
    explain a failure; the access lines between are one per request)."""
    size = path.stat().st_size
    if size <= 2 * keep:
        return
    with path.open("rb") as f:
        head = f.read(keep)
        f.seek(size - keep)
        tail = f.read()
    cut = f"\n[... {size - 2 * keep:,} bytes cut by the benchmark ...]\n".encode()
    path.write_bytes(head + cut + tail)
