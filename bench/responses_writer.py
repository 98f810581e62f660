"""Micro-benchmark: CPU per chunk (and per event) of the Responses API writer.

Feeds realistic chunk streams through ResponsesWriter the way the handler will — one batch
per chunk, then finish — with the JSON encoding of every event included, and prints µs per
input chunk and per Responses event, best of several rounds. For the streams an openai
upstream sends, `+decode` is the whole path from the upstream's bytes (one read per event, as
a model server writes them): the relay's checks, the chunk's JSON decoded (or its token read
from the stream's template), and the writer; `one read` the same with the whole stream in one
read, as a proxy reads a fast local upstream.

* token-sized chat streams as OpenAI-compatible servers send them (text; reasoning then
  text; text then two parallel tool calls with fragmented arguments);
* every captured Letta stream in tests/fixtures/letta/, as LettaTranslator turns it into
  chunks (translated once, outside the timing: bench/letta_translator.py measures that part).

    python bench/responses_writer.py [--repeat 300] [--rounds 5]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import re
import sys
from pathlib import Path

import orjson
from timing import best_of

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.chunks import Comment, Out  # noqa: E402
from proxy.ingress.responses_request import parse_responses_request  # noqa: E402
from proxy.ingress.responses_writer import ResponsesWriter  # noqa: E402
from proxy.openai_types import ChatChunk, ChunkFactory, make_usage  # noqa: E402
from proxy.response_ids import new_response_id  # noqa: E402
from proxy.sse import SSEDecoder  # noqa: E402
from proxy.upstreams.letta_translator import LettaTranslator  # noqa: E402
from proxy.upstreams.openai_relay import RelayState  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "letta"
_TIMESTAMP = re.compile(rb"^\d\d:\d\d:\d\d\t", re.MULTILINE)
WORDS = (
    "The", " proxy", " translates", " each", " chunk", " into", " Responses", " events",
    ",", " keeping", " ids", " stable", " and", " sequence", " numbers", " without", " gaps",
    ".", " Unicode", " like", " café", " and", " 東京", " passes", " through", "\n",
)
REQUEST = (
    b'{"model":"local/qwen","input":"hi","instructions":"Be brief.","stream":true,'
    b'"tools":[{"type":"function","name":"get_weather","parameters":{"type":"object",'
    b'"properties":{"city":{"type":"string"}}}}]}'
)


def synthetic() -> dict[str, list[Out]]:
    f = ChunkFactory("local/qwen")
    words = itertools.cycle(WORDS)
    text: list[Out] = [f.role(), *(f.content(next(words)) for _ in range(300)),
                       f.finish("stop"), f.usage(make_usage(812, 300))]
    thinking: list[Out] = [f.role(), *(f.reasoning(next(words)) for _ in range(60)),
                           *(f.content(next(words)) for _ in range(200)), f.finish("stop"),
                           f.usage(make_usage(812, 260))]
    args = ['{"', "city", '":', ' "', "Par", "is", '",', ' "', "unit", '":', ' "', "c", '"}']
    tools: list[Out] = [f.role(), *(f.content(next(words)) for _ in range(12))]
    for index, call_id in enumerate(("call_a1", "call_b2")):
        tools.append(tool_delta(f, index, call_id=call_id, name="get_weather", args=""))
        tools.extend(tool_delta(f, index, args=a) for a in args * 2)
    tools += [f.finish("tool_calls"), f.usage(make_usage(900, 64))]
    return {"openai text, 300 tokens": text, "openai reasoning 60 + text 200": thinking,
            "openai text + 2 parallel tool calls": tools}


def tool_delta(f: ChunkFactory, index: int, *, call_id: str | None = None,
               name: str | None = None, args: str) -> ChatChunk:
    call: dict[str, object] = {"index": index, "function": {"arguments": args}}
    if call_id is not None:
        call.update(id=call_id, type="function", function={"name": name, "arguments": args})
    return f.chunk({"tool_calls": [call]})  # type: ignore[list-item]


def letta() -> dict[str, list[Out]]:
    streams: dict[str, list[Out]] = {}
    for path in sorted(FIXTURES.glob("*.sse")):
        decoder = SSEDecoder()
        translator = LettaTranslator(ChunkFactory("letta/bot"), show_reasoning=True,
                                     show_tools=True, include_usage=True)
        chunks: list[Out] = list(translator.start())
        for event in decoder.feed(_TIMESTAMP.sub(b"", path.read_bytes())):
            if event.data != "[DONE]":
                chunks.extend(translator.feed(event))
        chunks.extend(translator.finish())
        streams["letta " + path.stem] = [c for c in chunks if not isinstance(c, Comment)]
    return streams


def write(chunks: list[Out], echo: object) -> int:
    writer = ResponsesWriter(new_response_id(), "local/qwen", 1_700_000_000, echo)  # type: ignore[arg-type]
    size = len(writer.start())
    for chunk in chunks:
        size += len(writer.feed((chunk,)))
    return size + len(writer.finish())


def upstream_reads(chunks: list[Out]) -> list[bytes]:
    """The chunks as an openai upstream sends them: one `data:` event per read, [DONE] last."""
    return [b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks] + [b"data: [DONE]\n\n"]


def decode_and_write(reads: list[bytes], echo: object) -> int:
    """What OpenAI._decode and the Responses writer do with those reads."""
    writer = ResponsesWriter(new_response_id(), "local/qwen", 1_700_000_000, echo)  # type: ignore[arg-type]
    state = RelayState("up")
    decoder = SSEDecoder()
    size = len(writer.start())
    for read in reads:
        batch = state.decode_read(decoder, read)
        if batch:
            size += len(writer.feed(batch))
    return size + len(writer.finish())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    echo = parse_responses_request(REQUEST).echo
    streams = {**synthetic(), **letta()}
    total_chunks = total_events = 0
    total_best = 0.0
    print(f"{'stream':50} {'chunks':>6} {'events':>6} {'µs/chunk':>9} {'µs/event':>9} "
          f"{'+decode µs/chunk':>17} {'one read':>9}")
    for name, chunks in streams.items():
        writer = ResponsesWriter("resp_x", "m", 0, echo)
        raw = writer.start() + b"".join(writer.feed((c,)) for c in chunks) + writer.finish()
        events = raw.count(b"event: ")
        best = best_of(args.rounds, args.repeat, functools.partial(write, chunks, echo))
        decoded = one_read = ""
        if name.startswith("openai"):
            reads = upstream_reads(chunks)
            whole = best_of(
                args.rounds, args.repeat, functools.partial(decode_and_write, reads, echo)
            )
            decoded = f"{whole / len(chunks) * 1e6:.2f}"
            whole = best_of(args.rounds, args.repeat,
                            functools.partial(decode_and_write, [b"".join(reads)], echo))
            one_read = f"{whole / len(chunks) * 1e6:.2f}"
        total_chunks += len(chunks)
        total_events += events
        total_best += best
        print(f"{name:50} {len(chunks):>6} {events:>6} {best / len(chunks) * 1e6:>9.2f} "
              f"{best / events * 1e6:>9.2f} {decoded:>17} {one_read:>9}")
    print(f"{'all streams':50} {total_chunks:>6} {total_events:>6} "
          f"{total_best / total_chunks * 1e6:>9.2f} {total_best / total_events * 1e6:>9.2f}")


if __name__ == "__main__":
    main()
