"""`agentproxy serve` as a real process, for the tests of signals, workers and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import KEY

ROOT = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(r"listening on (http://127\.0\.0\.1:\d+) ")
_runs = itertools.count()


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    log: Path
    url: str

    def output(self) -> str:
        return self.log.read_text()

    async def exit_code(self, within: float = 60.0) -> int:
        return await asyncio.to_thread(self.proc.wait, within)


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, within: float = 20.0
) -> None:
    """Polls `check` until it holds; the deadline only bounds a failing test."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def _start(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("w") as out:
        # A group of its own: its `--workers` children are ended with it, never left behind.
        return subprocess.Popen(
            command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )


@asynccontextmanager
async def serve_process(
    routes: Path, *args: str, port: int = 0, workers: int = 1,
    env: dict[str, str] | None = None,
) -> AsyncIterator[Served]:
    """Runs `python -m proxy serve` on 127.0.0.1 and yields once every worker listens.

    Port 0 lets the kernel choose (read back from the log line); several workers must share
    one port, so they need a real one.
    """
    log = routes.parent / f"serve-{next(_runs)}.log"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AGENTPROXY_")}
    environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    environ["AGENTPROXY_API_KEYS"] = KEY
    environ.update(env or {})
    command = [
        sys.executable, "-m", "proxy", "serve", "--routes", str(routes), "--host", "127.0.0.1",
        "--port", str(port), "--workers", str(workers), *args,
    ]
    proc = _start(command, log, environ)
    try:
        urls: list[str] = []

        async def listening() -> bool:
            assert proc.poll() is None, f"serve exited:\n{log.read_text()}"
            urls[:] = _LISTENING.findall(log.read_text())
            return len(urls) >= workers

        await eventually(listening, "the proxy to listen", within=30.0)
        yield Served(proc, log, urls[0])
    finally:
        if proc.poll() is None:
            # SIGTERM first: a parent killed outright leaves its workers' metrics directory
            # in the temporary directory.
            proc.terminate()
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()
        await asyncio.to_thread(proc.wait, 30)
        # Workers outlive a killed parent: end whatever is left of the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
