"""Run the benchmark matrix and print a markdown table of medians.

Cells are {sync, stream} x {concurrency 1, 64} of chat completions, and with
`--modes responses-sync,responses-stream` the same on `POST /v1/responses`; targets are the
fake upstream itself (`direct`), agentproxy with one worker in front of it as a user starts it
(`agentproxy`: its access log on, one line per request) and without the access log
(`agentproxy-quiet`: `--log-level warning`), the bare aiohttp relay (the ceiling for an aiohttp
proxy) and, with --litellm, the LiteLLM proxy. With `--baseline PATH`, agentproxy from another
checkout (`before`, `before-quiet`) runs beside this one, for an A/B of two trees in one run.
Runs are interleaved: every repetition visits every cell, and every cell every target in turn,
so drift on the machine (thermal, noisy neighbours) spreads over all targets instead of
biasing one.

    python bench/run.py --quick                 # one short repetition, about a minute
    python bench/run.py                         # 3 repetitions of 10 s per cell
    python bench/run.py --litellm               # also LiteLLM (installed on first use)
    python bench/run.py --baseline ../before    # A/B: this tree against the one in ../before
    python bench/run.py --modes sync,stream,responses-sync,responses-stream

Needs wrk (`apt-get install wrk`). Raw results go to bench/results/run-<time>.json, server
logs beside them. See bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from process_groups import free_port, start_in_session, stop_group, trim_log

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
LUA = {"chat": BENCH / "wrk" / "chat.lua", "responses": BENCH / "wrk" / "responses.lua"}
LITELLM_VENV = BENCH / ".litellm-venv"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MODEL = "bench"
ALL_TARGETS = ("direct", "agentproxy", "agentproxy-quiet", "before", "before-quiet", "relay",
               "litellm")
PROXIES = ("agentproxy", "agentproxy-quiet")
# With --baseline: the same target started from the other checkout, and the one it is A/B'd with.
BASELINES = {"before": "agentproxy", "before-quiet": "agentproxy-quiet"}
AGENTPROXIES = (*PROXIES, *BASELINES)
MODES = ("sync", "stream", "responses-sync", "responses-stream")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes


@dataclass
class Server:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    # Why the server has no Responses cells (None: it answers /v1/responses, or none asked).
    no_responses: str | None = None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Launcher:
    """Starts servers in their own sessions and always stops them, whole process groups."""

    log_dir: Path
    pin: dict[str, str]
    servers: list[Server] = field(default_factory=list)

    def prefix(self, role: str) -> list[str]:
        cpus = self.pin.get(role)
        return ["taskset", "-c", cpus] if cpus else []

    def start(
        self, name: str, role: str, cmd: Sequence[str], port: int,
        env: dict[str, str] | None = None, cwd: Path | None = None,
    ) -> Server:
        log_path = self.log_dir / f"{name}.log"
        # A session of its own, so that stop() also ends the workers LiteLLM's uvicorn forks.
        proc = start_in_session(
            [*self.prefix(role), *cmd], log_path, {**os.environ, **(env or {})}, cwd
        )
        server = Server(name, f"http://127.0.0.1:{port}", proc, log_path)
        self.servers.append(server)
        return server

    def stop(self, server: Server) -> None:
        proc = server.proc
        stop_group(proc, 10)
        # Workers may outlive a leader that exited first; the group id still names them.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if server in self.servers:
            self.servers.remove(server)

    def stop_all(self) -> None:
        for server in reversed(list(self.servers)):
            self.stop(server)


def post_chat(url: str, key: str, stream: bool, timeout: float = 5.0,
              api: str = "chat") -> tuple[int, bytes]:
    """One request of the bench's body: a chat completion, or with `api="responses"` the same
    question to /v1/responses (what bench/wrk/responses.lua sends)."""
    if api == "responses":
        path = "/v1/responses"
        body = json.dumps({"model": MODEL, "input": "hi", "stream": stream}).encode()
    else:
        path = "/v1/chat/completions"
        body = json.dumps({
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream,
        }).encode()
    req = urllib.request.Request(
        url + path, data=body, method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


def wait_ready(server: Server, key: str, timeout: float) -> str | None:
    """None once the server answers a chat completion with 200, else why it did not."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            return f"exited with code {server.proc.returncode}"
        try:
            status, body = post_chat(server.url, key, stream=False, timeout=2.0)
        except (OSError, urllib.error.URLError) as exc:
            last = str(exc)
        else:
            if status == 200:
                return None
            last = f"HTTP {status}: {body[:200]!r}"
        time.sleep(0.25)
    return f"not ready after {timeout:.0f} s ({last})"


