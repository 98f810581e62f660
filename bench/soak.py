"""Soak test: a bounded mixed load on a local agentproxy; do memory, sockets and tasks stay flat?

    python bench/soak.py --minutes 10 [--concurrency 32] [--rate 250] [--seed 1] [--json OUT]

It starts everything itself, on 127.0.0.1 and free ports, and stops it all at the end (also on
Ctrl-C or SIGTERM):

- `python -m proxy serve --workers 1` with a generated route table in a temporary directory,
  as a user starts it (its default access log included) but with short `--send-timeout`,
  `--header-timeout` and `--body-timeout` (2 s each) so the hostile loads below end quickly;
  its log goes to bench/results/soak-<time>-proxy.log, cut to its first and last MiB at the
  end;
- bench/fake_upstream.py (20 events per stream, 10 ms apart) as the healthy `openai` upstream;
- in this process: a misbehaving `openai` upstream (answers 500, cuts streams and answers
  mid-body, or answers only after 5 s; for the hostile loads, streams as fast as it can, or
  sends one event near or over the proxy's 4 MiB bound), a fake Letta server that replays
  captured streams (tests/fake_letta.py), and a port where nothing listens.

The load is a weighted mix (see KINDS): streams and sync requests through the fake (chat
completions and the Responses API), echo, Letta (with and without session ids), clients that
leave mid-stream and while waiting for a sync answer, the refused / 500 / cut-stream
upstreams, a route that fails over from the dead upstream to the fake, bad JSON, unknown
models and model lists. `--concurrency` clients send
at most `--rate` requests per second in all. Meanwhile the route file is rewritten every
`--reload-every` seconds, alternating between two valid versions, every sixth write broken.

During the main load, every `--episode-gap` seconds, one hostile load (an episode) runs on
top of it, in turn (bench/soak_episodes.py): slow readers (streaming clients that stop reading
after the first bytes: the send timeout must end them and free their slots), silent sockets
(connections that send nothing, half a request head, or half a body: the header and body
timeouts must close them) and big-event bursts (many streams at once of one event near the
4 MiB event bound, some over it: relayed whole, or ended with an error event). Around each the
proxy's RSS (its peak through VmHWM), file descriptors and tasks are read; after each the run
waits up to `--episode-settle` s for the RSS to come back near where it was before. The
warm-up runs each episode once too (not judged): the first slow readers leave the allocator's
pools larger, which later ones reuse, and the baseline must include that.

Phases: start (idle) -> warm-up load -> settle -> baseline (idle) -> main load with the
episodes, sampled every `--sample-every` s -> settle -> end (idle). To settle, the clients
close their connections and the run waits until the proxy has no open stream and no TCP
connection besides its listening socket (its pooled upstream connections close after 30 s
idle), or `--settle` s. Each sample reads the proxy's RSS and file descriptors from /proc
(sockets classified through /proc/net/tcp), its asyncio task count from
`agentproxy_asyncio_tasks` on /metrics, and the concurrency slots held and requests queued for
one, summed over the upstreams of /readyz.

Verdict, end against baseline (both idle, after warm-up): RSS grew by at most max(8 MiB, 10 %),
file descriptors by at most 2, sockets and tasks by at most 1, no stream is left open and
no concurrency slot held or waited for;
and after every episode RSS came back within the same margin of its value before the
episode. Separately: every request had an outcome expected for its kind, the proxy logged no
traceback, the reload counters match the writes, every slow reader was ended by the send
timeout (its access-log line says `error=send_timeout`) and every silent socket was counted
in `agentproxy_connection_timeouts_total`. Exit status 0 when all of that holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from process_groups import free_port, signal_group, start_in_session, trim_log, wait_or_kill
from runtime import new_loop_factory

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
sys.path.insert(0, str(REPO))

# Both import the repository's own modules (soak_episodes takes the event bound from proxy.sse).
import soak_episodes as episodes  # noqa: E402

from tests.fake_letta import FakeLetta, Scenario, make_app  # noqa: E402

KEY = "sk-soak-" + os.urandom(12).hex()
AGENT = "agent-ef37cb35-73b3-4511-b1bb-1c9635553e28"  # in tests/fixtures/letta/ as support-bot
CLK_TCK = os.sysconf("SC_CLK_TCK")
MiB = 1024 * 1024
REQUEST_TIMEOUT = 30.0
# Verdict margins, end against baseline.
RSS_MARGIN_MIB, RSS_MARGIN_FRACTION = 8.0, 0.10
FD_MARGIN, SOCKET_MARGIN, TASK_MARGIN = 2, 1, 1


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- the route table ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Ports:
    proxy: int
    fake: int
    bad: int
    letta: int
    dead: int


def routes_yaml(ports: Ports, variant: str, hose_slots: int) -> str:
    """Variants `a` and `b` serve the same models with different settings; `broken` has an
    unknown key, so the proxy must keep the table it serves. `hose` (the slow readers'
    upstream) has `hose_slots` slots in both."""
    b = variant == "b"
    text = f"""# soak test route table, variant {variant}
upstreams:
  fake:
    kind: openai
    url: http://127.0.0.1:{ports.fake}/v1
    keepalive: {10 if b else 15}
{"    max_concurrency: 64" + chr(10) + "    queue_timeout: 5" + chr(10) if b else ""}\
  dead:
    kind: openai
    url: http://127.0.0.1:{ports.dead}/v1
    timeouts: {{connect: 2}}
    circuit: {{failures: {2 if b else 3}, cooldown: {5 if b else 10}}}
  flaky500:
    kind: openai
    url: http://127.0.0.1:{ports.bad}/v1
  flakycut:
    kind: openai
    url: http://127.0.0.1:{ports.bad}/v1
  slow:
    kind: openai
    url: http://127.0.0.1:{ports.bad}/v1
    timeouts: {{first_event: {20 if b else 30}}}
  letta:
    kind: letta
    url: http://127.0.0.1:{ports.letta}
  demo:
    kind: echo
  hose:
    kind: openai
    url: http://127.0.0.1:{ports.bad}/v1
    max_concurrency: {hose_slots}
    queue_timeout: 3
  big:
    kind: openai
    url: http://127.0.0.1:{ports.bad}/v1
  bigover:
    kind: openai
    url: http://127.0.0.1:{ports.bad}/v1
models:
  fake:
    upstream: fake
    model: fake-model
  echo:
    upstream: demo
  dead:
    upstream: dead
  fail-500:
    upstream: flaky500
  fail-cut:
    upstream: flakycut
  slow:
    upstream: slow
  failover:
    upstream: [dead, fake]
    model: fake-model
  support:
    upstream: letta
    agent: {AGENT}
  hose:
    upstream: hose
  hose-check:
    upstream: hose
  big:
    upstream: big
  big-over:
    upstream: bigover
{"  echo-b:" + chr(10) + "    upstream: demo" + chr(10) if b else ""}\
auth:
  keys:
    - key: ${{SOAK_KEY}}
"""
    if variant == "broken":
        text += "not_a_key: 1\n"
    return text


def write_atomically(path: Path, text: str) -> None:
    """Rename into place, so the proxy never reads a half-written file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- the misbehaving upstream --------------------------------------------------------------

