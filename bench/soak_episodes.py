"""The hostile loads of bench/soak.py: slow readers, silent sockets and big-event bursts.

bench/soak.py runs them one at a time, in turn, between stretches of its mixed load, and
measures the proxy around each. Every one is bounded in count and in time, and talks only to
127.0.0.1:

- **slow readers**: `slow_readers` streams at once from an upstream that sends as fast as it
  can (`hose`, its `max_concurrency` equal to that count); each client reads the response
  head and the first byte of the body, then nothing. The proxy's writes to it block, and its
  `--send-timeout` must end the stream: afterwards the client finds the connection closed
  without `data: [DONE]`. Then as many ordinary streams on the same upstream at once must all
  be served, which they can only be if every slot was given back.
- **silent sockets**: `silent_sockets` connections at once, a third sending nothing, a third
  half a request head, a third a whole head and half its body. `--header-timeout` must close
  the first two without an answer, `--body-timeout` must answer the last with a 408 and
  close it; meanwhile `/healthz` must answer.
- **big-event bursts**: `burst_streams` streams at once whose one content event is near the
  proxy's bound on one upstream event (proxy/sse.py MAX_EVENT, 4 MiB), `burst_over` of them
  over it: those must be relayed whole, these must end with an error event and `[DONE]`.

The misbehaving upstream of soak.py answers the models these loads ask for through
`upstream_answer`.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass, field

import aiohttp
import orjson
from aiohttp import web

from proxy.sse import MAX_EVENT

# Content bytes of the one big event: a little under the bound (the rest of the event's line,
# `data: ` and the chunk's JSON around the text, fits in what is left), and over it.
NEAR_CONTENT = MAX_EVENT - 4096
OVER_CONTENT = MAX_EVENT + 64 * 1024
# The hose: events of 16 KiB of text, 64 MiB in all at most, far more than the socket buffers
# between it and a client that stopped reading can hold (a few MiB), so such a stream can
# only end early if the proxy ends it.
HOSE_EVENT_CONTENT = 16 * 1024
HOSE_TOTAL = 64 * 1024 * 1024
# What a slow reader's kernel and its asyncio reader hold before the proxy's writes block.
SLOW_RCVBUF = 16 * 1024
# After the hold, the seconds a slow reader gives its connection to end.
SLOW_DRAIN = 10.0
# Anything a silent socket receives is kept up to this size (an answer it should not get).
ANSWER_KEEP = 64 * 1024

OK_STREAM, OK_SYNC = "200 stream complete", "200 ok"
SLOW_ENDED = "ended by the proxy, no [DONE]"
CLOSED_SILENT = "closed without an answer"
BODY_408 = "408 request_timeout, then closed"
OVER_ERROR = "200 stream error-event upstream_error"

HALF_HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty"


@dataclass(frozen=True, slots=True)
class Settings:
    host: str
    port: int
    key: str
    send_timeout: float
    header_timeout: float
    body_timeout: float
    slow_readers: int
    silent_sockets: int
    burst_streams: int
    burst_over: int

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"


# (kind, outcome, detail): soak.py counts them with the mixed load's outcomes.
Outcome = tuple[str, str, str]


@dataclass
class Findings:
    outcomes: list[Outcome] = field(default_factory=list)
    # What else the report shows for the episode (times to close, sizes).
    note: str = ""

    def add(self, kind: str, outcome: str, detail: str = "") -> None:
        self.outcomes.append((kind, outcome, detail))


# --- the upstream side ----------------------------------------------------------------------

@dataclass
class UpstreamStats:
    hose_started: int = 0
    hose_ended_early: int = 0  # the proxy closed the connection: what the send timeout does
    hose_completed: int = 0
    big_started: int = 0
    big_ended_early: int = 0
    big_completed: int = 0


def _chunk(delta: dict[str, object], finish: str | None = None) -> bytes:
    return b"data: " + orjson.dumps({
        "id": "chatcmpl-soak", "object": "chat.completion.chunk", "created": 1700000000,
        "model": "m", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }) + b"\n\n"


_ROLE = _chunk({"role": "assistant", "content": ""})
_FINISH = _chunk({}, "stop")
_DONE = b"data: [DONE]\n\n"
_bodies: dict[str, bytes] = {}


_SIZES = {"big": NEAR_CONTENT, "big-over": OVER_CONTENT, "hose": HOSE_EVENT_CONTENT}


def _content_event(model: str) -> bytes:
    """The one content event of `model`'s size, built once and shared by every stream."""
    event = _bodies.get(model)
    if event is None:
        event = _bodies[model] = _chunk({"content": "x" * _SIZES[model]})
    return event