def check_stream(server: Server, key: str, chunks: int) -> str | None:
    """None when one stream through the server carries the expected events and [DONE]."""
    try:
        status, body = post_chat(server.url, key, stream=True, timeout=10.0)
    except (OSError, urllib.error.URLError) as exc:
        return str(exc)
    if status != 200:
        return f"HTTP {status}: {body[:200]!r}"
    data = [ln[5:].strip() for ln in body.replace(b"\r\n", b"\n").split(b"\n")
            if ln.startswith(b"data:")]
    if not data or data[-1] != b"[DONE]":
        return "stream did not end with data: [DONE]"
    if len(data) - 1 != chunks:
        return f"{len(data) - 1} data events before [DONE], the fake sent {chunks}"
    return None


def check_responses(server: Server, key: str, chunks: int) -> str | None:
    """None when the server answers /v1/responses: a completed sync response, and a stream
    of one `response.output_text.delta` per content event of the fake (chunks - 2), ending in
    `response.completed` and `data: [DONE]`."""
    try:
        status, body = post_chat(server.url, key, stream=False, timeout=10.0, api="responses")
        if status != 200:
            return f"sync: HTTP {status}: {body[:200]!r}"
        if json.loads(body).get("status") != "completed":
            return f"sync: not completed: {body[:200]!r}"
        status, body = post_chat(server.url, key, stream=True, timeout=10.0, api="responses")
    except (OSError, urllib.error.URLError, ValueError) as exc:
        return str(exc)
    if status != 200:
        return f"stream: HTTP {status}: {body[:200]!r}"
    lines = body.replace(b"\r\n", b"\n").split(b"\n")
    names = [ln[6:].strip() for ln in lines if ln.startswith(b"event:")]
    data = [ln[5:].strip() for ln in lines if ln.startswith(b"data:")]
    if not data or data[-1] != b"[DONE]":
        return "stream did not end with data: [DONE]"
    if not names or names[-1] != b"response.completed":
        return f"stream's last event is {names[-1:]!r}, not response.completed"
    deltas = names.count(b"response.output_text.delta")
    if deltas != chunks - 2:
        return f"{deltas} response.output_text.delta events, the fake sent {chunks - 2} contents"
    return None


# --------------------------------------------------------------------------- /proc readings


def process_tree(pid: int) -> list[int]:
    """pid and its live descendants (LiteLLM and multi-worker servers fork)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def cpu_ticks(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime, fields 14 and 15
    return total


def reset_peak_rss(pids: Sequence[int]) -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0) so each run reports its own peak."""
    ok = True
    for pid in pids:
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            ok = False
    return ok


def parse_cpus(spec: str) -> set[int]:
    """taskset's list syntax: "0", "0,2", "0-3"."""
    cpus: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def set_affinity(pids: Sequence[int], cpus: set[int]) -> None:
    """Moves every thread of every process: sched_setaffinity acts on one thread only."""
    for pid in pids:
        try:
            tids = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
        except OSError:
            continue
        for tid in tids:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, cpus)


def cpu_times(cpus: set[int]) -> tuple[int, int, int]:
    """(busy, total, steal) jiffies summed over `cpus`, from /proc/stat."""
    busy = total = steal = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *vals = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        v = [int(x) for x in vals]
        # guest time is already inside user time; idle and iowait are the idle parts.
        t = sum(v[:8])
        busy += t - v[3] - v[4]
        total += t
        steal += v[7] if len(v) > 7 else 0
    return busy, total, steal