@dataclass
class BadStats:
    requests: Counter[str] = field(default_factory=Counter)
    slow_cancelled: int = 0
    slow_completed: int = 0
    hostile: episodes.UpstreamStats = field(default_factory=episodes.UpstreamStats)


BAD_STATS = web.AppKey("bad_stats", BadStats)
_CHUNK = (
    b'data: {"id":"chatcmpl-bad","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"m","choices":[{"index":0,"delta":%s,"finish_reason":null}]}\n\n'
)


async def bad_chat(request: web.Request) -> web.StreamResponse:
    """By the model the proxy sends: `fail-500` answers 500; `fail-cut` breaks off (streams
    after three events, sync answers mid-body); `slow` answers after 5 s."""
    stats = request.app[BAD_STATS]
    body = orjson.loads(await request.read())
    model, stream = body.get("model"), bool(body.get("stream"))
    stats.requests[f"{model} {'stream' if stream else 'sync'}"] += 1
    answer = await episodes.upstream_answer(request, str(model), stats.hostile)
    if answer is not None:
        return answer
    if model == "fail-500":
        return web.json_response(
            {"error": {"message": "internal failure", "type": "server_error", "code": None}},
            status=500,
        )
    if model == "slow":
        try:
            await asyncio.sleep(5.0)
        except asyncio.CancelledError:
            stats.slow_cancelled += 1
            raise
        stats.slow_completed += 1
        return web.json_response({"error": {"message": "too late"}}, status=500)
    transport = request.transport
    if not stream:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = 400
        await resp.prepare(request)
        await resp.write(b'{"id": "chatcmpl-bad", "object": "chat.comp')
    else:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_CHUNK % b'{"role":"assistant","content":""}')
        for word in (b"one", b"two"):
            await asyncio.sleep(0.01)
            await resp.write(_CHUNK % (b'{"content":"' + word + b' "}',))
        await asyncio.sleep(0.01)
        await resp.write(b'data: {"id":"chatcmpl-bad","obj')
    await asyncio.sleep(0.01)
    if transport is not None:
        transport.abort()
    return resp


def bad_app(stats: BadStats) -> web.Application:
    app = web.Application()
    app[BAD_STATS] = stats
    app.router.add_post("/v1/chat/completions", bad_chat)
    return app


@contextlib.asynccontextmanager
async def serving(app: web.Application, port: int) -> AsyncIterator[None]:
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield
    finally:
        await runner.cleanup()


# --- the proxy process, seen from /proc and /metrics -----------------------------------------

@dataclass
class Sample:
    phase: str
    t: float  # seconds since the load began
    rss_kib: int
    hwm_kib: int
    threads: int
    fds: int
    sockets: int
    tcp: dict[str, int]
    tasks: int | None
    open_streams: int | None
    cpu_s: float
    series: int  # samples on /metrics: a label set per client-chosen value would grow it
    # Concurrency slots held and requests queued for one, over the upstreams /readyz shows: a
    # request that left without giving its slot back would hold one for good.
    slots: int | None = None
    queued: int | None = None


def proc_status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "Threads"):
            out[name] = int(value.split()[0])
    return out


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tcp_table(pid: int) -> dict[int, tuple[int, int, str]]:
    """inode -> (local port, remote port, state) for the TCP sockets of the namespace."""
    table: dict[int, tuple[int, int, str]] = {}
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]:
                parts = line.split()
                local, remote, state, inode = parts[1], parts[2], parts[3], int(parts[9])
                table[inode] = (
                    int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16), state
                )
    return table


def fd_census(pid: int, ports: Ports) -> tuple[int, int, dict[str, int], list[str]]:
    """(fds, sockets, TCP sockets by role, the targets of the other fds)."""
    fd_dir = Path(f"/proc/{pid}/fd")
    targets: list[str] = []
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            targets.append(os.readlink(fd_dir / fd))
    socket_inodes = [int(t[8:-1]) for t in targets if t.startswith("socket:[")]
    tcp = tcp_table(pid)
    roles = {ports.fake: "to fake", ports.bad: "to bad", ports.letta: "to letta",
             ports.dead: "to dead"}
    by_role: Counter[str] = Counter()
    for inode in socket_inodes:
        entry = tcp.get(inode)
        if entry is None:
            by_role["non-tcp"] += 1
            continue
        local, remote, state = entry
        if state == "0A":
            by_role["listen"] += 1
        elif local == ports.proxy:
            by_role["from clients"] += 1
        else:
            by_role[roles.get(remote, "other tcp")] += 1
    others = sorted(t for t in targets if not t.startswith("socket:["))
    return len(targets), len(socket_inodes), dict(by_role), others


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): float(s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    # A connection of its own, closed at once, so it is gone before the next census.
    conn = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=conn) as http, http.get(
        base + "/metrics", timeout=aiohttp.ClientTimeout(total=10)
    ) as resp:
        return parse_metrics(await resp.text())


def gauge(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> int | None:
    value = metrics.get((name, ()))
    return None if value is None else int(value)


async def slot_census(base: str) -> tuple[int | None, int | None]:
    """Slots held and requests queued for one, summed over /readyz's upstreams."""
    conn = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=conn) as http, http.get(
        base + "/readyz", timeout=aiohttp.ClientTimeout(total=10)
    ) as resp:
        ups = (await resp.json()).get("upstreams") or {}
    held = sum(int(u.get("active", 0)) for u in ups.values())
    return held, sum(int(u.get("queued", 0)) for u in ups.values())


async def take_sample(phase: str, t: float, pid: int, base: str, ports: Ports) -> Sample:
    status = proc_status(pid)
    fds, sockets, tcp, _ = fd_census(pid, ports)
    cpu = cpu_seconds(pid)
    metrics = await scrape(base)
    slots, queued = await slot_census(base)
    return Sample(
        phase=phase, t=round(t, 1), rss_kib=status["VmRSS"], hwm_kib=status["VmHWM"],
        threads=status["Threads"], fds=fds, sockets=sockets, tcp=tcp,
        tasks=gauge(metrics, "agentproxy_asyncio_tasks"),
        open_streams=gauge(metrics, "agentproxy_open_streams"), cpu_s=cpu,
        series=len(metrics), slots=slots, queued=queued,
    )


# --- the load ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Kind:
    name: str
    weight: int
    expected: frozenset[str]
    what: str


OK_STREAM, OK_SYNC = episodes.OK_STREAM, episodes.OK_SYNC
LEFT_STREAM, LEFT_SYNC = "client left mid-stream", "client left while waiting"

