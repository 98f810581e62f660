"""`--workers N` scaling: requests/s of agentproxy with N workers against one, interleaved.

On a machine with few cores the load generator and the upstream compete with the proxy for
the same CPUs, so a second worker can only show its worth where the proxy's own work is
most of the CPU spent per request. Two upstreams are measured:

* `echo` (default): the built-in echo model, answered by the proxy itself. The whole
  request path runs (key check, JSON parsing and validation, routing, metrics, logging
  decision, the response), and only wrk's small share of CPU is not the proxy's: this is
  the case where the proxy is the bottleneck, and it shows how throughput grows with the
  cores the workers get.
* `openai`: the usual `openai` route to bench/fake_upstream.py. The fake and wrk need CPU
  per request too, so on 2 cores the second worker mostly shows that the machine is full.

    python bench/workers.py                     # 1 vs 2 workers, echo, sync and stream
    python bench/workers.py --upstreams echo,openai --workers 1,2 --reps 3 --duration 10

Nothing is pinned: every process may use every CPU, as in a pod with N CPUs. wrk uses one
thread with 64 connections, which SO_REUSEPORT spreads over the workers. Prints the median
requests/s per (upstream, mode, workers) and the ratio to one worker.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

from process_groups import free_port
from run import (
    MODEL,
    REPO,
    Launcher,
    routes_yaml,
    run_wrk,
    settle,
    wait_ready,
)

BENCH = Path(__file__).resolve().parent


def echo_routes() -> str:
    return (
        "upstreams:\n"
        "  demo: {kind: echo}\n"
        "models:\n"
        f"  {MODEL}: {{upstream: demo}}\n"
        "auth:\n"
        '  keys: [{key: "${BENCH_KEY}"}]\n'
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--workers", default="1,2", help="worker counts to compare (1,2)")
    p.add_argument("--upstreams", default="echo", help="echo and/or openai (echo)")
    p.add_argument("--modes", default="sync,stream", help="sync and/or stream")
    p.add_argument("--concurrency", type=int, default=64, help="wrk connections (64)")
    p.add_argument("--reps", type=int, default=3, help="repetitions (3)")
    p.add_argument("--duration", type=float, default=8.0, help="seconds of wrk per run (8)")
    p.add_argument("--log-level", default="info",
                   help="agentproxy's --log-level: info (its default: an access line per "
                        "request) or warning (none)")
    args = p.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    upstreams = [u.strip() for u in args.upstreams.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    key = "sk-bench-" + secrets.token_hex(12)
    results: dict[tuple[str, str, int], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="agentproxy-workers-") as t:
        tmp = Path(t)
        launcher = Launcher(tmp, {})
        try:
            fake_url = ""
            if "openai" in upstreams:
                port = free_port()
                fake = launcher.start("fake", "load", [
                    sys.executable, str(BENCH / "fake_upstream.py"), "--port", str(port),
                    "--chunks", "50"], port)
                if (why := wait_ready(fake, key, 15.0)) is not None:
                    print(f"the fake upstream did not start: {why}", file=sys.stderr)
                    return 1
                fake_url = fake.url
            for rep in range(1, args.reps + 1):
                for upstream in upstreams:
                    routes = tmp / f"{upstream}.yaml"
                    routes.write_text(echo_routes() if upstream == "echo"
                                      else routes_yaml(fake_url))
                    for n in counts:
                        # A fresh server per run: each starts from the same state.
                        port = free_port()
                        env = {"BENCH_KEY": key, "PYTHONPATH": os.pathsep.join(
                            filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
                        server = launcher.start(
                            f"agentproxy-{upstream}-{n}", "server",
                            [sys.executable, "-m", "proxy", "serve", "--routes", str(routes),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", str(n),
                             "--log-level", args.log_level], port, env=env, cwd=REPO)
                        if (why := wait_ready(server, key, 30.0)) is not None:
                            print(f"agentproxy did not start: {why}", file=sys.stderr)
                            return 1
                        for mode in modes:
                            stream = mode == "stream"
                            run_wrk(server.url, key, stream, args.concurrency, 2, [])  # warm
                            settle(launcher)
                            r = run_wrk(server.url, key, stream, args.concurrency,
                                        args.duration, [])
                            errors = sum(int(v) for v in r["errors"].values())
                            results.setdefault((upstream, mode, n), []).append(r["rps"])
                            print(f"[{rep}/{args.reps}] {upstream:<6} {mode:<6} workers={n} "
                                  f"{r['rps']:>9,.0f} req/s"
                                  + (f"  ERRORS {errors}" if errors else ""),
                                  file=sys.stderr, flush=True)
                        launcher.stop(server)
                        time.sleep(0.5)
        finally:
            launcher.stop_all()
    print(f"| upstream | mode | workers | req/s (median of {args.reps}) | ÷ 1 worker |")
    print("|---|---|--:|--:|--:|")
    for upstream in upstreams:
        for mode in modes:
            base = statistics.median(results[(upstream, mode, counts[0])])
            for n in counts:
                rps = statistics.median(results[(upstream, mode, n)])
                print(f"| {upstream} | {mode} | {n} | {rps:,.0f} | {rps / base:.2f}x |")
    print(f"\n{os.cpu_count()} CPUs, nothing pinned; wrk -t1 -c{args.concurrency}, "
          f"{args.duration:g} s per run; --log-level {args.log_level}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
