"""The `echo` kind: answers with the last user message, with no network at all.

It serves first runs and demos, so it must also be harmless: what it echoes is capped
(`MAX_ECHO` characters, the rest replaced by a note), and a stream is produced in batches
with a yield to the event loop between them, so a huge message cannot hold the worker.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, Iterator
from typing import Any, ClassVar

import aiohttp

from proxy.chunks import Out
from proxy.exchange import Exchange
from proxy.openai_types import ChatChunk, ChunkFactory, accumulate, make_usage
from proxy.upstreams.base import Answer, ByteStream, Call, ChunkStream, Upstream
from proxy.upstreams.letta_request import refuse_unserved

_PIECES = re.compile(r"\S+\s*|\s+")
_TOKENS = re.compile(r"\w+|[^\w\s]")
# Characters echoed back at most; past it the reply is cut and says so.
MAX_ECHO = 64 * 1024
# Text counted exactly for usage; a longer text is estimated (about 4 characters a token).
_COUNT_EXACTLY = 64 * 1024
# Chunks per batch of a stream, between two yields to the event loop.
BATCH = 256


def message_text(content: Any) -> str:
    """The text of a message's `content`: a string, or the text parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text", "")
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
            and isinstance(part.get("text"), str)
        )
    return ""


def count_tokens(text: str) -> int:
    """A rough count (words and punctuation): echo has no tokenizer, only plausible numbers."""
    if len(text) > _COUNT_EXACTLY:
        return len(text) // 4
    return len(_TOKENS.findall(text))


class Echo(Upstream):
    kind: ClassVar[str] = "echo"

    def _chunks(self, call: Call) -> Iterator[ChatChunk]:
        messages = call.body["messages"]
        reply = ""
        for message in reversed(messages):
            if message.get("role") == "user":
                reply = message_text(message.get("content"))
                break
        if len(reply) > MAX_ECHO:
            reply = (
                reply[:MAX_ECHO]
                + f" [echo: cut at {MAX_ECHO} of {len(reply)} characters]"
            )
        prompt = sum(count_tokens(message_text(m.get("content"))) for m in messages)
        factory = ChunkFactory(call.client_model)
        yield factory.role()
        for piece in _PIECES.findall(reply):
            yield factory.content(piece)
        yield factory.finish("stop")
        if call.include_usage or not call.stream:
            yield factory.usage(make_usage(prompt, count_tokens(reply)))

    async def complete(self, call: Call, http: aiohttp.ClientSession) -> Answer:
        refuse_unserved(call.body)
        chunks = list(self._chunks(call))
        return Answer(accumulate(chunks), chunks=chunks)

    async def probe(self, http: aiohttp.ClientSession, exchange: Exchange) -> None:
        """Nothing to contact."""

    async def open_stream(
        self, call: Call, http: aiohttp.ClientSession
    ) -> ChunkStream | ByteStream:
        # Here, not in the generator, which runs only once the writer reads it.
        refuse_unserved(call.body)
        return ChunkStream(self._batches(call))

    async def _batches(self, call: Call) -> AsyncGenerator[list[Out], None]:
        batch: list[Out] = []
        for chunk in self._chunks(call):
            batch.append(chunk)
            if len(batch) == BATCH:
                yield batch
                batch = []
                # Let other requests (and /healthz) run between batches.
                await asyncio.sleep(0)
        if batch:
            yield batch