KINDS = (
    Kind("stream", 24, frozenset({OK_STREAM}), "fake upstream, stream of 20 events 10 ms apart"),
    Kind("sync", 14, frozenset({OK_SYNC}), "fake upstream, non-streaming"),
    Kind("echo_stream", 6, frozenset({OK_STREAM}), "echo model, stream"),
    Kind("echo_sync", 6, frozenset({OK_SYNC}), "echo model, non-streaming"),
    Kind("letta_stream", 6, frozenset({OK_STREAM}),
         "fake Letta, stream (2/3 with one of 8 session ids)"),
    Kind("letta_sync", 3, frozenset({OK_SYNC}), "fake Letta, non-streaming"),
    Kind("responses_stream", 5, frozenset({OK_STREAM}),
         "fake upstream, Responses API stream (its tokens read from the stream's template)"),
    Kind("responses_sync", 3, frozenset({OK_SYNC}), "fake upstream, Responses API non-streaming"),
    Kind("leave_responses", 2, frozenset({LEFT_STREAM}),
         "client closes the connection after 3 events of a Responses stream"),
    Kind("leave_stream", 8, frozenset({LEFT_STREAM}),
         "client closes the connection after 3 events of a fake stream"),
    Kind("leave_letta", 2, frozenset({LEFT_STREAM}),
         "client closes the connection after 2 events of a Letta stream (run cancelled)"),
    Kind("leave_sync", 5, frozenset({LEFT_SYNC}),
         "client gives up after 0.3 s on an upstream that answers after 5 s"),
    Kind("refused", 5, frozenset({"502 upstream_unavailable"}),
         "upstream refuses connections (stream and sync)"),
    Kind("http_500", 5, frozenset({"502 upstream_error"}), "upstream answers 500"),
    Kind("cut", 5, frozenset({"200 stream error-event upstream_error", "502 upstream_error"}),
         "upstream breaks off: a stream after 3 events (error event), a sync answer mid-body"),
    Kind("failover", 5, frozenset({OK_STREAM, OK_SYNC}),
         "route [dead, fake]: the fake serves, after the dead one fails or is skipped"),
    Kind("bad_json", 2, frozenset({"400 invalid_request_error"}), "malformed JSON body"),
    Kind("unknown_model", 2, frozenset({"404 model_not_found"}), "a model no route names"),
    Kind("models", 2, frozenset({OK_SYNC}), "GET /v1/models"),
)
# The episodes' requests: not drawn from the mix (weight 0), counted with it.
EPISODE_KINDS = (
    Kind("slow_reader", 0, frozenset({episodes.SLOW_ENDED}),
         "slow episode: stream from an upstream sending as fast as it can, read no further "
         "than the first byte; the send timeout must end it"),
    Kind("slot_check", 0, frozenset({OK_STREAM}),
         "slow episode, after the readers: as many streams at once as their upstream has "
         "slots (a slot still held would make one wait past queue_timeout: 429)"),
    Kind("silent_socket", 0, frozenset({episodes.CLOSED_SILENT}),
         "silent episode: a connection that sends nothing (--header-timeout)"),
    Kind("half_head", 0, frozenset({episodes.CLOSED_SILENT}),
         "silent episode: half a request head, then nothing (--header-timeout)"),
    Kind("half_body", 0, frozenset({episodes.BODY_408}),
         "silent episode: a whole head and half its body, then nothing (--body-timeout)"),
    Kind("healthz_probe", 0, frozenset({OK_SYNC}),
         "silent episode: GET /healthz while those sockets are open"),
    Kind("big_event", 0, frozenset({OK_STREAM}),
         "burst episode: one content event just under the 4 MiB event bound, relayed whole"),
    Kind("big_event_over", 0, frozenset({episodes.OVER_ERROR}),
         "burst episode: one event over the bound: an error event and [DONE]"),
)
KIND_BY_NAME = {k.name: k for k in (*KINDS, *EPISODE_KINDS)}


@dataclass
class Tally:
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    examples: dict[tuple[str, str], list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, kind: str, outcome: str, detail: str = "") -> None:
        self.counts[(kind, outcome)] += 1
        if outcome not in KIND_BY_NAME[kind].expected and len(self.examples[kind, outcome]) < 3:
            self.examples[kind, outcome].append(detail[:300])


def error_outcome(status: int, raw: bytes) -> tuple[str, str]:
    try:
        err = orjson.loads(raw)["error"]
        code = err.get("code") or err.get("type")
        return f"{status} {code}", str(err.get("message"))
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return f"{status} non-openai-error", raw[:200].decode("utf-8", "replace")