async def upstream_answer(request: web.Request, model: str, stats: UpstreamStats
                          ) -> web.StreamResponse | None:
    """The stream for one of this module's models (`hose`, `hose-check`, `big`, `big-over`),
    or None for any other."""
    if model not in ("hose", "hose-check", "big", "big-over"):
        return None
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    completed = False
    try:
        await resp.write(_ROLE)
        if model == "hose":
            stats.hose_started += 1
            event = _content_event(model)
            for _ in range(HOSE_TOTAL // len(event)):
                await resp.write(event)
        elif model == "hose-check":
            for word in ("slot", "free"):
                await resp.write(_chunk({"content": word}))
        else:
            stats.big_started += 1
            await resp.write(_content_event(model))
        await resp.write(_FINISH)
        await resp.write_eof(_DONE)
        completed = True
    except ConnectionError:
        # The proxy let go of the stream (a send timeout, an event over the bound): expected.
        pass
    finally:
        # Also when the handler is cancelled: the proxy closed the connection while a write
        # waited.
        if model == "hose":
            stats.hose_completed += int(completed)
            stats.hose_ended_early += int(not completed)
        elif model.startswith("big"):
            stats.big_completed += int(completed)
            stats.big_ended_early += int(not completed)
    return resp


# --- shared client pieces --------------------------------------------------------------------

def request_bytes(s: Settings, model: str, stream: bool, content_length: int | None = None
                  ) -> tuple[bytes, bytes]:
    """(head, body) of a chat completion, written by hand for the raw-socket clients."""
    body = orjson.dumps({"model": model, "stream": stream,
                         "messages": [{"role": "user", "content": "hello soak"}]})
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {s.key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body) if content_length is None else content_length}\r\n\r\n"
    ).encode()
    return head, body


def error_code(status: int, raw: bytes) -> str:
    try:
        err = orjson.loads(raw)["error"]
        return f"{status} {err.get('code') or err.get('type')}"
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return f"{status} non-openai-error"


async def read_until_closed(reader: asyncio.StreamReader, limit: float, keep: int
                            ) -> tuple[bool, int, bytes]:
    """Reads until the peer closes or `limit` seconds pass: (closed, bytes read, the first
    `keep` bytes if `keep` > 0, else the last 128)."""
    got, kept = 0, b""
    try:
        async with asyncio.timeout(limit):
            while chunk := await reader.read(65536):
                got += len(chunk)
                kept = (kept + chunk)[:keep] if keep else (kept + chunk)[-128:]
    except TimeoutError:
        return False, got, kept
    except ConnectionError:
        pass  # reset instead of closed: as final
    return True, got, kept


async def short_stream(http: aiohttp.ClientSession, s: Settings, model: str) -> tuple[str, str]:
    """A small stream read to its end: OK_STREAM, or what went wrong."""
    async with http.post(s.base + "/v1/chat/completions",
                         data=orjson.dumps({"model": model, "stream": True,
                                            "messages": [{"role": "user", "content": "hi"}]}),
                         headers={"Authorization": f"Bearer {s.key}",
                                  "Content-Type": "application/json"}) as resp:
        if resp.status != 200:
            raw = await resp.read()
            return error_code(resp.status, raw), raw[:200].decode("utf-8", "replace")
        lines = [line.strip() async for line in resp.content if line.startswith(b"data: ")]
    if not lines or lines[-1] != b"data: [DONE]":
        return "200 stream without [DONE]", f"{len(lines)} events"
    if any(b'"error"' in line for line in lines):
        return "200 stream with an error event", lines[-2][:200].decode()
    return OK_STREAM, ""


# --- slow readers ----------------------------------------------------------------------------

async def _open_small(s: Settings) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection with a small receive buffer, so that not reading soon blocks the sender."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RCVBUF)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (s.host, s.port))
        return await asyncio.open_connection(sock=sock, limit=SLOW_RCVBUF)
    except BaseException:
        sock.close()
        raise