def peak_rss_kib(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def settle(launcher: Launcher, timeout: float = 30.0) -> float:
    """Waits until every launched server is idle; returns the seconds it took.

    A server that fell behind (LiteLLM at concurrency 64) keeps working on requests the load
    generator already gave up on; on a shared CPU that work would be billed to the next target.
    """
    start = time.monotonic()
    pids = [p for s in launcher.servers for p in process_tree(s.proc.pid)]
    before = cpu_ticks(pids)
    while time.monotonic() - start < timeout:
        time.sleep(0.25)
        now = cpu_ticks(pids)
        if now - before <= 1:  # one clock tick (10 ms at 100 Hz) in 0.25 s: idle
            break
        before = now
    else:
        log(f"warning: servers still busy after {timeout:.0f} s; measuring anyway")
    return time.monotonic() - start


# --------------------------------------------------------------------------- load generators


def run_wrk(
    url: str, key: str, stream: bool, concurrency: int, duration: float, pin: list[str],
    api: str = "chat",
) -> dict[str, Any]:
    cmd = [*pin, "wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(duration))}s",
           "--timeout", "10s", "--latency", "-s", str(LUA[api]), url]
    env = {**os.environ, "KEY": key, "MODEL": MODEL, "STREAM": "1" if stream else "0"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True,
                         timeout=duration + 60, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("WRK_JSON "):
            result: dict[str, Any] = json.loads(line[len("WRK_JSON "):])
            return result
    raise RuntimeError(f"wrk gave no summary (exit {out.returncode}): {out.stderr.strip()}")


def run_ttft(
    url: str, key: str, concurrency: int, duration: float, chunks: int, pin: list[str],
    api: str = "chat",
) -> dict[str, Any]:
    cmd = [*pin, sys.executable, str(BENCH / "ttft.py"), "--url", url, "--key", key,
           "--model", MODEL, "--concurrency", str(concurrency), "--duration", str(duration),
           "--chunks", str(chunks), "--api", api, "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 90, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"ttft.py failed (exit {out.returncode}): {out.stderr.strip()[-500:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# --------------------------------------------------------------------------- targets


def routes_yaml(fake_url: str) -> str:
    return (
        "upstreams:\n"
        f"  fake: {{kind: openai, url: {fake_url}/v1}}\n"
        "models:\n"
        f"  {MODEL}: {{upstream: fake, model: fake-model}}\n"
        "auth:\n"
        '  keys: [{key: "${BENCH_KEY}"}]\n'
    )


def litellm_config(fake_url: str, key: str) -> str:
    # JSON is YAML: no YAML writer needed here.
    return json.dumps({
        "model_list": [{
            "model_name": MODEL,
            "litellm_params": {
                "model": "openai/fake-model", "api_base": f"{fake_url}/v1", "api_key": "x",
            },
        }],
        "general_settings": {"master_key": key},
        "litellm_settings": {"telemetry": False},
    }, indent=2)


def ensure_litellm() -> Path | None:
    """LiteLLM's proxy in its own virtualenv under bench/, installed on first use."""
    exe = LITELLM_VENV / "bin" / "litellm"
    if exe.exists():
        return exe
    log(f"installing litellm[proxy] into {LITELLM_VENV.relative_to(REPO)} (first use only)")
    try:
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True,
                       timeout=300)
        subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"],
                       check=True, timeout=1200)
    except (subprocess.SubprocessError, OSError) as exc:
        log(f"LiteLLM skipped: its install failed ({exc}); rerun without --litellm, or fix the "
            f"install and remove {LITELLM_VENV.relative_to(REPO)} to retry")
        return None
    return exe if exe.exists() else None


def start_target(
    name: str, launcher: Launcher, fake_url: str, key: str, tmp: Path, args: argparse.Namespace,
) -> Server | str:
    """The running server for `name`, or why it could not be started."""
    port = free_port()
    common = ["--host", "127.0.0.1", "--port", str(port)]
    timeout = 30.0
    if name in AGENTPROXIES:
        routes = tmp / "routes.yaml"
        routes.write_text(routes_yaml(fake_url))
        # `agentproxy` as `agentproxy serve` runs by default: text access log on stderr (to
        # the server's log file here, as a container runtime or a redirect would take it).
        quiet = ["--log-level", "warning"] if name.endswith("-quiet") else []
        flags = ["serve", "--routes", str(routes), *common, "--workers", "1", *quiet]
        if name in BASELINES:
            # The other checkout's package, from its own directory: the same flags and
            # Python (the trees share their dependencies), never --proxy-cmd, which would
            # start this tree's installed entry point.
            tree: Path = args.baseline
            cmd = [sys.executable, "-m", "proxy", *flags]
        else:
            tree = REPO
            cmd = [*(shlex.split(args.proxy_cmd) if args.proxy_cmd
                     else [sys.executable, "-m", "proxy"]), *flags]
        # The checkout's own package, installed or not.
        env = {"BENCH_KEY": key, "PYTHONPATH": python_path(tree)}
        server = launcher.start(name, "server", cmd, port, env=env, cwd=tree)
    elif name == "relay":
        cmd = [sys.executable, str(BENCH / "bare_relay.py"), *common,
               "--upstream", f"{fake_url}/v1"]
        server = launcher.start(name, "server", cmd, port)
    elif name == "litellm":
        exe = ensure_litellm()
        if exe is None:
            return "LiteLLM is not installed"
        cfg = tmp / "litellm.yaml"
        cfg.write_text(litellm_config(fake_url, key))
        cmd = [str(exe), "--config", str(cfg), *common, "--num_workers", "1"]
        # Offline start (its price list ships with it, no telemetry) and no per-request log
        # lines: compare it with agentproxy-quiet, which writes none either.
        env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False",
               "LITELLM_LOG": "ERROR", "DISABLE_SCHEMA_UPDATE": "True"}
        server = launcher.start(name, "server", cmd, port, env=env)
        timeout = 180.0
    else:
        raise ValueError(name)
    why = wait_ready(server, key, timeout)
    if why is None:
        wrong = check_stream(server, key, args.chunks)
        if wrong is not None:
            log(f"warning: {name} streams wrongly ({wrong}); measuring it anyway")
        if any(c.api == "responses" for c in args.cells):
            if name not in AGENTPROXIES:
                server.no_responses = "no Responses API (its chat cells are the reference)"
            elif (wrong := check_responses(server, key, args.chunks)) is not None:
                server.no_responses = f"/v1/responses does not work: {wrong}"
                log(f"{name}: no Responses cells ({wrong})")
        return server
    log(f"{name} skipped: {why}\n--- last lines of {server.log_path}:\n{server.tail()}\n---")
    launcher.stop(server)
    return why


def python_path(tree: Path) -> str:
    """PYTHONPATH that imports `proxy` from `tree`, ahead of any installed copy."""
    return os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))