@dataclass
class DataLines:
    """A stream's `data:` lines as JSON objects, up to [DONE] (data after it ends them), or
    until the client leaves after `leave_after` of them."""

    leave_after: int | None = None
    done: bool = False
    after_done: bytes | None = None
    count: int = 0
    left: bool = False

    async def objects(self, resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
        async for line in resp.content:
            if not line.startswith(b"data: "):
                continue  # `event:` lines, blank lines and keep-alive comments
            payload = line[6:].strip()
            if payload == b"[DONE]":
                self.done = True
            elif self.done:
                self.after_done = payload
                return
            else:
                yield orjson.loads(payload)
                self.count += 1
                if self.leave_after is not None and self.count >= self.leave_after:
                    resp.close()  # closes the connection: the proxy sees the client leave
                    self.left = True
                    return

    def framing_outcome(self) -> tuple[str, str] | None:
        """The outcome the stream's framing and the client's leaving decide alone."""
        if self.after_done is not None:
            return "200 stream data after [DONE]", self.after_done[:200].decode()
        if self.left:
            return LEFT_STREAM, ""
        if self.leave_after is not None:
            return "stream ended before the client left", f"{self.count} events"
        return None


class Client:
    def __init__(self, base: str, rng: random.Random) -> None:
        self.base = base
        self.rng = rng
        self.headers = {"Authorization": f"Bearer {KEY}"}

    def body(self, model: str, stream: bool, text: str = "hello soak") -> bytes:
        return orjson.dumps({"model": model, "stream": stream,
                             "messages": [{"role": "user", "content": text}]})

    async def chat(self, http: aiohttp.ClientSession, model: str, stream: bool,
                   leave_after: int | None = None,
                   headers: dict[str, str] | None = None) -> tuple[str, str]:
        async with http.post(self.base + "/v1/chat/completions",
                             data=self.body(model, stream),
                             headers={**self.headers, "Content-Type": "application/json",
                                      **(headers or {})}) as resp:
            if resp.status != 200:
                return error_outcome(resp.status, await resp.read())
            if not stream:
                data = orjson.loads(await resp.read())
                if data.get("choices") and data["choices"][0]["message"].get("content"):
                    return OK_SYNC, ""
                return "200 sync without content", str(data)[:200]
            return await self.read_stream(resp, leave_after)

    async def responses(self, http: aiohttp.ClientSession, model: str, stream: bool,
                        leave_after: int | None = None) -> tuple[str, str]:
        body = orjson.dumps({"model": model, "stream": stream, "input": "hello soak"})
        async with http.post(self.base + "/v1/responses", data=body,
                             headers={**self.headers, "Content-Type": "application/json"}) as resp:
            if resp.status != 200:
                return error_outcome(resp.status, await resp.read())
            if not stream:
                data = orjson.loads(await resp.read())
                if data.get("status") == "completed" and data.get("output"):
                    return OK_SYNC, ""
                return "200 response not completed", str(data)[:200]
            terminal, data = None, DataLines(leave_after)
            async for event in data.objects(resp):
                kind = event.get("type", "")
                if kind in ("response.completed", "response.incomplete", "response.failed"):
                    terminal = kind
            outcome = data.framing_outcome()
            if outcome is not None:
                return outcome
            if terminal != "response.completed":
                return f"200 Responses stream ended with {terminal}", f"{data.count} events"
            if not data.done:
                return "200 stream without [DONE]", f"{data.count} events"
            return OK_STREAM, ""

    async def read_stream(self, resp: aiohttp.ClientResponse,
                          leave_after: int | None) -> tuple[str, str]:
        finish, error, data = None, None, DataLines(leave_after)
        async for chunk in data.objects(resp):
            if "error" in chunk:
                error = chunk["error"].get("code") or chunk["error"].get("type")
                continue
            for choice in chunk.get("choices") or ():
                finish = choice.get("finish_reason") or finish
        outcome = data.framing_outcome()
        if outcome is not None:
            return outcome
        if error is not None:
            return f"200 stream error-event {error}" + ("" if data.done else " without [DONE]"), ""
        if not data.done:
            return "200 stream without [DONE]", f"{data.count} events"
        if finish is None:
            return "200 stream without finish_reason", f"{data.count} events"
        return OK_STREAM, ""

    async def run(self, http: aiohttp.ClientSession, kind: str, n: int) -> tuple[str, str]:
        stream = n % 2 == 0  # the kinds that take both alternate
        if kind == "stream":
            return await self.chat(http, "fake", True)
        if kind == "sync":
            return await self.chat(http, "fake", False)
        if kind == "echo_stream":
            return await self.chat(http, "echo", True)
        if kind == "echo_sync":
            return await self.chat(http, "echo", False)
        if kind in ("letta_stream", "letta_sync", "leave_letta"):
            pick = self.rng.randrange(12)
            headers = {"X-Session-Id": f"soak-{pick}"} if pick < 8 else None
            return await self.chat(http, "support", kind != "letta_sync",
                                   leave_after=2 if kind == "leave_letta" else None,
                                   headers=headers)
        if kind == "leave_stream":
            return await self.chat(http, "fake", True, leave_after=3)
        if kind in ("responses_stream", "responses_sync", "leave_responses"):
            return await self.responses(http, "fake", kind != "responses_sync",
                                        leave_after=3 if kind == "leave_responses" else None)
        if kind == "leave_sync":
            try:
                async with asyncio.timeout(0.3):
                    outcome = await self.chat(http, "slow", False)
            except TimeoutError:
                return LEFT_SYNC, ""
            return outcome
        if kind == "refused":
            return await self.chat(http, "dead", stream)
        if kind == "http_500":
            return await self.chat(http, "fail-500", stream)
        if kind == "cut":
            return await self.chat(http, "fail-cut", stream)
        if kind == "failover":
            return await self.chat(http, "failover", stream)
        if kind == "bad_json":
            async with http.post(self.base + "/v1/chat/completions",
                                 data=b'{"model": "fake", "messages": [',
                                 headers={**self.headers,
                                          "Content-Type": "application/json"}) as resp:
                return error_outcome(resp.status, await resp.read())
        if kind == "unknown_model":
            return await self.chat(http, f"no-such-model-{n}", False)
        if kind == "models":
            async with http.get(self.base + "/v1/models", headers=self.headers) as resp:
                raw = await resp.read()
                if resp.status != 200:
                    return error_outcome(resp.status, raw)
                return (OK_SYNC, "") if orjson.loads(raw).get("data") else ("200 empty", "")
        raise ValueError(kind)


class Pacer:
    """At most `rate` request starts per second over all clients."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self.next = time.monotonic()

    async def wait(self) -> None:
        now = time.monotonic()
        at = max(now, self.next)
        self.next = at + self.interval
        if at > now:
            await asyncio.sleep(at - now)


async def load(base: str, seconds: float, concurrency: int, rate: float, seed: int,
               tally: Tally, stop: asyncio.Event) -> int:
    """`concurrency` clients for `seconds` (or until `stop`); returns the requests sent."""
    deadline = time.monotonic() + seconds
    pacer = Pacer(rate)
    names = [k.name for k in KINDS]
    weights = [k.weight for k in KINDS]
    # Bounded in count as well as in time, whatever the rate.
    cap = int(seconds * rate) + concurrency
    sent = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def worker(i: int) -> None:
            nonlocal sent
            rng = random.Random(seed * 1_000_003 + i)
            client = Client(base, rng)
            for n in range(cap):
                await pacer.wait()
                if time.monotonic() >= deadline or stop.is_set() or sent >= cap:
                    return
                sent += 1
                kind = rng.choices(names, weights)[0]
                try:
                    async with asyncio.timeout(REQUEST_TIMEOUT):
                        outcome, detail = await client.run(http, kind, n)
                except TimeoutError:
                    outcome, detail = f"client timeout ({REQUEST_TIMEOUT:g} s)", ""
                except (aiohttp.ClientError, OSError, ValueError) as exc:
                    outcome, detail = f"exception {type(exc).__name__}", str(exc)
                tally.add(kind, outcome, detail)

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return sent


async def reloader(path: Path, ports: Ports, hose_slots: int, every: float,
                   writes: Counter[str], stop: asyncio.Event) -> None:
    """Rewrites the route file every `every` seconds: b, a, b, a, broken, b, a, ... Every
    valid write differs from the table being served, so each is one successful reload. The
    sequence goes on from `writes` (the file starts as `a`), so it spans the load phases."""
    for _ in range(1_000_000):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)
        if stop.is_set():
            return
        if sum(writes.values()) % 6 == 4:
            variant = "broken"
        else:
            variant = "b" if (writes["a"] + writes["b"]) % 2 == 0 else "a"
        write_atomically(path, routes_yaml(ports, variant, hose_slots))
        writes[variant] += 1


# --- the episodes: hostile loads on top of the mix, measured one by one ------------------------

@dataclass
class Episode:
    name: str
    phase: str  # warm-up (not judged: the first time the proxy meets each) or load
    t: float  # seconds since the load began
    seconds: float
    rss_before_kib: int
    peak_kib: int  # VmHWM over the episode (reset before it), or the highest RSS polled
    rss_after_kib: int
    # Seconds after the episode until RSS was back within the margin; None: not within
    # --episode-settle.
    back_after_s: float | None
    fds_before: int
    fds_peak: int
    fds_after: int
    tasks_before: int | None
    tasks_after: int | None
    outcomes: dict[str, int]
    note: str


def rss_margin_kib(base_kib: int) -> float:
    return max(RSS_MARGIN_MIB * 1024, RSS_MARGIN_FRACTION * base_kib)


def reset_peak_rss(pid: int) -> bool:
    """VmHWM back to the current RSS (Linux >= 4.0), so the next reading is this episode's."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class EpisodeRunner:
    settings: episodes.Settings
    names: list[str]
    gap: float
    settle: float
    pid: int
    base: str
    t0: float
    tally: Tally
    records: list[Episode] = field(default_factory=list)
    # The highest VmHWM seen before any reset: the run's peak RSS.
    peak_kib: int = 0

    async def warm_up(self, stop: asyncio.Event) -> None:
        """Each episode once, 1 s apart, whatever the time: the first slow readers or big
        events grow the allocator's pools to what later ones reuse, and the baseline must
        include that, as it includes what the mix's first requests leave."""
        for name in self.names:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            if stop.is_set():
                return
            await self.run(name, "warm-up", settle=0.0)

    async def loop(self, deadline: float, stop: asyncio.Event) -> None:
        """Episodes in turn, `gap` s apart (the first `gap` s into the load, once the mix has
        brought the proxy to its working size), each only when it can end before
        `deadline`."""
        next_at = time.monotonic() + self.gap
        for i in range(1_000_000):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, next_at - time.monotonic()))
            if stop.is_set():
                return
            name = self.names[i % len(self.names)]
            if time.monotonic() + episodes.nominal_seconds(name, self.settings) > deadline:
                return
            await self.run(name, "load")
            next_at = time.monotonic() + self.gap

    async def run(self, name: str, phase: str, settle: float | None = None) -> None:
        pid = self.pid
        status = proc_status(pid)
        self.peak_kib = max(self.peak_kib, status["VmHWM"])
        exact_peak = reset_peak_rss(pid)
        before = proc_status(pid)["VmRSS"]
        fds_before = fd_count(pid)
        tasks_before = gauge(await scrape(self.base), "agentproxy_asyncio_tasks")
        polled = [before, fds_before]

        async def poll() -> None:
            while True:
                await asyncio.sleep(0.1)
                with contextlib.suppress(OSError, KeyError):
                    polled[0] = max(polled[0], proc_status(pid)["VmRSS"])
                    polled[1] = max(polled[1], fd_count(pid))

        poller = asyncio.create_task(poll())
        started = time.monotonic()
        try:
            found = await episodes.EPISODES[name](self.settings)
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
        seconds = time.monotonic() - started
        status = proc_status(pid)
        peak = status["VmHWM"] if exact_peak else polled[0]
        self.peak_kib = max(self.peak_kib, status["VmHWM"])
        # RSS back near where it was? The mixed load goes on meanwhile, as it did before.
        margin = rss_margin_kib(before)
        back: float | None = None
        after = status["VmRSS"]
        while True:
            waited = time.monotonic() - started - seconds
            if after - before <= margin:
                back = waited
                break
            if waited >= (self.settle if settle is None else settle):
                break
            await asyncio.sleep(0.5)
            after = proc_status(pid)["VmRSS"]
        outcomes: Counter[str] = Counter()
        for kind, outcome, detail in found.outcomes:
            self.tally.add(kind, outcome, detail)
            outcomes[f"{kind}: {outcome}"] += 1
        record = Episode(
            name=name, phase=phase, t=round(started - self.t0, 1), seconds=round(seconds, 1),
            rss_before_kib=before, peak_kib=peak, rss_after_kib=after,
            back_after_s=None if back is None else round(back, 1),
            fds_before=fds_before, fds_peak=polled[1], fds_after=fd_count(pid),
            tasks_before=tasks_before,
            tasks_after=gauge(await scrape(self.base), "agentproxy_asyncio_tasks"),
            outcomes=dict(outcomes), note=found.note,
        )
        self.records.append(record)
        log(f"episode {name}: {episode_row(record)}")