async def _slow_reader(s: Settings, hold: float) -> tuple[str, str]:
    reader, writer = await _open_small(s)
    try:
        writer.write(b"".join(request_bytes(s, "hose", True)))
        async with asyncio.timeout(10.0):
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            if status != 200:
                _, _, raw = await read_until_closed(reader, 2.0, ANSWER_KEEP)
                return f"{status} before the stream began", raw[-200:].decode(errors="replace")
            await reader.readexactly(1)  # the first byte of the body
        # From here on nothing is read: the proxy's writes fill the buffers, then block.
        await asyncio.sleep(hold)
        closed, got, tail = await read_until_closed(reader, SLOW_DRAIN, 0)
        if not closed:
            return "still open after the send timeout", f"{got} bytes read after the hold"
        if b"data: [DONE]" in tail:
            return "stream completed (the proxy did not end it)", f"{got} bytes after the hold"
        return SLOW_ENDED, ""
    finally:
        writer.transport.abort()


async def slow_readers(s: Settings) -> Findings:
    found = Findings()
    # The send timeout, the proxy's sweep (once a second) and some slack.
    hold = s.send_timeout + 3.0
    started = time.monotonic()
    results = await asyncio.gather(*(_slow_reader(s, hold) for _ in range(s.slow_readers)),
                                   return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            if not isinstance(r, Exception):
                raise r
            found.add("slow_reader", f"exception {type(r).__name__}", str(r))
        else:
            found.add("slow_reader", *r)
    # Every slot of `hose` must be free again: as many streams as it has slots, at once, with
    # a queue_timeout that a held slot would overrun.
    connector = aiohttp.TCPConnector(limit=s.slow_readers, force_close=True)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=15)) as http:
        checks = await asyncio.gather(
            *(short_stream(http, s, "hose-check") for _ in range(s.slow_readers)),
            return_exceptions=True)
    for c in checks:
        if isinstance(c, BaseException):
            if not isinstance(c, Exception):
                raise c
            found.add("slot_check", f"exception {type(c).__name__}", str(c))
        else:
            found.add("slot_check", *c)
    found.note = (f"{s.slow_readers} readers held {hold:g} s without reading; "
                  f"{time.monotonic() - started:.1f} s with the slot check")
    return found


# --- silent sockets --------------------------------------------------------------------------

async def _silent(s: Settings, variant: str, limit: float) -> tuple[str, str, float]:
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(s.host, s.port)
    try:
        if variant == "half_head":
            writer.write(HALF_HEAD)
        elif variant == "half_body":
            head, body = request_bytes(s, "fake", False, content_length=256)
            writer.write(head + body[:32])
        closed, got, answer = await read_until_closed(reader, limit, ANSWER_KEEP)
        took = time.monotonic() - started
        if not closed:
            return "still open", f"after {limit:g} s", took
        if variant != "half_body":
            if got:
                return "answered", answer[:200].decode(errors="replace"), took
            return CLOSED_SILENT, "", took
        status_line, _, rest = answer.partition(b"\r\n")
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            return "closed without an answer" if not got else "not HTTP", "", took
        _, _, body_bytes = rest.partition(b"\r\n\r\n")
        code = error_code(int(parts[1]), body_bytes)
        return (BODY_408 if code == "408 request_timeout" else f"{code}, then closed"), "", took
    finally:
        writer.transport.abort()


async def _healthz(s: Settings) -> tuple[str, str, float]:
    started = time.monotonic()
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http, http.get(
        s.base + "/healthz", timeout=aiohttp.ClientTimeout(total=5)
    ) as resp:
        await resp.read()
        took = time.monotonic() - started
        return (OK_SYNC if resp.status == 200 else f"{resp.status}"), "", took


SILENT_VARIANTS = ("silent_socket", "half_head", "half_body")


async def silent_sockets(s: Settings) -> Findings:
    found = Findings()
    limits = {"silent_socket": s.header_timeout, "half_head": s.header_timeout,
              "half_body": s.body_timeout}
    kinds = [SILENT_VARIANTS[i % 3] for i in range(s.silent_sockets)]
    tasks = [asyncio.create_task(_silent(s, k, limits[k] + 5.0)) for k in kinds]
    # While they are all open (well inside the shorter timeout), the proxy must still answer.
    await asyncio.sleep(min(0.5, s.header_timeout / 4))
    probe = await asyncio.gather(_healthz(s), return_exceptions=True)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    took: dict[str, list[float]] = {k: [] for k in SILENT_VARIANTS}
    for kind, r in zip(kinds, results, strict=True):
        if isinstance(r, BaseException):
            if not isinstance(r, Exception):
                raise r
            found.add(kind, f"exception {type(r).__name__}", str(r))
            continue
        outcome, detail, seconds = r
        found.add(kind, outcome, detail)
        took[kind].append(seconds)
    p = probe[0]
    if isinstance(p, BaseException):
        found.add("healthz_probe", f"exception {type(p).__name__}", str(p))
        probe_text = "failed"
    else:
        found.add("healthz_probe", p[0], p[1])
        probe_text = f"{1000 * p[2]:.0f} ms"
    found.note = "closed after " + ", ".join(
        f"{k} {min(v):.1f}-{max(v):.1f} s" for k, v in took.items() if v
    ) + f"; /healthz meanwhile {probe_text}"
    return found


