"""`read_any`: what `StreamReader.readany()` returns, everything buffered, taken in one step.

aiohttp 3.14's `readany()` drains its buffer one HTTP chunk at a time, and after each chunk
calls the connection's `resume_reading()`, which runs the parser again over no data: about 200
Python opcodes per chunk. A model server writes each token event as an HTTP chunk of its own,
so for a stream this was most of the proxy's work per event. `read_any` takes the buffered
chunks at once (one join), with the same bytes, the same end and the same errors, and resumes
the connection where that does something: when flow control paused it (as aiohttp does, once
the buffer is drained) or while the body is being inflated. A whole answer's single chunk
skips aiohttp's generic path too.

It relies on `StreamReader` internals, the names in `INTERNALS`, and on two of the connection
protocol's, `PROTOCOL_INTERNALS`. `FAST` says whether the installed aiohttp has them all;
without them every read is `readany()`. tests/test_bulk_read.py fails on an aiohttp whose
internals changed, and holds `read_any` to `readany()` over real connections: many chunks per
read, a body beyond the reader's high-water marks in bytes and in chunks, a compressed body,
a connection cut in the middle of the body.
"""

from __future__ import annotations

from typing import Final

from aiohttp import StreamReader
from aiohttp.base_protocol import BaseProtocol

__all__ = ["FAST", "INTERNALS", "PROTOCOL_INTERNALS", "read_any", "read_whole"]

INTERNALS: Final = (
    "_buffer", "_buffer_offset", "_cursor", "_eof", "_exception", "_http_chunk_splits",
    "_low_water", "_low_water_chunks", "_protocol", "_size", "_timer", "_wait",
)
# And of the connection's protocol: whether flow control paused it.
PROTOCOL_INTERNALS: Final = ("_reading_paused", "_buffer_paused")
FAST: Final = all(hasattr(StreamReader, name) for name in INTERNALS) and all(
    hasattr(BaseProtocol, name) for name in PROTOCOL_INTERNALS
)


async def read_any(content: StreamReader) -> bytes:
    """The bytes buffered in `content` (waiting for some when there are none); b"" at its end."""
    if type(content) is not _READER or content._exception is not None:
        # aiohttp's EmptyStreamReader (a request without a body) and any other kind of reader
        # keep their own state: theirs is the only way to read them.
        return await content.readany()
    buffer = content._buffer
    if not buffer:
        while not buffer and not content._eof:
            await content._wait("readany")
        if not buffer:
            return b""  # the end
    if content._buffer_offset:
        return content.read_nowait()  # a chunk read in part: aiohttp's own path
    content._timer.assert_timeout()
    if len(buffer) == 1:
        data = buffer.popleft()
    else:
        data = b"".join(buffer)
        buffer.clear()
    size = len(data)
    content._size -= size
    cursor = content._cursor = content._cursor + size
    splits = content._http_chunk_splits
    if splits:
        # The ends of the chunks just read are of no more use; the end of the last one stays,
        # as aiohttp keeps it (it marks the current position).
        last = splits[-1]
        splits.clear()
        if last >= cursor:
            splits.append(last)
    if content._size < content._low_water and (
        splits is None or len(splits) < content._low_water_chunks
    ):
        protocol = content._protocol
        # aiohttp resumes after every chunk; that runs the parser again over no data, which
        # only does something for a connection paused by flow control or a body being
        # inflated (its decompressor goes on there).
        if (
            protocol._reading_paused
            or protocol._buffer_paused
            or content.total_compressed_bytes is not None
        ):
            protocol.resume_reading()
    return data


async def read_whole(content: StreamReader, limit: int) -> bytes | None:
    """The whole body of `content`, or None once it is past `limit` bytes (the caller says
    whose fault that is). A body that came in one read is returned as it came, not copied."""
    chunk = await read_any(content)
    if type(content) is _READER and content._eof and not content._buffer:
        # The body came whole before the first read (as a small answer does, in the packet
        # of its head): the read that would only return its end is not needed.
        return chunk if len(chunk) <= limit else None
    parts: list[bytes] = []
    size = 0
    while chunk:
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
        chunk = await read_any(content)
    return parts[0] if len(parts) == 1 else b"".join(parts)


# The one type read_any reads itself (none where the internals are missing).
_READER: Final = StreamReader if FAST else None