def check_baseline(tree: Path) -> str | None:
    """None when `python -m proxy` started in `tree` imports that tree's package, else why
    not (an editable install of this checkout must not win over it)."""
    if not (tree / "proxy" / "__main__.py").is_file():
        return f"{tree} has no proxy/__main__.py: not an agentproxy checkout"
    out = subprocess.run(
        [sys.executable, "-c", "import proxy; print(proxy.__file__)"], cwd=tree,
        env={**os.environ, "PYTHONPATH": python_path(tree)}, capture_output=True, text=True,
        timeout=60, check=False,
    )
    if out.returncode != 0:
        return f"importing proxy in {tree} failed: {out.stderr.strip()[-500:]}"
    where = Path(out.stdout.strip()).resolve()
    if not where.is_relative_to(tree.resolve()):
        return f"python -m proxy in {tree} imports {where}, not that tree's package"
    return None


# --------------------------------------------------------------------------- the matrix


@dataclass(frozen=True)
class Cell:
    mode: str  # one of MODES
    concurrency: int
    # Measured only for the targets without a Responses API, as the reference of a
    # Responses cell whose chat mode was not asked for.
    reference: bool = False

    @property
    def label(self) -> str:
        return f"{self.mode} c={self.concurrency}"

    @property
    def api(self) -> str:
        """chat (/v1/chat/completions) or responses (/v1/responses)."""
        return "responses" if self.mode.startswith("responses-") else "chat"

    @property
    def stream(self) -> bool:
        return self.mode.endswith("stream")

    @property
    def chat_label(self) -> str:
        """The chat cell of the same mode and concurrency: a Responses cell's reference for
        the targets that have no Responses API (the relay)."""
        return f"{self.mode.removeprefix('responses-')} c={self.concurrency}"


def measure(
    cell: Cell, target: str, server: Server, fake: Server, key: str, args: argparse.Namespace,
    pin: dict[str, str], load_pin: list[str],
) -> dict[str, Any]:
    stream = cell.stream
    tree = process_tree(server.proc.pid)
    fake_tree = process_tree(fake.proc.pid)
    placement = "load CPUs" if pin and server is fake else "unpinned"
    if pin and server is not fake:
        # At concurrency 1 the chain is serial, so a second CPU adds no parallelism, only a
        # wake-up of an idle vCPU at every hop; on a VM that costs up to milliseconds and
        # swamps what a proxy adds. Sharing one CPU then measures the proxy, not the
        # hypervisor. With many requests in flight, the server gets its own CPU.
        shared = cell.concurrency == 1 and args.c1_placement == "shared"
        set_affinity(tree, parse_cpus(pin["load" if shared else "server"]))
        placement = "shared" if shared else "split"
    watched = parse_cpus(pin["load"]) if pin else set(range(os.cpu_count() or 1))
    rss_reset = reset_peak_rss(tree)
    cpu0, fake0, sys0 = cpu_ticks(tree), cpu_ticks(fake_tree), cpu_times(watched)
    wrk = run_wrk(server.url, key, stream, cell.concurrency, args.duration, load_pin, cell.api)
    cpu1, fake1, sys1 = cpu_ticks(tree), cpu_ticks(fake_tree), cpu_times(watched)
    rss = peak_rss_kib(tree)
    requests = max(1, int(wrk["requests"]))
    cpu_ms = (cpu1 - cpu0) * 1000 / CLK_TCK
    fake_ms = (fake1 - fake0) * 1000 / CLK_TCK
    wall_ms = wrk["duration_us"] / 1000
    span = max(1, sys1[1] - sys0[1])
    ttft = None
    if stream and args.ttft_duration > 0:
        ttft = run_ttft(server.url, key, cell.concurrency, args.ttft_duration, args.chunks,
                        load_pin, cell.api)
    errs = wrk["errors"]
    return {
        "mode": cell.mode, "concurrency": cell.concurrency, "target": target,
        "wrk": wrk, "ttft": ttft,
        "rps": wrk["rps"],
        "p50_ms": wrk["latency_us"]["p50"] / 1000, "p99_ms": wrk["latency_us"]["p99"] / 1000,
        "ttft_p50_ms": ttft["ttft_ms"]["p50"] if ttft else None,
        "ttft_p99_ms": ttft["ttft_ms"]["p99"] if ttft else None,
        "errors": sum(int(v) for v in errs.values()) + (sum(ttft["errors"].values()) if ttft
                                                          else 0),
        "placement": placement,
        "cpu_ms": cpu_ms,
        # Measured directly, the fake is the server under test: its figures are not a proxy's,
        # so the table leaves them out; the raw file keeps them as fake_*.
        "cpu_ms_per_req": cpu_ms / requests if target != "direct" else None,
        "server_cpu_pct": 100 * cpu_ms / wall_ms if target != "direct" else None,
        "load_cpu_pct": 100 * (sys1[0] - sys0[0]) / span * len(watched),
        "load_steal_pct": 100 * (sys1[2] - sys0[2]) / span * len(watched),
        "fake_cpu_pct": 100 * fake_ms / wall_ms,
        "rss_peak_kib": rss if target != "direct" else None,
        "rss_reset": rss_reset,
        "fake_cpu_ms_per_req": fake_ms / requests,
    }


