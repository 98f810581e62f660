"""Micro-benchmark: CPU per upstream event of the `custom` kind's stream reader.

Replays captured (Flowise, Langflow, LangGraph) and specified (Dify, n8n) streams from
tests/fixtures/ through StreamReader with the §7 config of that server: framing decode, JSON
parse, rules, chunk building, and the encoding of every chunk as the proxy writes it. Each
capture is split into the reads a proxy would see (one event per read, as the servers send
them). Prints µs per upstream event, best of several rounds, per stream and overall, and
how much of it is orjson parsing the event's JSON alone (it grows with the event's size:
LangGraph's events are about 1.1 KB, Langflow's add_message events about 1.8 KB). The budget
is the Letta translator's figure (bench/letta_translator.py, about 4 µs).

    python bench/custom_rules.py [--repeat 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import orjson
from timing import best_of

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.chunks import Comment  # noqa: E402
from proxy.openai_types import ChunkFactory  # noqa: E402
from proxy.upstreams.custom_reader import StreamReader  # noqa: E402
from proxy.upstreams.custom_spec import CustomSpec, compile_custom  # noqa: E402
from tests import custom_configs  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"

STREAMS: list[tuple[str, str, str]] = [
    ("DIFY", "dify/chat_stream.sse", "sse"),
    ("DIFY", "dify/agent_stream.sse", "sse"),
    ("FLOWISE", "flowise/prediction_stream_chatid.response.sse", "sse"),
    ("LANGFLOW", "langflow/run_stream.response.ndjson", "ndjson"),
    ("LANGFLOW", "langflow/agent_run_stream.response.ndjson", "ndjson"),
    ("N8N", "n8n/stream.ndjson", "ndjson"),
    ("LANGGRAPH", "langgraph/thread_runs_stream_messages_tuple.response.sse", "sse"),
    ("LANGGRAPH", "langgraph/thread_runs_stream_tool_call_multi_mode.response.sse", "sse"),
]

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


def reads(raw: bytes, framing: str) -> list[bytes]:
    """The body cut after each event (SSE: blank line; NDJSON: each line, blank ones kept
    with the line before them, as Langflow writes one object and its blank line per chunk)."""
    if framing == "sse":
        cuts = [m.end() for m in _EVENT_END.finditer(raw)]
    else:
        cuts = [m.end() for m in re.finditer(rb"[^\n]*\n\n?", raw)]
    out: list[bytes] = []
    start = 0
    for cut in cuts:
        out.append(raw[start:cut])
        start = cut
    if start < len(raw):
        out.append(raw[start:])
    return out


def json_texts(raw: bytes, framing: str) -> list[bytes]:
    """The JSON text of every event, as the decoder hands it to orjson."""
    if framing == "sse":
        lines = [line for line in raw.splitlines() if line.startswith(b"data:")]
        return [line[5:].lstrip(b" ") for line in lines]
    return [line for line in raw.split(b"\n") if line.strip()]


def replay(spec: CustomSpec, chunks: list[bytes]) -> int:
    reader = StreamReader(spec, ChunkFactory("bench"), include_usage=True)
    written = 0
    for data in chunks:
        for out in reader.feed(data):
            if not isinstance(out, Comment):
                written += len(orjson.dumps(out))
        if reader.done:
            break
    while batch := reader.finish():
        for out in batch:
            if not isinstance(out, Comment):
                written += len(orjson.dumps(out))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    total_events = 0
    total_best = 0.0
    total_json = 0.0
    print(f"{'stream':62} {'events':>6} {'µs/event':>9} {'of it JSON':>10}")
    for config, name, framing in STREAMS:
        spec = compile_custom(custom_configs.upstream_block(getattr(custom_configs, config)))
        raw = (FIXTURES / name).read_bytes()
        chunks = reads(raw, framing)
        probe = StreamReader(spec, ChunkFactory("bench"))
        for data in chunks:
            probe.feed(data)
        events = probe.events
        texts = json_texts(raw, framing)

        def parse_all(texts: list[bytes] = texts) -> None:
            for text in texts:
                orjson.loads(text)

        best = best_of(args.rounds, args.repeat, lambda: replay(spec, chunks))  # noqa: B023
        parse = best_of(args.rounds, args.repeat, parse_all)
        total_events += events
        total_best += best
        total_json += parse
        print(f"{name:62} {events:>6} {best / events * 1e6:>9.2f} {parse / events * 1e6:>10.2f}")
    print(f"{'all streams':62} {total_events:>6} {total_best / total_events * 1e6:>9.2f} "
          f"{total_json / total_events * 1e6:>10.2f}")


if __name__ == "__main__":
    main()
