"""CPU instructions per request, counted by valgrind's callgrind: an A/B that noise cannot move.

On a shared machine the same req/s cell moves by 10-30 % from one minute to the next, which
hides the few per cent a change to the request path makes. The count of instructions the
server executes per request does not depend on the neighbours: run twice, the same tree
gives the same figure within about 0.2 %. It is not time (a cache miss or a system call costs
far more than an instruction, and the kernel's share is not counted), so it is the tool to
compare two versions of the proxy's own code, and bench/run.py stays the measure of speed.

Each target runs alone under callgrind with instrumentation off; after a warm-up of wrk
the counting is switched on for `--duration` seconds of load, then off, and the count is
divided by the requests wrk completed meanwhile. One connection by default: every request
then runs alone, so the count does not depend on how many requests an event-loop turn
happens to batch (with 16 connections it moves by about 3 % from run to run, with one by
0.2 %).

    python bench/instructions.py                                  # agentproxy and the relay
    python bench/instructions.py --baseline ../before             # and the tree in ../before
    python bench/instructions.py --modes sync,responses-sync --log

Needs valgrind (`apt-get install valgrind`) and wrk. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from process_groups import free_port, start_in_session, stop_group

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
LUA = {"chat": BENCH / "wrk" / "chat.lua", "responses": BENCH / "wrk" / "responses.lua"}
PATHS = {"chat": "/v1/chat/completions", "responses": "/v1/responses"}
MODES = ("sync", "stream", "responses-sync", "responses-stream")


def routes_yaml(fake_url: str) -> str:
    return (
        "upstreams:\n"
        f"  fake: {{kind: openai, url: {fake_url}/v1}}\n"
        "models:\n"
        "  bench: {upstream: fake, model: fake-model}\n"
        "auth:\n"
        '  keys: [{key: "${BENCH_KEY}"}]\n'
    )


def wait_http(url: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except urllib.error.HTTPError:
            return  # it answers: the relay has no /healthz
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"no answer from {url}")


def wrk(url: str, lua: Path, seconds: int, env: dict[str, str], connections: int) -> int:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(lua), url],
        capture_output=True, text=True, env=env, check=True,
    ).stdout
    match = re.search(r"(\d+) requests in", out)
    if match is None:
        raise SystemExit(f"wrk printed no request count:\n{out}")
    return int(match.group(1))


def count(
    name: str, cmd: list[str], env: dict[str, str], cwd: Path, mode: str, key: str,
    args: argparse.Namespace, tmp: Path,
) -> float:
    """Instructions per request of the server `cmd` (which listens on env's PORT) in `mode`."""
    port = int(env["PORT"])
    out = tmp / f"callgrind.{name}.{mode}.%p"
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--trace-children=yes",
                f"--callgrind-out-file={out}"]
    log_path = tmp / f"{name}.{mode}.log"
    proc = start_in_session([*valgrind, *cmd], log_path, env={**os.environ, **env}, cwd=cwd)
    api = "responses" if mode.startswith("responses") else "chat"
    url = f"http://127.0.0.1:{port}{PATHS[api]}"
    wrk_env = {**os.environ, "KEY": key, "STREAM": "1" if mode.endswith("stream") else "0"}
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", time.monotonic() + 180)
        wrk(url, LUA[api], 3, wrk_env, args.connections)
        subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], check=True,
                       capture_output=True)
        requests = wrk(url, LUA[api], args.duration, wrk_env, args.connections)
        subprocess.run(["callgrind_control", "-i", "off", str(proc.pid)], check=True,
                       capture_output=True)
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True,
                       capture_output=True)
    finally:
        stop_group(proc, 10.0)
    total = 0
    for dump in tmp.glob(f"callgrind.{name}.{mode}.*"):
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
        dump.unlink()
    return total / max(requests, 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", type=Path, help="another checkout to count beside this one")
    p.add_argument("--modes", default="sync", help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--duration", type=int, default=20, help="seconds counted per target")
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--log", action="store_true",
                   help="agentproxy with its default access log (else --log-level warning)")
    p.add_argument("--no-relay", action="store_true", help="leave the bare relay out")
    p.add_argument("--delay-chunk", type=float, default=0.0,
                   help="fake: seconds between a stream's events (0: as fast as it can). "
                        "Under valgrind the server runs tens of times slower than the fake, "
                        "so without a delay it reads a stream in a few big reads; a model "
                        "server's tokens come apart, one event per read (0.002 gives that)")
    args = p.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if any(m not in MODES for m in modes):
        p.error(f"--modes: one of {', '.join(MODES)}")
    for tool in ("valgrind", "callgrind_control", "wrk"):
        if shutil.which(tool) is None:
            p.error(f"{tool} is not installed")

    key = "sk-bench-" + secrets.token_hex(12)
    with tempfile.TemporaryDirectory(prefix="agentproxy-instr-") as name:
        tmp = Path(name)
        fake = start_in_session(
            [sys.executable, str(BENCH / "fake_upstream.py"), "--port", "0",
             "--delay-chunk", str(args.delay_chunk)], tmp / "fake.log"
        )
        try:
            deadline = time.monotonic() + 30
            while not (tmp / "fake.log").read_text().strip() and time.monotonic() < deadline:
                time.sleep(0.1)
            fake_url = f"http://127.0.0.1:{(tmp / 'fake.log').read_text().split()[0]}"
            routes = tmp / "routes.yaml"
            routes.write_text(routes_yaml(fake_url))
            level = [] if args.log else ["--log-level", "warning"]
            trees = {"agentproxy": REPO}
            if args.baseline is not None:
                trees["before"] = args.baseline.resolve()
            rows: list[tuple[str, str, float]] = []
            for mode in modes:
                for target, tree in trees.items():
                    port = str(free_port())
                    cmd = [sys.executable, "-m", "proxy", "serve", "--routes", str(routes),
                           "--host", "127.0.0.1", "--port", port, "--workers", "1", *level]
                    env = {"BENCH_KEY": key, "PORT": port, "PYTHONPATH": str(tree)}
                    rows.append((mode, target, count(target, cmd, env, tree, mode, key, args,
                                                     tmp)))
                    print(f"{mode} {target}: {rows[-1][2]:,.0f}", file=sys.stderr, flush=True)
                if not args.no_relay and mode in ("sync", "stream"):
                    port = str(free_port())
                    cmd = [sys.executable, str(BENCH / "bare_relay.py"), "--port", port,
                           "--upstream", f"{fake_url}/v1"]
                    rows.append((mode, "relay", count("relay", cmd, {"PORT": port}, BENCH, mode,
                                                      key, args, tmp)))
                    print(f"{mode} relay: {rows[-1][2]:,.0f}", file=sys.stderr, flush=True)
        finally:
            stop_group(fake, 5.0)

    print("| mode | target | instructions per request | ÷ agentproxy |")
    print("| --- | --- | --: | --: |")
    for mode, target, per in rows:
        ours = next(v for m, t, v in rows if m == mode and t == "agentproxy")
        print(f"| {mode} | {target} | {per:,.0f} | {per / ours:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