# --- big-event bursts ------------------------------------------------------------------------

async def _big_stream(http: aiohttp.ClientSession, s: Settings, model: str
                      ) -> tuple[str, str, int]:
    """(outcome, detail, size of the largest event). Events are split by hand: aiohttp's
    line reader refuses lines over 128 KiB."""
    async with http.post(s.base + "/v1/chat/completions",
                         data=orjson.dumps({"model": model, "stream": True,
                                            "messages": [{"role": "user", "content": "big"}]}),
                         headers={"Authorization": f"Bearer {s.key}",
                                  "Content-Type": "application/json"}) as resp:
        if resp.status != 200:
            raw = await resp.read()
            return error_code(resp.status, raw), raw[:200].decode("utf-8", "replace"), 0
        buf = bytearray()
        events: list[bytes] = []
        largest = big = 0
        scanned = 0
        async for chunk in resp.content.iter_any():
            buf += chunk
            while (cut := buf.find(b"\n\n", scanned)) >= 0:
                event = bytes(buf[:cut])
                del buf[:cut + 2]
                scanned = 0
                largest = max(largest, len(event))
                if len(event) > 64 * 1024:
                    # Not parsed: its size and shape are what matter, and a parse would cost
                    # this process more memory than the proxy's copy.
                    ok_shape = event.startswith(b'data: {"') and event.endswith(b"}")
                    big += ok_shape and len(event) > NEAR_CONTENT
                    events.append(b"data: {}" if ok_shape else b"data: <malformed big event>")
                else:
                    events.append(event)
            scanned = max(0, len(buf) - 1)
    data = [e[6:] for e in events if e.startswith(b"data: ")]
    if not data or data[-1] != b"[DONE]":
        return "200 stream without [DONE]", f"{len(data)} events", largest
    errors = [orjson.loads(d)["error"] for d in data[:-1] if d.startswith(b'{"error"')]
    if errors:
        return f"200 stream error-event {errors[0].get('code')}", "", largest
    if big != 1:
        return "200 stream without the big event whole", f"largest event {largest} bytes", largest
    return OK_STREAM, "", largest


async def big_burst(s: Settings) -> Findings:
    found = Findings()
    # The over-bound streams spread among the others.
    n, over = s.burst_streams, min(s.burst_over, s.burst_streams)
    spread = {int(i * n / over) for i in range(over)} if over else set()
    models = ["big-over" if i in spread else "big" for i in range(n)]
    started = time.monotonic()
    connector = aiohttp.TCPConnector(limit=n, force_close=True)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=60)) as http:
        results = await asyncio.gather(*(_big_stream(http, s, m) for m in models),
                                       return_exceptions=True)
    largest = 0
    for model, r in zip(models, results, strict=True):
        kind = "big_event_over" if model == "big-over" else "big_event"
        if isinstance(r, BaseException):
            if not isinstance(r, Exception):
                raise r
            found.add(kind, f"exception {type(r).__name__}", str(r))
            continue
        found.add(kind, r[0], r[1])
        largest = max(largest, r[2])
    found.note = (f"{models.count('big')} events of {NEAR_CONTENT / 2**20:.2f} MiB and "
                  f"{models.count('big-over')} of {OVER_CONTENT / 2**20:.2f} MiB at once, "
                  f"{time.monotonic() - started:.1f} s; largest event relayed "
                  f"{largest / 2**20:.2f} MiB")
    return found


EPISODES = {"slow": slow_readers, "silent": silent_sockets, "burst": big_burst}


def nominal_seconds(name: str, s: Settings) -> float:
    """About how long an episode takes when all goes well (to fit one in before a deadline)."""
    if name == "slow":
        return s.send_timeout + 4.0
    if name == "silent":
        return max(s.header_timeout, s.body_timeout) + 1.0
    return 5.0

