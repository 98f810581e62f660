"""The internal chunk language: what every adapter produces and every ingress writer reads.

An adapter that translates (letta, echo, custom; openai when a writer needs objects) yields
batches of `Out`: OpenAI `chat.completion.chunk` dicts built with `ChunkFactory`, a
`TextRun` (chunks that differ only in their text, as one object), or a `Comment` the writer
turns into its API's keep-alive. The chat completions writer encodes chunks as they are; the
Responses writer turns the same chunks into Responses events.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from proxy.openai_types import ChatChunk


@dataclass(frozen=True, slots=True)
class Comment:
    """An SSE comment line for the client (`: keep-alive`), not a data event."""

    text: str = "keep-alive"


KEEP_ALIVE: Final = Comment()


@dataclass(slots=True)
class TextRun:
    """Consecutive chunks that differ only in their text: each is `outer` with one choice,
    `choice` with the delta `{field: text}`, for each of `texts`, where `field` is "content"
    or "reasoning_content"; no finish_reason and no usage among them.

    The openai adapter's decode path gives one for a run of an upstream's token events
    (proxy/upstreams/openai_template.py), so that a writer can take the texts as they are,
    without a dict per token to build and read again; `chunks()` gives them as chunks.
    Not frozen, though nothing changes one: a frozen dataclass's `__init__` sets each field
    through `object.__setattr__`, 0.3 µs more for every read of a token stream."""

    outer: dict[str, Any]
    choice: dict[str, Any]
    texts: list[str]
    field: str = "content"

    def chunks(self) -> list[ChatChunk]:
        outer = self.outer
        choice = self.choice
        field = self.field
        # Shallow copies of scalars: every chunk is a dict of its own, as decoding gives.
        chunks: list[Any] = [
            {**outer, "choices": [{**choice, "delta": {field: text}}]} for text in self.texts
        ]
        return chunks


Out: TypeAlias = ChatChunk | TextRun | Comment


def chat_chunks(batch: Iterable[Out]) -> Iterator[ChatChunk]:
    """The chunks of a batch, each as a chunk (a TextRun's one by one), without keep-alives."""
    for out in batch:
        if isinstance(out, TextRun):
            yield from out.chunks()
        elif not isinstance(out, Comment):
            yield out


# What holding one chunk (or one piece of text) of an answer costs beside its text, counted
# toward the answer's bound: a stream of one-character tokens must not hold a hundred times
# its text in objects before the bound stops it. An underestimate (a chunk dict takes about
# 700 bytes), so that a long answer of small tokens, 260,000 of them, still fits in 64 MiB.
HELD_CHUNK: Final = 256


def held_size(batch: Iterable[Out]) -> int:
    """What a batch adds to an answer held whole: its text, reasoning, refusal and tool-call
    arguments in characters, and HELD_CHUNK for each chunk; what MAX_ANSWER
    (proxy/upstreams/http_errors.py) bounds."""
    size = 0
    for out in batch:
        if isinstance(out, TextRun):
            size += sum(map(len, out.texts)) + HELD_CHUNK * len(out.texts)
        elif not isinstance(out, Comment):
            size += HELD_CHUNK
            for choice in out["choices"]:
                for key, value in choice["delta"].items():
                    if type(value) is str:
                        size += len(value)
                    elif key == "tool_calls" and type(value) is list:
                        size += held_by_calls(value)
    return size


def held_by_calls(calls: list[Any]) -> int:
    """What tool-call deltas add to an answer held whole: HELD_CHUNK each, and the characters
    of their names and arguments."""
    size = 0
    for call in calls:
        size += HELD_CHUNK
        function = call.get("function") if type(call) is dict else None
        if type(function) is dict:
            size += sum(len(v) for v in function.values() if type(v) is str)
    return size
