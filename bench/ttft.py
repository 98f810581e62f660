"""Time to first token: a closed-loop streaming client for OpenAI-compatible servers.

`--concurrency` workers each send a streaming chat completion, read it to the end, and send
the next one, until `--duration` seconds have passed (streams already started are finished,
each bounded by `--timeout`). For every stream it records the time from sending the request
to the first complete SSE `data:` event (TTFT) and to the end of the stream, and checks that
the stream ended with `data: [DONE]` after the expected number of events.

With `--api responses` it asks `POST /v1/responses` instead: TTFT is then the time to the
first complete `response.output_text.delta` event (the events before it, `response.created`
and the like, carry no text), and a stream counts as good when it has one such event per
content event of the fake (`--chunks` - 2), `response.completed` as its last event, and
`data: [DONE]` after that.

    python bench/ttft.py --url http://127.0.0.1:8080 --key sk-... --concurrency 64 --duration 10

Prints median and p99 TTFT; `--json` prints one JSON object instead (bench/run.py uses it).
wrk measures throughput better: this client is Python, and at high concurrency its own event
loop adds to the figures, so compare targets measured with it, not absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from runtime import new_loop_factory


@dataclass
class Tally:
    ttft: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile, q in [0, 100]."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


RESPONSES_DELTA = b"response.output_text.delta"
RESPONSES_LAST = b"response.completed"


async def one_stream(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str],
    expected: int, tally: Tally, responses: bool = False,
) -> None:
    """One stream. Chat: `expected` data events, the first of them timed. Responses:
    `expected` text deltas, the first of them timed, `response.completed` last."""
    start = time.perf_counter()
    first: float | None = None
    events = 0
    done = after_done = False
    last_name = b""
    buf = b""
    async with session.post(url, data=body, headers=headers) as resp:
        if resp.status != 200:
            await resp.read()
            tally.errors[f"status {resp.status}"] += 1
            return
        async for chunk in resp.content.iter_any():
            # SSE allows CRLF line ends; normalising lets one separator search find events.
            buf = (buf + chunk).replace(b"\r\n", b"\n")
            while (cut := buf.find(b"\n\n")) >= 0:
                block, buf = buf[:cut], buf[cut + 2:]
                name = b"message"
                for line in block.split(b"\n"):
                    if line.startswith(b"event:"):
                        name = line[6:].strip()
                        continue
                    if not line.startswith(b"data:"):
                        continue
                    if done:
                        after_done = True
                    elif line[5:].strip() == b"[DONE]":
                        done = True
                    elif not responses or name == RESPONSES_DELTA:
                        if first is None:
                            first = time.perf_counter()
                        events += 1
                    if responses and not done:
                        last_name = name
    end = time.perf_counter()
    if first is None:
        tally.errors["no text delta" if responses else "no data event"] += 1
        return
    tally.ttft.append(first - start)
    tally.total.append(end - start)
    if not done:
        tally.errors["no [DONE]"] += 1
    elif after_done:
        tally.errors["data after [DONE]"] += 1
    elif responses and last_name != RESPONSES_LAST:
        tally.errors[f"last event {last_name.decode(errors='replace')}"] += 1
    elif expected and events != expected:
        tally.errors[f"{events} events, expected {expected}"] += 1
    else:
        tally.ok += 1


async def worker(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str],
    expected: int, deadline: float, tally: Tally, responses: bool,
) -> None:
    while time.perf_counter() < deadline:
        try:
            await one_stream(session, url, body, headers, expected, tally, responses)
        except (aiohttp.ClientError, TimeoutError) as exc:
            tally.errors[type(exc).__name__] += 1
            # A refused connection fails at once; without a pause this loop would spin.
            await asyncio.sleep(0.01)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    responses = args.api == "responses"
    req: dict[str, Any] = {"model": args.model, "stream": True}
    if responses:
        # What bench/wrk/responses.lua sends.
        url = args.url.rstrip("/") + "/v1/responses"
        req["input"] = "hi"
        # One text delta per content event: the fake's role and finish events carry none.
        expected = max(0, args.chunks - 2)
    else:
        url = args.url.rstrip("/") + "/v1/chat/completions"
        req["messages"] = [{"role": "user", "content": "hi"}]
        if args.usage:
            req["stream_options"] = {"include_usage": True}
        expected = args.chunks + (1 if args.usage and args.chunks else 0)
    body = orjson.dumps(req)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {args.key}"}
    tally = Tally()
    connector = aiohttp.TCPConnector(limit=args.concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if args.warmup > 0:
            warm = Tally()
            until = time.perf_counter() + args.warmup
            await asyncio.gather(*(
                worker(session, url, body, headers, expected, until, warm, responses)
                for _ in range(args.concurrency)
            ))
        started = time.perf_counter()
        deadline = started + args.duration
        await asyncio.gather(*(
            worker(session, url, body, headers, expected, deadline, tally, responses)
            for _ in range(args.concurrency)
        ))
        elapsed = time.perf_counter() - started

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 3)

    return {
        "url": url,
        "api": args.api,
        "concurrency": args.concurrency,
        "duration_s": round(elapsed, 3),
        "streams": len(tally.ttft),
        "ok": tally.ok,
        "streams_per_s": round(len(tally.ttft) / elapsed, 2) if elapsed else 0.0,
        "expected_events": expected,
        "errors": dict(tally.errors),
        "ttft_ms": {"p50": ms(percentile(tally.ttft, 50)), "p99": ms(percentile(tally.ttft, 99)),
                    "min": ms(min(tally.ttft, default=None)),
                    "max": ms(max(tally.ttft, default=None))},
        "total_ms": {"p50": ms(percentile(tally.total, 50)),
                     "p99": ms(percentile(tally.total, 99))},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="server base URL, without /v1")
    p.add_argument("--key", default="sk-bench-key", help="bearer key")
    p.add_argument("--model", default="bench")
    p.add_argument("--concurrency", "-c", type=int, default=1)
    p.add_argument("--duration", "-d", type=float, default=10.0, help="seconds of load")
    p.add_argument("--warmup", type=float, default=0.0, help="seconds of unrecorded load first")
    p.add_argument("--chunks", type=int, default=50,
                   help="the fake's --chunks: data events expected before [DONE] (with "
                        "--api responses, chunks - 2 text deltas); 0: no check")
    p.add_argument("--usage", action="store_true",
                   help="ask for stream_options.include_usage (expects one more event)")
    p.add_argument("--api", choices=("chat", "responses"), default="chat",
                   help="chat: POST /v1/chat/completions (default); responses: POST "
                        "/v1/responses, timed to the first response.output_text.delta")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds allowed per stream")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args()
    if args.concurrency < 1 or args.duration <= 0:
        p.error("--concurrency must be >= 1 and --duration > 0")
    if args.usage and args.api == "responses":
        p.error("--usage is for chat completions (a Responses stream always has its usage)")
    with asyncio.Runner(loop_factory=new_loop_factory()) as runner:
        result = runner.run(run(args))
    if args.json:
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
        return
    t, tot = result["ttft_ms"], result["total_ms"]
    print(f"{result['streams']} streams in {result['duration_s']} s "
          f"({result['streams_per_s']}/s) at concurrency {args.concurrency}, {result['ok']} ok")
    print(f"TTFT   median {t['p50']} ms   p99 {t['p99']} ms")
    print(f"stream median {tot['p50']} ms   p99 {tot['p99']} ms")
    if result["errors"]:
        print(f"errors: {result['errors']}")


if __name__ == "__main__":
    main()