def episode_row(e: Episode) -> str:
    back = "not back" if e.back_after_s is None else f"{e.back_after_s:g} s"
    outcomes = "; ".join(f"{o} {n}" for o, n in e.outcomes.items())
    name = e.name if e.phase == "load" else f"{e.name} (warm-up)"
    return (f"| {name} | {e.t:.0f} | {e.seconds:.1f} | {e.rss_before_kib / 1024:.1f} "
            f"| {e.peak_kib / 1024:.1f} | {e.rss_after_kib / 1024:.1f} | {back} "
            f"| {e.fds_before} / {e.fds_peak} / {e.fds_after} "
            f"| {e.tasks_before} / {e.tasks_after} | {outcomes} | {e.note} |")


# --- the run -------------------------------------------------------------------------------

@dataclass
class Processes:
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, cmd: list[str], log_path: Path, env: dict[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        proc = start_in_session(cmd, log_path, env, REPO)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        # All are told first, so that their graceful exits overlap.
        for proc in self.procs:
            if proc.poll() is None:
                signal_group(proc, signal.SIGTERM)
        for proc in self.procs:
            wait_or_kill(proc, 15)


async def wait_http(url: str, proc: subprocess.Popen[bytes], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status < 500:
                        return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {seconds:g} s")


async def settle(pid: int, base: str, ports: Ports, limit: float) -> float:
    """Waits until the proxy has no open stream and no TCP connection but its listener."""
    started = time.monotonic()
    await asyncio.sleep(1.0)
    while time.monotonic() - started < limit:
        _, _, tcp, _ = fd_census(pid, ports)
        busy = {role: n for role, n in tcp.items() if role not in ("listen", "non-tcp")}
        if not busy and gauge(await scrape(base), "agentproxy_open_streams") == 0:
            break
        await asyncio.sleep(1.0)
    await asyncio.sleep(0.5)
    return time.monotonic() - started


@dataclass
class Verdict:
    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append((name, ok, detail))

    @property
    def flat(self) -> bool:
        return all(ok for name, ok, _ in self.checks if name in FLAT_CHECKS)

    @property
    def clean(self) -> bool:
        return all(ok for name, ok, _ in self.checks if name not in FLAT_CHECKS)


FLAT_CHECKS = ("memory", "file descriptors", "sockets", "tasks", "open streams",
               "concurrency slots", "memory after each episode")


@dataclass
class LogScan:
    lines: int = 0
    access_lines: int = 0
    tracebacks: int = 0
    reload_errors: int = 0
    send_timeouts: int = 0


def scan_log(path: Path) -> LogScan:
    """Counts in the proxy's log, read a line at a time: with the access log on it holds a
    line per request, tens of MB in a long run."""
    scan = LogScan()
    with path.open("rb") as f:
        for line in f:
            scan.lines += 1
            if b" agentproxy.access: " in line:
                scan.access_lines += 1
                scan.send_timeouts += b" error=send_timeout" in line
            elif b"Traceback" in line:
                scan.tracebacks += 1
            elif b"route table not reloaded" in line:
                scan.reload_errors += 1
    return scan


def judge(base_s: Sample, end: Sample, tally: Tally, tracebacks: int,
          reloads: dict[str, float], writes: Counter[str]) -> Verdict:
    v = Verdict()
    grew = (end.rss_kib - base_s.rss_kib) / 1024
    allowed = max(RSS_MARGIN_MIB, RSS_MARGIN_FRACTION * base_s.rss_kib / 1024)
    v.check("memory", grew <= allowed,
            f"RSS {base_s.rss_kib / 1024:.1f} -> {end.rss_kib / 1024:.1f} MiB "
            f"({grew:+.1f}; allowed +{allowed:.1f})")
    v.check("file descriptors", end.fds - base_s.fds <= FD_MARGIN,
            f"{base_s.fds} -> {end.fds} (allowed +{FD_MARGIN})")
    v.check("sockets", end.sockets - base_s.sockets <= SOCKET_MARGIN,
            f"{base_s.sockets} -> {end.sockets} (allowed +{SOCKET_MARGIN}); end: {end.tcp}")
    tasks_ok = (base_s.tasks is not None and end.tasks is not None
                and end.tasks - base_s.tasks <= TASK_MARGIN)
    v.check("tasks", tasks_ok, f"{base_s.tasks} -> {end.tasks} (allowed +{TASK_MARGIN})")
    v.check("open streams", end.open_streams == 0, f"{end.open_streams} at the end")
    v.check("concurrency slots", end.slots == 0 and end.queued == 0,
            f"{end.slots} held and {end.queued} queued at the end")
    unexpected = sum(n for (kind, outcome), n in tally.counts.items()
                     if outcome not in KIND_BY_NAME[kind].expected)
    v.check("outcomes", unexpected == 0, f"{unexpected} unexpected of {sum(tally.counts.values())}")
    v.check("proxy log", tracebacks == 0, f"{tracebacks} tracebacks")
    good = writes["a"] + writes["b"]
    ok_reloads = reloads.get("success") == good and reloads.get("error") == writes["broken"]
    v.check("reloads", ok_reloads,
            f"wrote {good} valid and {writes['broken']} broken; the proxy counted "
            f"{reloads.get('success'):g} successes and {reloads.get('error'):g} errors")
    return v


def judge_episodes(v: Verdict, records: list[Episode], tally: Tally, scan: LogScan,
                   timeouts: dict[str, float], hostile: episodes.UpstreamStats) -> None:
    if not records:
        return
    judged = [e for e in records if e.phase == "load"]
    late = [e for e in judged if e.back_after_s is None]
    bursts = [e for e in judged if e.name == "burst"]
    if not judged:
        v.check("memory after each episode", False,
                "no episode ran after the warm-up: the main load was too short for one")
    else:
        v.check("memory after each episode", not late,
                f"{len(judged) - len(late)} of {len(judged)} episodes after the warm-up back "
                f"within max({RSS_MARGIN_MIB:g} MiB, {100 * RSS_MARGIN_FRACTION:g} %) of their "
                "RSS before; bursts (MiB before -> peak -> after): "
                + (", ".join(f"{e.rss_before_kib / 1024:.0f} -> {e.peak_kib / 1024:.0f} -> "
                             f"{e.rss_after_kib / 1024:.0f}" for e in bursts) or "none"))
    readers = sum(n for (kind, _), n in tally.counts.items() if kind == "slow_reader")
    if any(e.name == "slow" for e in records):
        v.check("send timeouts", scan.send_timeouts == readers and hostile.hose_completed == 0,
                f"{readers} slow readers; {scan.send_timeouts} access lines with "
                f"error=send_timeout; the upstream saw {hostile.hose_ended_early} of its "
                f"{hostile.hose_started} streams let go early, {hostile.hose_completed} complete")
    if any(e.name == "silent" for e in records):
        heads = sum(n for (kind, _), n in tally.counts.items()
                    if kind in ("silent_socket", "half_head"))
        bodies = sum(n for (kind, _), n in tally.counts.items() if kind == "half_body")
        got_heads, got_bodies = timeouts.get("header", 0.0), timeouts.get("body", 0.0)
        v.check("connection timeouts", got_heads == heads and got_bodies == bodies,
                f"sent {heads} silent or half heads and {bodies} half bodies; "
                f"agentproxy_connection_timeouts_total: header {got_heads:g}, "
                f"body {got_bodies:g}")


def sample_row(s: Sample, prev: Sample | None) -> str:
    cpu = "-"
    if prev is not None and s.t > prev.t:
        cpu = f"{100 * (s.cpu_s - prev.cpu_s) / (s.t - prev.t):.0f}"
    tcp = ", ".join(f"{k} {v}" for k, v in sorted(s.tcp.items()))
    return (f"| {s.phase} | {s.t:.0f} | {s.rss_kib / 1024:.1f} | {s.fds} | {s.sockets} ({tcp}) "
            f"| {s.tasks} | {s.open_streams} | {s.slots} / {s.queued} | {cpu} |")


def report(samples: list[Sample], tally: Tally, v: Verdict, extra: dict[str, Any],
           records: list[Episode]) -> str:
    lines = ["| phase | t s | RSS MiB | fds | sockets | tasks | open streams | slots held / queued "
             "| proxy CPU % |",
             "|---|--:|--:|--:|---|--:|--:|--:|--:|"]
    prev: Sample | None = None
    for s in samples:
        lines.append(sample_row(s, prev if s.phase in ("load", "end") else None))
        prev = s
    if records:
        lines += ["", "Episodes (with the mixed load going on; RSS in MiB; back: seconds after "
                  "the episode until RSS was within the margin of its value before):", "",
                  "| episode | t s | s | RSS before | peak | after | back | fds before / peak "
                  "/ after | tasks before / after | outcomes | |",
                  "|---|--:|--:|--:|--:|--:|--:|---|---|---|---|"]
        lines += [episode_row(e) for e in records]
    lines += ["", "| kind | requests | expected | unexpected | outcomes |",
              "|---|--:|--:|--:|---|"]
    for k in (*KINDS, *EPISODE_KINDS):
        mine = {o: n for (kind, o), n in tally.counts.items() if kind == k.name}
        if not mine and k.weight == 0:
            continue
        total = sum(mine.values())
        exp = sum(n for o, n in mine.items() if o in k.expected)
        outcomes = "; ".join(f"{o}: {n}" for o, n in sorted(mine.items(), key=lambda x: -x[1]))
        lines.append(f"| {k.name} | {total} | {exp} | {total - exp} | {outcomes} |")
    all_n = sum(tally.counts.values())
    all_exp = sum(n for (kind, o), n in tally.counts.items() if o in KIND_BY_NAME[kind].expected)
    lines.append(f"| **all** | {all_n} | {all_exp} | {all_n - all_exp} | |")
    for (kind, outcome), examples in tally.examples.items():
        for ex in examples:
            lines.append(f"unexpected {kind} / {outcome}: {ex}")
    lines.append("")
    for name, value in extra.items():
        lines.append(f"{name}: {value}")
    lines += ["", "Verdict (end against baseline, both idle after a settle):"]
    for name, ok, detail in v.checks:
        lines.append(f"  {'ok  ' if ok else 'FAIL'} {name}: {detail}")
    lines.append(f"memory, sockets and tasks: {'FLAT' if v.flat else 'NOT FLAT'}; "
                 f"traffic: {'as expected' if v.clean else 'UNEXPECTED RESULTS'}")
    return "\n".join(lines)


def under_load(samples: list[Sample], peak_kib: int = 0) -> str:
    """Ranges of the samples taken under load, and the RSS trend (least squares) over them."""
    load = [s for s in samples if s.phase == "load"]
    if not load:
        return "no samples"
    rss = [s.rss_kib / 1024 for s in load]
    slope = 0.0
    if len(load) > 1:
        mt = sum(s.t for s in load) / len(load)
        mr = sum(rss) / len(rss)
        var = sum((s.t - mt) ** 2 for s in load)
        slope = 60 * sum((s.t - mt) * (r - mr) for s, r in zip(load, rss, strict=True)) / var
    tasks = [s.tasks for s in load if s.tasks is not None]
    return (f"{len(load)} samples; RSS {min(rss):.1f}-{max(rss):.1f} MiB (first {rss[0]:.1f}, "
            f"last {rss[-1]:.1f}, trend {slope:+.2f} MiB/min); fds {min(s.fds for s in load)}-"
            f"{max(s.fds for s in load)}; tasks {min(tasks, default=0)}-{max(tasks, default=0)}; "
            f"peak RSS (VmHWM) {max(peak_kib, *(s.hwm_kib for s in samples)) / 1024:.1f} MiB")


def proxy_counters(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float],
                   name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for (metric, labels), value in metrics.items():
        if metric == name:
            out[dict(labels).get(label, "")] += value
    return dict(out)


async def soak(args: argparse.Namespace) -> int:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    RESULTS.mkdir(exist_ok=True)
    proxy_log = RESULTS / f"soak-{stamp}-proxy.log"
    fake_log = RESULTS / f"soak-{stamp}-fake.log"
    ports = Ports(*(free_port() for _ in range(5)))
    base = f"http://127.0.0.1:{ports.proxy}"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    procs = Processes()
    bad = BadStats()
    letta = FakeLetta(
        default_scenario=Scenario(delay=0.02),
        default_conversation_scenario=Scenario(
            sse="conversation_stream", sync="conversation_sync.response.json", delay=0.02),
    )
    letta_cancelled = letta_disconnected = 0
    tally = Tally()
    writes: Counter[str] = Counter()
    samples: list[Sample] = []
    total = args.minutes * 60.0
    warmup = min(60.0, 0.2 * total)
    load_s = 0.0
    # CPU seconds of (proxy, fake upstream, this process) over the load phases.
    cpu_load = [0.0, 0.0, 0.0]
    wall0 = time.monotonic()

    def drain_letta() -> None:
        # The fake records every request; keep only the counts.
        nonlocal letta_cancelled, letta_disconnected
        letta_cancelled += len(letta.cancelled_run_ids)
        letta_disconnected += len(letta.disconnected)
        letta.cancelled_run_ids.clear()
        letta.disconnected.clear()
        letta.requests.clear()

    hose_slots = args.slow_readers
    settings = episodes.Settings(
        host="127.0.0.1", port=ports.proxy, key=KEY, send_timeout=args.send_timeout,
        header_timeout=args.header_timeout, body_timeout=args.body_timeout,
        slow_readers=args.slow_readers, silent_sockets=args.silent_sockets,
        burst_streams=args.burst_streams, burst_over=args.burst_over,
    )
    runner: EpisodeRunner | None = None

    with tempfile.TemporaryDirectory(prefix="agentproxy-soak-") as tmp:
        routes = Path(tmp) / "routes.yaml"
        write_atomically(routes, routes_yaml(ports, "a", hose_slots))
        try:
            async with serving(bad_app(bad), ports.bad), serving(make_app(letta), ports.letta):
                fake = procs.start(
                    [sys.executable, str(BENCH / "fake_upstream.py"), "--port", str(ports.fake),
                     "--chunks", "20", "--delay-chunk", "0.01"], fake_log)
                env = {**os.environ, "SOAK_KEY": KEY}
                env.pop("AGENTPROXY_API_KEYS", None)
                # As a user starts it, access log included (into proxy_log), with the
                # timeouts the episodes wait out shortened.
                proxy = procs.start(
                    [sys.executable, "-m", "proxy", "serve", "--routes", str(routes),
                     "--host", "127.0.0.1", "--port", str(ports.proxy), "--workers", "1",
                     "--reload-interval", "1", "--send-timeout", str(args.send_timeout),
                     "--header-timeout", str(args.header_timeout),
                     "--body-timeout", str(args.body_timeout)], proxy_log, env)
                await wait_http(f"http://127.0.0.1:{ports.fake}/v1/models", fake, 20)
                await wait_http(base + "/readyz", proxy, 30)
                pid = proxy.pid
                log(f"proxy pid {pid} on {base}; load {total:g} s ({warmup:g} s warm-up), "
                    f"concurrency {args.concurrency}, at most {args.rate:g} req/s, "
                    f"seed {args.seed}")
                await asyncio.sleep(1.0)  # the readiness checks' connections close
                samples.append(await take_sample("start", 0.0, pid, base, ports))
                t0 = time.monotonic()
                runner = EpisodeRunner(settings, args.episode_list, args.episode_gap,
                                       args.episode_settle, pid, base, t0, tally)

                def cpu_now() -> tuple[float, float, float]:
                    me = resource.getrusage(resource.RUSAGE_SELF)
                    return cpu_seconds(pid), cpu_seconds(fake.pid), me.ru_utime + me.ru_stime

                async def phase(seconds: float, sample_every: float | None,
                                with_episodes: bool = False) -> None:
                    nonlocal load_s
                    began, cpu_began = time.monotonic(), cpu_now()
                    reload_task = asyncio.create_task(
                        reloader(routes, ports, hose_slots, args.reload_every, writes, stop))
                    load_task = asyncio.create_task(
                        load(base, seconds, args.concurrency, args.rate,
                             args.seed + len(samples), tally, stop))
                    tasks = [reload_task, load_task]
                    if runner is not None and runner.names:
                        tasks.append(asyncio.create_task(
                            runner.loop(began + seconds, stop) if with_episodes
                            else runner.warm_up(stop)))
                    try:
                        while not load_task.done():
                            await asyncio.wait({load_task}, timeout=sample_every)
                            if not load_task.done() and sample_every is not None:
                                samples.append(await take_sample(
                                    "load", time.monotonic() - t0, pid, base, ports))
                                drain_letta()
                                log(sample_row(samples[-1], None))
                        await load_task
                        # An episode under way ends on its own (each is bounded in time).
                        await asyncio.gather(*tasks[2:])
                    finally:
                        for task in tasks:
                            task.cancel()
                            with contextlib.suppress(asyncio.CancelledError):
                                await task
                        load_s += time.monotonic() - began
                        for i, (a, b) in enumerate(zip(cpu_began, cpu_now(), strict=True)):
                            cpu_load[i] += b - a
                    if proxy.poll() is not None:
                        raise RuntimeError(f"the proxy exited with {proxy.returncode}")

                await phase(warmup, None)
                waited = await settle(pid, base, ports, args.settle)
                samples.append(await take_sample("baseline", time.monotonic() - t0, pid, base,
                                                 ports))
                log(f"baseline after {waited:.0f} s of settling: {sample_row(samples[-1], None)}")
                if not stop.is_set():
                    await phase(total - warmup, args.sample_every, with_episodes=True)
                # The reloader stopped: let the proxy see the last write before counting.
                waited_end = await settle(pid, base, ports, args.settle)
                await asyncio.sleep(1.5)
                samples.append(await take_sample("end", time.monotonic() - t0, pid, base,
                                                 ports))
                _, _, _, other_fds = fd_census(pid, ports)
                metrics = await scrape(base)
                drain_letta()
        finally:
            procs.stop_all()

    wall = time.monotonic() - wall0
    scan = scan_log(proxy_log)
    log_size = proxy_log.stat().st_size
    trim_log(proxy_log)
    trim_log(fake_log)
    reloads = proxy_counters(metrics, "agentproxy_reloads_total", "result")
    timeouts = proxy_counters(metrics, "agentproxy_connection_timeouts_total", "phase")
    records = runner.records if runner is not None else []
    v = judge(samples[1], samples[-1], tally, scan.tracebacks, reloads, writes)
    judge_episodes(v, records, tally, scan, timeouts, bad.hostile)
    extra: dict[str, Any] = {
        "load": f"{load_s:.0f} s, {sum(tally.counts.values())} requests "
                f"({sum(tally.counts.values()) / max(load_s, 1):.1f}/s); the whole run "
                f"{wall:.0f} s",
        "settle": f"{waited:.0f} s before the baseline, {waited_end:.0f} s before the end",
        "under load": under_load(samples, runner.peak_kib if runner is not None else 0),
        "metric samples on /metrics": f"{samples[1].series} at the baseline, "
                                      f"{samples[-1].series} at the end",
        "route file writes": dict(writes),
        "proxy reloads (agentproxy_reloads_total)": reloads,
        "proxy log": f"{scan.tracebacks} tracebacks, {scan.reload_errors} 'route table not "
                     f"reloaded' errors (expected: one per broken write), {scan.access_lines} "
                     f"access lines ({scan.send_timeouts} with error=send_timeout), "
                     f"{scan.lines} lines in all, {log_size / MiB:.1f} MiB "
                     f"({proxy_log.relative_to(REPO)}, cut to its first and last MiB)",
        "proxy requests by status (agentproxy_requests_total)":
            proxy_counters(metrics, "agentproxy_requests_total", "status"),
        "proxy upstream errors by code":
            proxy_counters(metrics, "agentproxy_upstream_errors_total", "code"),
        "proxy failovers": proxy_counters(metrics, "agentproxy_failovers_total", "upstream"),
        "bad upstream": f"{dict(bad.requests)}; slow requests cancelled when the client left: "
                        f"{bad.slow_cancelled}, completed: {bad.slow_completed}",
        "proxy connection timeouts (agentproxy_connection_timeouts_total)": timeouts,
        "hostile upstream streams": (
            f"hose {bad.hostile.hose_started} started, {bad.hostile.hose_ended_early} let go "
            f"early by the proxy, {bad.hostile.hose_completed} complete; big events "
            f"{bad.hostile.big_started} started, {bad.hostile.big_ended_early} let go early, "
            f"{bad.hostile.big_completed} complete"),
        "fake Letta": f"{letta_cancelled} runs cancelled, {letta_disconnected} streams "
                      f"disconnected, {letta.completed_streams} completed",
        "proxy fds other than sockets at the end": other_fds,
        "CPU during the load (cores)":
            f"proxy {cpu_load[0] / load_s:.2f}, fake upstream {cpu_load[1] / load_s:.2f}, "
            f"soak.py {cpu_load[2] / load_s:.2f}, all {sum(cpu_load) / load_s:.2f}",
    }
    print(report(samples, tally, v, extra, records))
    if args.json:
        out = {
            "started_utc": stamp,
            "settings": {"minutes": args.minutes, "concurrency": args.concurrency,
                         "rate": args.rate, "seed": args.seed, "warmup_s": warmup,
                         "reload_every_s": args.reload_every,
                         "sample_every_s": args.sample_every,
                         "episodes": args.episode_list, "episode_gap_s": args.episode_gap,
                         "send_timeout_s": args.send_timeout,
                         "header_timeout_s": args.header_timeout,
                         "body_timeout_s": args.body_timeout,
                         "slow_readers": args.slow_readers,
                         "silent_sockets": args.silent_sockets,
                         "burst_streams": args.burst_streams, "burst_over": args.burst_over},
            "kinds": [{"name": k.name, "weight": k.weight, "what": k.what,
                       "expected": sorted(k.expected)} for k in (*KINDS, *EPISODE_KINDS)],
            "samples": [s.__dict__ for s in samples],
            "episodes": [e.__dict__ for e in records],
            "outcomes": [{"kind": k, "outcome": o, "count": n}
                         for (k, o), n in sorted(tally.counts.items())],
            "unexpected_examples": {f"{k} / {o}": ex for (k, o), ex in tally.examples.items()},
            "extra": extra,
            "verdict": {"flat": v.flat, "clean": v.clean,
                        "checks": [{"name": n, "ok": ok, "detail": d} for n, ok, d in v.checks]},
        }
        await asyncio.to_thread(Path(args.json).write_text, json.dumps(out, indent=1, default=str))
    if stop.is_set():
        log("interrupted: the verdict covers a shortened run")
        return 130
    return 0 if v.flat and v.clean else 1


def mix_text() -> Iterator[str]:
    total = sum(k.weight for k in KINDS)
    for k in KINDS:
        yield f"  {k.name:<14} {100 * k.weight / total:3.0f} %  {k.what}"
    yield "\nThe episodes' requests:"
    for k in EPISODE_KINDS:
        yield f"  {k.name:<14}  {k.what}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=doc.split("\n\n", 1)[1] + "\nThe mix:\n"
                                + "\n".join(mix_text()))
    p.add_argument("--minutes", type=float, default=10.0, help="minutes of load (default 10)")
    p.add_argument("--concurrency", type=int, default=32, help="clients at once (default 32)")
    p.add_argument("--rate", type=float, default=250.0,
                   help="requests per second at most, all clients together (default 250)")
    p.add_argument("--seed", type=int, default=1, help="seed of the request mix (default 1)")
    p.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    p.add_argument("--reload-every", type=float, default=5.0,
                   help="seconds between rewrites of the route file (default 5)")
    p.add_argument("--sample-every", type=float, default=30.0,
                   help="seconds between samples under load (default 30)")
    p.add_argument("--settle", type=float, default=75.0,
                   help="longest wait for the proxy to go idle before a sample (default 75)")
    e = p.add_argument_group("episodes (hostile loads during the main load, one at a time)")
    e.add_argument("--episodes", default="slow,silent,burst",
                   help="which, in this order, over and over: slow (readers that stop), "
                        "silent (sockets that send nothing or half a request), burst "
                        "(events near and over the 4 MiB bound); 'none' for none "
                        "(default slow,silent,burst)")
    e.add_argument("--episode-gap", type=float, default=8.0,
                   help="seconds of the mixed load alone between two episodes (default 8)")
    e.add_argument("--episode-settle", type=float, default=15.0,
                   help="longest wait after an episode for RSS to come back (default 15)")
    e.add_argument("--send-timeout", type=float, default=2.0,
                   help="the proxy's --send-timeout (default 2)")
    e.add_argument("--header-timeout", type=float, default=2.0,
                   help="the proxy's --header-timeout (default 2)")
    e.add_argument("--body-timeout", type=float, default=2.0,
                   help="the proxy's --body-timeout (default 2)")
    e.add_argument("--slow-readers", type=int, default=8,
                   help="slow readers at once; also their upstream's max_concurrency "
                        "(default 8)")
    e.add_argument("--silent-sockets", type=int, default=60,
                   help="silent connections at once, a third of each sort (default 60)")
    e.add_argument("--burst-streams", type=int, default=24,
                   help="big-event streams at once (default 24)")
    e.add_argument("--burst-over", type=int, default=6,
                   help="how many of them are over the bound (default 6)")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.concurrency < 1 or args.rate <= 0:
        p.error("--minutes, --concurrency and --rate must be positive")
    names = [n.strip() for n in args.episodes.split(",") if n.strip() not in ("", "none")]
    if any(n not in episodes.EPISODES for n in names):
        p.error(f"--episodes takes some of {', '.join(episodes.EPISODES)}, or none")
    args.episode_list = names
    if min(args.send_timeout, args.header_timeout, args.body_timeout) <= 0:
        p.error("the timeouts must be positive: the episodes wait for them")
    if not (1 <= args.slow_readers <= 256 and 3 <= args.silent_sockets <= 3000
            and 1 <= args.burst_streams <= 200 and 0 <= args.burst_over <= args.burst_streams):
        p.error("--slow-readers 1-256, --silent-sockets 3-3000, --burst-streams 1-200, "
                "--burst-over at most --burst-streams")
    if args.minutes > 24 * 60:
        p.error("--minutes is at most a day")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with asyncio.Runner(loop_factory=new_loop_factory()) as runner:
        return runner.run(soak(args))


if __name__ == "__main__":
    sys.exit(main())
