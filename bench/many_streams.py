"""Many open streams at once: agentproxy's memory with thousands of slow streams in flight.

Starts the fake upstream with a slow stream (one event every `--delay-chunk` seconds, so each
stream stays open for minutes) and agentproxy in front of it, then opens `--streams`
streaming chat completions through the proxy, `--ramp` at a time, and holds them all open
for `--hold` seconds while it samples the proxy's resident memory. Every stream must answer
200 and deliver its first events; anything else counts as an error. Then it closes every
stream (a client that goes away: the proxy must cancel the upstream requests) and checks that
the proxy lets the memory and the upstream connections go.

    python bench/many_streams.py                      # 5,000 streams, held 20 s
    python bench/many_streams.py --streams 1000 --hold 5

The proxy runs with `--max-connections 0` by default: its default limit (1,000 requests per
worker) would rightly refuse streams beyond it with a 503. Each stream holds two sockets in
the proxy (client and upstream) and one here and one in the fake, so the soft limit on open
files must allow a few more than 2 x streams: this script raises its own to the hard limit,
`agentproxy serve` raises its own at start, and so does the fake. If the hard limit is too
low, raise it first (`ulimit -Hn`, or LimitNOFILE= in systemd, or the container runtime's
nofile limit).

Prints a summary (`--json`: one JSON object) and exits 1 if any stream failed or the proxy's
peak RSS went over `--max-rss-mib` (default 400).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from process_groups import free_port, start_in_session, stop_group

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
MODEL = "bench"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def raise_nofile(wanted: int) -> int:
    """Raises this process's soft limit on open files towards the hard limit; returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(max(soft, wanted), hard)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_kib(pid: int) -> int:
    """Resident memory of a process and its children (the workers), in KiB."""
    total = 0
    pids = [pid]
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            pids.append(int(line))
    for p in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def start(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    return start_in_session(cmd, log_path, {**os.environ, **env}, REPO)


async def wait_port(port: int, proc: subprocess.Popen[bytes], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with code {proc.returncode}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        writer.close()
        return
    raise RuntimeError(f"not listening on {port} after {within:.0f} s")


@dataclass
class Tally:
    opened: int = 0  # 200 and the first event received
    events: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    first_event_s: list[float] = field(default_factory=list)


async def one_stream(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str],
    ramp: asyncio.Semaphore, opened: asyncio.Event, release: asyncio.Event, tally: Tally,
    target: int,
) -> None:
    """Opens a stream (holding a ramp slot until its first event), then reads it until
    `release`: an end of the stream before that is an error."""
    try:
        async with ramp:
            started = time.perf_counter()
            resp = await session.post(url, data=body, headers=headers)
            if resp.status != 200:
                tally.errors[f"http_{resp.status}"] += 1
                resp.release()
                return
            first = await resp.content.readuntil(b"\n\n")
            if not first.startswith(b"data: "):
                tally.errors["bad_first_event"] += 1
                resp.close()
                return
            tally.first_event_s.append(time.perf_counter() - started)
            tally.opened += 1
            tally.events += 1
            if tally.opened == target:
                opened.set()
        reader = asyncio.ensure_future(_read_events(resp, tally))
        done, _ = await asyncio.wait(
            {reader, asyncio.ensure_future(release.wait())}, return_when=asyncio.FIRST_COMPLETED
        )
        if reader in done:
            exc = reader.exception()
            tally.errors["ended_early" if exc is None else type(exc).__name__] += 1
        else:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                await reader
        resp.close()  # the client goes away mid-stream
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        tally.errors[type(exc).__name__] += 1


async def _read_events(resp: aiohttp.ClientResponse, tally: Tally) -> None:
    async for _ in resp.content.iter_any():
        tally.events += 1


async def drive(args: argparse.Namespace, proxy_url: str, key: str,
                proxy: subprocess.Popen[bytes]) -> dict[str, Any]:
    tally = Tally()
    ramp = asyncio.Semaphore(args.ramp)
    opened, release = asyncio.Event(), asyncio.Event()
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                       "stream": True}).encode()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=None)
    samples: list[tuple[float, int]] = []
    idle_rss = rss_kib(proxy.pid)
    t0 = time.monotonic()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        url = proxy_url + "/v1/chat/completions"
        tasks = [asyncio.create_task(one_stream(session, url, body, headers, ramp, opened,
                                                release, tally, args.streams))
                 for _ in range(args.streams)]

        async def sampler() -> None:
            while True:
                samples.append((time.monotonic() - t0, rss_kib(proxy.pid)))
                await asyncio.sleep(0.5)

        sampling = asyncio.create_task(sampler())
        everyone = asyncio.gather(*tasks)
        opened_waiter = asyncio.ensure_future(opened.wait())
        await asyncio.wait({opened_waiter, everyone}, timeout=args.open_timeout,
                           return_when=asyncio.FIRST_COMPLETED)
        open_s = time.monotonic() - t0
        all_open = opened.is_set()
        opened_waiter.cancel()
        log(f"{tally.opened:,} of {args.streams:,} streams open after {open_s:.1f} s"
            f" (errors: {dict(tally.errors) or 0}); holding {args.hold:g} s")
        hold_start = len(samples)
        fds_held = open_fds(proxy.pid)
        await asyncio.sleep(args.hold)
        held_events = tally.events
        held_rss = [kib for _, kib in samples[hold_start:]] or [rss_kib(proxy.pid)]
        release.set()
        await asyncio.wait_for(everyone, timeout=60)
        # After the clients left: the proxy should drop the streams and their memory.
        await asyncio.sleep(args.settle)
        sampling.cancel()
    after_rss = rss_kib(proxy.pid)
    peak = max(kib for _, kib in samples) if samples else after_rss
    first = sorted(tally.first_event_s)
    return {
        "streams": args.streams, "opened": tally.opened, "all_open": all_open,
        "open_s": round(open_s, 2),
        "first_event_p50_ms": round(first[len(first) // 2] * 1000, 1) if first else None,
        "events_during_hold": held_events,
        "errors": dict(tally.errors),
        "idle_rss_mib": round(idle_rss / 1024, 1),
        "held_rss_mib": round(max(held_rss) / 1024, 1),
        "peak_rss_mib": round(peak / 1024, 1),
        "per_stream_kib": round((max(held_rss) - idle_rss) / max(1, tally.opened), 1),
        "after_close_rss_mib": round(after_rss / 1024, 1),
        "proxy_fds_held": fds_held,
        "proxy_fds_after": open_fds(proxy.pid),
        "rss_samples": [(round(t, 1), round(k / 1024, 1)) for t, k in samples],
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--streams", type=int, default=5000, help="streams held at once (5000)")
    p.add_argument("--hold", type=float, default=20.0, help="seconds to hold them (20)")
    p.add_argument("--ramp", type=int, default=200,
                   help="streams being opened at a time (200)")
    p.add_argument("--open-timeout", type=float, default=120.0,
                   help="seconds allowed to open them all (120)")
    p.add_argument("--settle", type=float, default=3.0,
                   help="seconds after closing before the last memory reading (3)")
    p.add_argument("--delay-chunk", type=float, default=2.0,
                   help="fake: seconds between events; streams last 49x this (2)")
    p.add_argument("--workers", type=int, default=1, help="agentproxy --workers (1)")
    p.add_argument("--max-connections", type=int, default=0,
                   help="agentproxy --max-connections (0: no limit)")
    p.add_argument("--max-rss-mib", type=float, default=400.0,
                   help="fail when the proxy's peak RSS is above this (400)")
    p.add_argument("--proxy-cmd", default=None,
                   help="command that starts agentproxy, before 'serve' "
                        "(default: this Python's '-m proxy' from this checkout)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    nofile = raise_nofile(args.streams + 256)
    if nofile < args.streams + 64:
        log(f"the open-files limit is {nofile}: too low for {args.streams} streams; raise the "
            "hard limit (ulimit -Hn) or pass fewer --streams")
        return 2
    key = "sk-bench-" + secrets.token_hex(12)
    with tempfile.TemporaryDirectory(prefix="agentproxy-many-") as t:
        tmp = Path(t)
        fake_port, proxy_port = free_port(), free_port()
        fake = start([sys.executable, str(BENCH / "fake_upstream.py"), "--port", str(fake_port),
                      "--chunks", "50", "--delay-chunk", str(args.delay_chunk)],
                     {}, tmp / "fake.log")
        routes = tmp / "routes.yaml"
        routes.write_text(
            "upstreams:\n"
            f"  fake: {{kind: openai, url: http://127.0.0.1:{fake_port}/v1}}\n"
            "models:\n"
            f"  {MODEL}: {{upstream: fake, model: fake-model}}\n"
            "auth:\n"
            '  keys: [{key: "${BENCH_KEY}"}]\n'
        )
        cmd = [*(args.proxy_cmd.split() if args.proxy_cmd else [sys.executable, "-m", "proxy"]),
               "serve", "--routes", str(routes), "--host", "127.0.0.1", "--port",
               str(proxy_port), "--workers", str(args.workers), "--log-level", "warning",
               "--max-connections", str(args.max_connections)]
        env = {"BENCH_KEY": key,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                           os.environ.get("PYTHONPATH")]))}
        proxy = start(cmd, env, tmp / "proxy.log")
        try:
            asyncio.run(wait_port(fake_port, fake))
            asyncio.run(wait_port(proxy_port, proxy))
            time.sleep(1.0)  # let the workers finish importing before the idle reading
            result = asyncio.run(drive(args, f"http://127.0.0.1:{proxy_port}", key, proxy))
            result["proxy_exit"] = None
        except (TimeoutError, RuntimeError) as exc:
            log(f"failed: {exc}\n--- proxy log:\n{(tmp / 'proxy.log').read_text()[-2000:]}")
            return 1
        finally:
            stop_group(proxy, 15)
            stop_group(fake, 15)
        result["proxy_log_tail"] = (tmp / "proxy.log").read_text()[-1000:]
    ok = not result["errors"] and result["all_open"] and \
        result["peak_rss_mib"] <= args.max_rss_mib
    result["ok"] = ok
    if args.json:
        print(json.dumps(result))
    else:
        shown = {k: v for k, v in result.items() if k not in ("rss_samples", "proxy_log_tail")}
        for k, v in shown.items():
            print(f"{k:>22}: {v}")
        if result["proxy_log_tail"].strip():
            print("proxy log (tail):\n" + result["proxy_log_tail"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
