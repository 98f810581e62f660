"""The internal chunk language: what every adapter produces and every ingress writer reads.

An adapter that translates (letta, echo, custom; openai when a writer needs objects) yields
batches of `Out`: OpenAI `chat.completion.chunk` dicts built with `ChunkFactory`, or a
`Comment` the writer turns into its API's keep-alive. The chat completions writer encodes
chunks as they are; the Responses writer turns the same chunks into Responses events.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, TypeAlias

from proxy.openai_types import ChatChunk


@dataclass(frozen=True, slots=True)
class Comment:
    """An SSE comment line for the client (`: keep-alive`), not a data event."""

    text: str = "keep-alive"


KEEP_ALIVE: Final = Comment()

Out: TypeAlias = ChatChunk | Comment
