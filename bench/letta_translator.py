"""Micro-benchmark: CPU per upstream event of the Letta stream translator.

Replays every captured Letta stream in tests/fixtures/letta/ through SSEDecoder and
LettaTranslator (and the encoding of the chunks it emits, as the proxy does), and prints
µs per upstream event, best of several repetitions, per stream and overall.

    python bench/letta_translator.py [--repeat 2000] [--show reasoning,tools]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.chunks import Comment  # noqa: E402
from proxy.openai_types import ChunkFactory  # noqa: E402
from proxy.sse import SSEDecoder  # noqa: E402
from proxy.upstreams.letta_translator import LettaTranslator  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "letta"
_TIMESTAMP = re.compile(rb"^\d\d:\d\d:\d\d\t", re.MULTILINE)


def load_streams() -> dict[str, list[bytes]]:
    """Each capture split into the reads a proxy would see: one event per read."""
    streams = {}
    for path in sorted(FIXTURES.glob("*.sse")):
        raw = _TIMESTAMP.sub(b"", path.read_bytes())
        streams[path.name] = [block + b"\n\n" for block in raw.split(b"\n\n") if block.strip()]
    return streams


def translate(reads: list[bytes], show: set[str]) -> int:
    decoder = SSEDecoder()
    translator = LettaTranslator(
        ChunkFactory("bench"),
        show_reasoning="reasoning" in show,
        show_tools="tools" in show,
        include_usage=True,
    )
    written = 0
    for chunk in translator.start():
        written += len(orjson.dumps(chunk))
    for read in reads:
        for event in decoder.feed(read):
            if event.data == "[DONE]":
                continue
            for out in translator.feed(event):
                if not isinstance(out, Comment):
                    written += len(orjson.dumps(out))
    for chunk in translator.finish():
        written += len(orjson.dumps(chunk))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--show", default="", help="comma-separated: reasoning,tools")
    args = parser.parse_args()
    show = {s for s in args.show.split(",") if s}
    streams = load_streams()
    total_events = 0
    total_best = 0.0
    print(f"{'stream':48} {'events':>6} {'µs/event':>9}")
    for name, reads in streams.items():
        best = float("inf")
        for _ in range(args.rounds):
            start = time.process_time()
            for _ in range(args.repeat):
                translate(reads, show)
            best = min(best, time.process_time() - start)
        per_event = best / args.repeat / len(reads) * 1e6
        total_events += len(reads)
        total_best += best / args.repeat
        print(f"{name:48} {len(reads):>6} {per_event:>9.2f}")
    print(f"{'all captures':48} {total_events:>6} {total_best / total_events * 1e6:>9.2f}")


if __name__ == "__main__":
    main()
