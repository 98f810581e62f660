"""The access log's CPU per request line: the `logging` path against the CLI's writer.

    python bench/access_log.py                   # text and json, into a pipe
    python bench/access_log.py --sink file       # into a file, as bench/run.py's server logs

Each case writes `--lines` lines of a finished streaming chat request (the fields a real one
has) the way the front does at the end of a request (`access_log.isEnabledFor`, then
`log_exchange`), `--per-turn` of them per event-loop turn, and prints the best time per line
over `--rounds` rounds, writes included; an event loop that only turns is timed first and
subtracted. `logging` is the path without a writer installed (a StreamHandler with the
proxy's formatter, as before the writer existed); `writer` is what `agentproxy serve` runs.
A sync request costs the proxy about 140-160 µs of CPU in all (docs/performance.md).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.access_log import AccessWriter, access_log, install, log_exchange
from proxy.logs import JsonFormatter, TextFormatter
from proxy.metrics import Exchange


def exchange() -> Exchange:
    ex = Exchange(0.0, "req_5d41402abc4b2a7600000001")
    ex.chat, ex.stream = True, True
    ex.model = ex.route = "mistral"
    ex.upstream, ex.status, ex.ttft = "vllm", 200, 0.01234
    return ex


@contextmanager
def sink(kind: str) -> Iterator[TextIO]:
    if kind == "devnull":
        with open(os.devnull, "w") as out:
            yield out
    elif kind == "file":
        with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "log", "w") as out:
            yield out
    else:  # a pipe to another process, as a container runtime reads stderr
        reader = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                  text=True)
        assert reader.stdin is not None
        try:
            yield reader.stdin
        finally:
            reader.stdin.close()
            reader.wait()


async def turns(lines: int, per_turn: int, write: Callable[[], None] | None) -> float:
    """CPU seconds to write `lines` lines, `per_turn` per loop turn (none: the turns alone)."""
    start = time.process_time()
    for _ in range(lines // per_turn):
        if write is not None:
            for _ in range(per_turn):
                write()
        await asyncio.sleep(0)
    await asyncio.sleep(0)  # the last turn's lines
    return time.process_time() - start


def measure(path: str, fmt: str, out: TextIO, args: argparse.Namespace) -> float:
    ex = exchange()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    install(AccessWriter(out, fmt) if path == "writer" else None)

    def write() -> None:
        if access_log.isEnabledFor(logging.INFO):
            log_exchange(ex.request_id, "POST", "/v1/chat/completions", ex, 0.0456, 2315)

    try:
        best = float("inf")
        for _ in range(args.rounds):
            idle = asyncio.run(turns(args.lines, args.per_turn, None))
            busy = asyncio.run(turns(args.lines, args.per_turn, write))
            best = min(best, (busy - idle) / args.lines)
        return best
    finally:
        install(None)
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sink", choices=("pipe", "file", "devnull"), default="pipe")
    p.add_argument("--lines", type=int, default=50_000)
    p.add_argument("--per-turn", type=int, default=8,
                   help="lines per event-loop turn (requests ending together; default 8)")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    print(f"µs of CPU per access line, into a {args.sink}, {args.per_turn} lines a loop turn, "
          f"best of {args.rounds} rounds of {args.lines:,}")
    print("| format | logging | writer | saved |")
    print("| --- | --: | --: | --: |")
    for fmt in ("text", "json"):
        with sink(args.sink) as out:
            slow = measure("logging", fmt, out, args)
            fast = measure("writer", fmt, out, args)
        print(f"| {fmt} | {slow * 1e6:.2f} | {fast * 1e6:.2f} | {(slow - fast) * 1e6:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