def measured(cell: Cell, target: str, server: Server) -> bool:
    """Whether `target` has a run in `cell`: Responses cells only on the agentproxy targets
    that answer /v1/responses; reference cells only on the others."""
    if target in AGENTPROXIES:
        return not cell.reference and (cell.api == "chat" or server.no_responses is None)
    return cell.api == "chat"


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarise(runs: list[dict[str, Any]], cells: list[Cell], targets: list[str]
              ) -> dict[tuple[str, str], dict[str, float | None]]:
    keys = ("rps", "p50_ms", "p99_ms", "ttft_p50_ms", "ttft_p99_ms", "cpu_ms_per_req",
            "rss_peak_kib", "errors", "server_cpu_pct", "load_cpu_pct", "load_steal_pct")
    out: dict[tuple[str, str], dict[str, float | None]] = {}
    for cell in cells:
        for target in targets:
            mine = [r for r in runs if r["mode"] == cell.mode
                    and r["concurrency"] == cell.concurrency and r["target"] == target]
            if mine:
                out[(cell.label, target)] = {k: median_of(mine, k) for k in keys}
                out[(cell.label, target)]["n"] = len(mine)
    return out


def fmt(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def ratio_row(cell: str, t: str, ref: str, a: dict[str, float | None],
              b: dict[str, float | None], extra: str | None = None) -> str:
    first = f"| {cell} | {t} | {ref} " + ("" if extra is None else f"| {extra} ")
    return (f"{first}| {ratio(a['rps'], b['rps'])} "
            f"| {ratio(a['p50_ms'], b['p50_ms'])} | {ratio(a['p99_ms'], b['p99_ms'])} "
            f"| {ratio(a['ttft_p50_ms'], b['ttft_p50_ms'])} "
            f"| {ratio(a['cpu_ms_per_req'], b['cpu_ms_per_req'])} "
            f"| {ratio(a['rss_peak_kib'], b['rss_peak_kib'])} |")


def per_rep_rps(runs: list[dict[str, Any]], cell: Cell, a: str, b: str) -> str:
    """req/s of `a` over `b` in each repetition of `cell` (the same round of the interleave)."""
    def rps(target: str) -> dict[int, float]:
        return {r["rep"]: r["rps"] for r in runs if r["target"] == target
                and r["mode"] == cell.mode and r["concurrency"] == cell.concurrency}

    mine, theirs = rps(a), rps(b)
    return ", ".join(f"{mine[rep] / theirs[rep]:.2f}" for rep in sorted(mine)
                     if theirs.get(rep)) or "-"


def tables(summary: dict[tuple[str, str], dict[str, float | None]], cells: list[Cell],
           targets: list[str], runs: list[dict[str, Any]] | None = None) -> str:
    lines = [
        "| cell | target | req/s | p50 ms | p99 ms | TTFT p50 ms | TTFT p99 ms "
        "| CPU ms/req | peak RSS MiB | server CPU % | load CPU % | errors |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for cell in cells:
        for t in targets:
            s = summary.get((cell.label, t))
            if s is None:
                continue
            rss = s["rss_peak_kib"]
            lines.append(
                f"| {cell.label} | {t} | {fmt(s['rps'], 0)} | {fmt(s['p50_ms'], 2)} "
                f"| {fmt(s['p99_ms'], 2)} | {fmt(s['ttft_p50_ms'], 2)} "
                f"| {fmt(s['ttft_p99_ms'], 2)} | {fmt(s['cpu_ms_per_req'], 3)} "
                f"| {fmt(None if rss is None else rss / 1024, 1)} "
                f"| {fmt(s['server_cpu_pct'], 0)} | {fmt(s['load_cpu_pct'], 0)} "
                f"| {fmt(s['errors'], 0)} |"
            )
    refs = [r for r in ("direct", "relay", "litellm") if r in targets]
    rows = []
    for cell in cells:
        for t in (x for x in (*AGENTPROXIES, "litellm", "relay") if x in targets):
            a = summary.get((cell.label, t))
            if a is None:
                continue
            for ref in refs:
                # The references have no Responses API: a Responses cell is held against
                # their chat cell of the same mode and concurrency (the same question asked
                # the other way, to the same fake upstream).
                ref_label = cell.chat_label if cell.api == "responses" else cell.label
                b = summary.get((ref_label, ref))
                if ref != t and b is not None:
                    shown = f"{ref} (chat)" if cell.api == "responses" else ref
                    rows.append(ratio_row(cell.label, t, shown, a, b))
            own = summary.get((cell.chat_label, t))
            if cell.api == "responses" and own is not None:
                # The price of the Responses translation over the chat pass-through.
                rows.append(ratio_row(cell.label, t, f"{t} (chat)", a, own))
    if rows:
        lines += [
            "",
            "Ratios of medians, target ÷ reference (req/s: higher is better; the rest: lower):",
            "",
            "| cell | target | ÷ | req/s | p50 | p99 | TTFT p50 | CPU/req | peak RSS |",
            "|---|---|---|--:|--:|--:|--:|--:|--:|",
            *rows,
        ]
    ab = []
    for cell in cells:
        for before, after in BASELINES.items():
            a, b = summary.get((cell.label, after)), summary.get((cell.label, before))
            if a is None or b is None:
                continue
            reps = per_rep_rps(runs or [], cell, after, before)
            ab.append(ratio_row(cell.label, after, before, a, b, reps))
    if ab:
        lines += [
            "",
            "A/B, this tree ÷ the --baseline tree, interleaved in the same run (req/s: higher "
            "is better; the rest: lower; req/s per repetition in the fourth column):",
            "",
            "| cell | after | before | req/s per rep | req/s | p50 | p99 | TTFT p50 | CPU/req "
            "| peak RSS |",
            "|---|---|---|---|--:|--:|--:|--:|--:|--:|",
            *ab,
        ]
    return "\n".join(lines)


def pin_text(pin: dict[str, str], args: argparse.Namespace) -> str:
    if not pin:
        return "none"
    text = f"server under test on CPU {pin['server']}, fake+wrk+ttft.py on CPU {pin['load']}"
    if args.c1_placement == "shared":
        text += f" (concurrency-1 cells: all on CPU {pin['load']})"
    return text


def cmd_out(cmd: list[str], cwd: Path = REPO) -> str:
    # GIT_OPTIONAL_LOCKS=0: `git status` must not take the index lock others may need.
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False,
                             cwd=cwd, env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
    except (OSError, subprocess.SubprocessError):
        return ""
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else ""


def git_info(tree: Path) -> dict[str, Any]:
    """The commit a checkout is at, and whether its tracked files differ from it."""
    return {
        "git": cmd_out(["git", "rev-parse", "--short", "HEAD"], tree),
        "git_dirty": bool(cmd_out(["git", "status", "--porcelain", "--untracked-files=no"],
                                  tree)),
    }


def machine_info(pin: dict[str, str]) -> dict[str, Any]:

    cpu = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        import aiohttp
        aiohttp_version: str | None = aiohttp.__version__
    except ImportError:
        aiohttp_version = None
    return {
        "cpus": os.cpu_count(), "cpu_model": cpu, "kernel": platform.release(),
        "python": platform.python_version(), "aiohttp": aiohttp_version,
        "uvloop": importable("uvloop"), "wrk": cmd_out(["wrk", "--version"]),
        **git_info(REPO),
        "pinning": pin or "none",
    }


def importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--targets", default="direct,agentproxy,agentproxy-quiet,relay",
                   help="comma-separated, from direct,agentproxy,agentproxy-quiet,relay,"
                        "litellm, and with --baseline before,before-quiet "
                        "(default direct,agentproxy,agentproxy-quiet,relay)")
    p.add_argument("--litellm", action="store_true", help="add the LiteLLM proxy as a target")
    p.add_argument("--baseline", type=Path, default=None, metavar="PATH",
                   help="another agentproxy checkout (e.g. a `git worktree` of an older "
                        "commit): adds `before` for agentproxy and `before-quiet` for "
                        "agentproxy-quiet, started from PATH with the same flags, and an A/B "
                        "table of this tree over that one")
    p.add_argument("--reps", type=int, default=3, help="repetitions of the matrix (default 3)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of wrk per cell")
    p.add_argument("--ttft-duration", type=float, default=None,
                   help="seconds of ttft.py per stream cell (default: --duration; 0: skip)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load per target first")
    p.add_argument("--quick", action="store_true",
                   help="1 repetition, 3 s per cell, 2 s of TTFT, 1 s warm-up: a smoke test")
    p.add_argument("--modes", default="sync,stream",
                   help=f"comma-separated, from {','.join(MODES)} (default sync,stream); the "
                        "responses-* modes measure POST /v1/responses on the agentproxy "
                        "targets, held against the other targets' chat cell of that mode")
    p.add_argument("--concurrency", default="1,64", help="default 1,64")
    p.add_argument("--chunks", type=int, default=50, help="events per stream (default 50)")
    p.add_argument("--delay-first", type=float, default=0.0, help="fake: seconds to first byte")
    p.add_argument("--delay-chunk", type=float, default=0.0, help="fake: seconds between events")
    p.add_argument("--server-cpus", default="0",
                   help="taskset CPU list for the server under test (default 0)")
    p.add_argument("--load-cpus", default="1",
                   help="taskset CPU list for the fake upstream, wrk and ttft.py (default 1)")
    p.add_argument("--no-pin", action="store_true", help="do not use taskset")
    p.add_argument("--c1-placement", choices=("shared", "split"), default="shared",
                   help="concurrency-1 cells: server on the load CPUs too (shared, default) "
                        "or on its own (split, as at higher concurrency)")
    p.add_argument("--proxy-cmd", default=None,
                   help="command that starts agentproxy, before 'serve' "
                        "(default: this Python's '-m proxy' from this checkout)")
    p.add_argument("--out", type=Path, default=None, help="raw results file (JSON)")
    p.add_argument("--report", type=Path, default=None, metavar="JSON",
                   help="print the tables of a saved raw results file and exit")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.duration, args.warmup = 1, 3.0, 1.0
        if args.ttft_duration is None:
            args.ttft_duration = 2.0
    if args.ttft_duration is None:
        args.ttft_duration = args.duration
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if args.litellm and "litellm" not in targets:
        targets.append("litellm")
    bad = [t for t in targets if t not in ALL_TARGETS]
    if bad:
        p.error(f"unknown targets {bad}; choose from {', '.join(ALL_TARGETS)}")
    if args.baseline is not None:
        args.baseline = args.baseline.resolve()
        if args.report is None and (why := check_baseline(args.baseline)) is not None:
            p.error(f"--baseline: {why}")
        # Each agentproxy target gets its twin from the other tree, right after it.
        for before, after in BASELINES.items():
            if after in targets and before not in targets:
                targets.insert(targets.index(after) + 1, before)
    elif any(t in BASELINES for t in targets):
        p.error("the targets before and before-quiet need --baseline PATH")
    args.target_list = targets
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        p.error(f"--modes takes some of {', '.join(MODES)}")
    if any(m.startswith("responses-") for m in modes) and not any(
            t in AGENTPROXIES for t in targets):
        p.error("the responses-* modes need an agentproxy target")
    cells = [Cell(m, int(c)) for m in modes for c in args.concurrency.split(",")]
    args.cells = []
    for cell in cells:
        chat = Cell(cell.mode.removeprefix("responses-"), cell.concurrency)
        if cell.api == "responses" and chat not in cells:
            args.cells.append(Cell(chat.mode, chat.concurrency, reference=True))
        args.cells.append(cell)
    if args.chunks < 2 or args.reps < 1 or args.duration < 1:
        p.error("--chunks must be >= 2, --reps >= 1, --duration >= 1")
    return args


@contextlib.contextmanager
def terminated_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGINT unwind as KeyboardInterrupt, so the finally blocks stop every server."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous: Callable[..., Any] | int | None = signal.signal(signal.SIGTERM, handler)
    # A shell starts background jobs with SIGINT ignored; Ctrl-C or `kill -INT` must still work.
    previous_int: Callable[..., Any] | int | None = signal.signal(
        signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def report_saved(path: Path) -> int:
    saved = json.loads(path.read_text())
    runs: list[dict[str, Any]] = saved["runs"]
    cells = list(dict.fromkeys(Cell(r["mode"], r["concurrency"]) for r in runs))
    targets = list(dict.fromkeys(r["target"] for r in runs))
    print(tables(summarise(runs, cells, targets), cells, targets, runs))
    settings = saved.get("settings", {})
    if saved.get("baseline"):
        print(f"\nbefore, before-quiet: {saved['baseline']['path']} at "
              f"{saved['baseline']['git']}")
    print(f"\nmedians of {settings.get('reps')} repetition(s), {settings.get('duration_s')} s "
          f"per cell; pinning: {settings.get('pinning')}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        return report_saved(args.report)
    if shutil.which("wrk") is None:
        log("wrk is not installed: apt-get install wrk (see bench/README.md)")
        return 2
    pin: dict[str, str] = {}
    if not args.no_pin and shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        pin = {"server": args.server_cpus, "load": args.load_cpus}
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    RESULTS.mkdir(exist_ok=True)
    out_path = args.out or RESULTS / f"run-{stamp}.json"
    log_dir = RESULTS / f"run-{stamp}-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    key = "sk-bench-" + secrets.token_hex(12)
    launcher = Launcher(log_dir, pin)
    load_pin = launcher.prefix("load")
    runs: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    interrupted = False

    with terminated_as_interrupt(), tempfile.TemporaryDirectory(prefix="agentproxy-bench-") as t:
        tmp = Path(t)
        try:
            fake_port = free_port()
            fake = launcher.start(
                "fake", "load",
                [sys.executable, str(BENCH / "fake_upstream.py"), "--port", str(fake_port),
                 "--chunks", str(args.chunks), "--delay-first", str(args.delay_first),
                 "--delay-chunk", str(args.delay_chunk)],
                fake_port,
            )
            why = wait_ready(fake, key, 15.0)
            if why is not None:
                log(f"the fake upstream did not start: {why}\n{fake.tail()}")
                return 1
            servers: dict[str, Server] = {}
            for name in args.target_list:
                if name == "direct":
                    servers[name] = fake
                    continue
                started = start_target(name, launcher, fake.url, key, tmp, args)
                if isinstance(started, str):
                    skipped[name] = started
                else:
                    servers[name] = started
            targets = [t for t in args.target_list if t in servers]
            log(f"targets: {', '.join(targets)}; pinning: {pin_text(pin, args)}")

            for name in targets:
                if name in AGENTPROXIES and (no := servers[name].no_responses) is not None:
                    skipped[f"{name} (Responses cells)"] = no

            if args.warmup > 0:
                apis = dict.fromkeys(["chat", *(c.api for c in args.cells)])
                for name in targets:
                    for api in apis:
                        probe = Cell("sync" if api == "chat" else "responses-sync", 1)
                        if not measured(probe, name, servers[name]):
                            continue
                        for stream in (False, True):
                            run_wrk(servers[name].url, key, stream, 16, args.warmup,
                                    load_pin, api)

            for rep in range(1, args.reps + 1):
                # Each round starts one target later, so no target always runs first (right
                # after the previous cell's load) or always right after the same neighbour.
                turn = (rep - 1) % len(targets) if targets else 0
                order = targets[turn:] + targets[:turn]
                for cell in args.cells:
                    for name in order:
                        if not measured(cell, name, servers[name]):
                            continue
                        waited = settle(launcher)
                        r = measure(cell, name, servers[name], fake, key, args, pin, load_pin)
                        r["rep"] = rep
                        r["settle_s"] = round(waited, 2)
                        runs.append(r)
                        log(f"[{rep}/{args.reps}] {cell.label:<21} {name:<16} "
                            f"{r['rps']:>9,.0f} req/s  p50 {r['p50_ms']:7.2f} ms  "
                            f"p99 {r['p99_ms']:7.2f} ms"
                            + (f"  TTFT p50 {r['ttft_p50_ms']:.2f} ms"
                               if r["ttft_p50_ms"] is not None else "")
                            + (f"  CPU {r['cpu_ms_per_req']:.3f} ms/req"
                               if r["cpu_ms_per_req"] is not None else "")
                            + (f"  ERRORS {r['errors']}" if r["errors"] else ""))
                        if server_died := [s.name for s in launcher.servers
                                           if s.proc.poll() is not None]:
                            raise RuntimeError(f"{', '.join(server_died)} exited during the run")
        except KeyboardInterrupt:
            interrupted = True
            log("interrupted: stopping every server; partial results follow")
        finally:
            launcher.stop_all()
            for path in log_dir.glob("*.log"):
                trim_log(path)

    targets = [t for t in args.target_list if any(r["target"] == t for r in runs)]
    summary = summarise(runs, args.cells, targets)
    baseline = None if args.baseline is None else {
        "path": str(args.baseline), **git_info(args.baseline)}
    report = {
        "started_utc": stamp,
        "interrupted": interrupted,
        "settings": {
            "reps": args.reps, "duration_s": args.duration, "ttft_duration_s": args.ttft_duration,
            "warmup_s": args.warmup, "chunks": args.chunks, "delay_first_s": args.delay_first,
            "delay_chunk_s": args.delay_chunk, "cells": [c.label for c in args.cells],
            "targets": args.target_list, "wrk_threads": 1,
            "pinning": pin_text(pin, args),
        },
        "machine": machine_info(pin),
        "baseline": baseline,
        "skipped": skipped,
        "summary": [{"cell": c, "target": t, **v} for (c, t), v in summary.items()],
        "runs": runs,
    }
    out_path.write_text(json.dumps(report, indent=1))
    print(tables(summary, args.cells, targets, runs))
    print()
    print(f"medians of {args.reps} repetition(s), {args.duration:g} s of wrk per cell"
          + (f", {args.ttft_duration:g} s of ttft.py per stream cell" if args.ttft_duration
             else "")
          + f"; {args.chunks} events per stream; pinning: {pin_text(pin, args)}")
    if baseline is not None:
        print(f"before, before-quiet: {baseline['path']} at {baseline['git']}"
              + (" (with uncommitted changes)" if baseline["git_dirty"] else ""))
    for name, why in skipped.items():
        print(f"{name}: skipped ({why})")
    shown = out_path.relative_to(REPO) if out_path.is_relative_to(REPO) else out_path
    print(f"raw results: {shown}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
