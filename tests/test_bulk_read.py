"""`read_any` (proxy/upstreams/bulk_read.py) against aiohttp's own `readany()`, over real
connections: the same bytes, the same end, the same error, and no stall where aiohttp's flow
control paused the connection. It reads aiohttp internals, so the first test fails loudly on an
aiohttp that changed them."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import aiohttp
import pytest
from aiohttp import StreamReader
from aiohttp.base_protocol import BaseProtocol

from proxy.upstreams.bulk_read import FAST, INTERNALS, PROTOCOL_INTERNALS, read_any, read_whole

Reader = Callable[[StreamReader], Awaitable[bytes]]


async def aiohttp_readany(content: StreamReader) -> bytes:
    return await content.readany()


READERS = [pytest.param(read_any, id="read_any"), pytest.param(aiohttp_readany, id="readany")]


def test_the_installed_aiohttp_has_every_internal_read_any_relies_on() -> None:
    missing = [name for name in INTERNALS if not hasattr(StreamReader, name)]
    missing += [name for name in PROTOCOL_INTERNALS if not hasattr(BaseProtocol, name)]
    assert not missing and FAST, f"aiohttp's internals changed: {missing} are gone"


class Script:
    """A raw HTTP/1.1 server that answers every request with a chunked body of `chunks`,
    written in one go, then the last chunk; or, with `cut`, closes the connection instead."""

    def __init__(self, chunks: list[bytes], cut: bool = False, gzip: bool = False) -> None:
        self.chunks = chunks
        self.cut = cut
        self.gzip = gzip
        self.written = 0  # body bytes handed to the socket and drained
        self._marks: list[tuple[int, asyncio.Event]] = []

    async def wrote(self, size: int | None = None) -> None:
        """Returns once `size` body bytes (all, by default) are in the socket, the client
        having read none of them: what a read then finds was buffered beforehand."""
        size = sum(map(len, self.chunks)) if size is None else size
        event = asyncio.Event()
        self._marks.append((size, event))
        self._passed()
        async with asyncio.timeout(20):
            await event.wait()

    def _passed(self) -> None:
        for size, event in self._marks:
            if self.written >= size:
                event.set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        encoding = b"Content-Encoding: gzip\r\n" if self.gzip else b""
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n" + encoding
                     + b"Transfer-Encoding: chunked\r\n\r\n")
        # In slices, so the test can see how far the writes got while its client is not reading.
        for start in range(0, len(self.chunks), 64):
            part = self.chunks[start:start + 64]
            writer.write(b"".join(b"%x\r\n%b\r\n" % (len(c), c) for c in part))
            await writer.drain()
            self.written += sum(map(len, part))
            self._passed()
        if not self.cut:
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        writer.close()


@asynccontextmanager
async def body_of(
    script: Script, read_bufsize: int = 2**16
) -> AsyncIterator[aiohttp.ClientResponse]:
    """The response to one request to `script`. A small `read_bufsize` lowers the marks at
    which aiohttp pauses the connection (twice it in bytes, a sixteenth of it in chunks)."""
    server = await asyncio.start_server(script.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with (
            aiohttp.ClientSession(read_bufsize=read_bufsize) as http,
            http.get(f"http://127.0.0.1:{port}/") as resp,
        ):
            yield resp
    finally:
        server.close()
        await server.wait_closed()


async def read_all(read: Reader, content: StreamReader) -> tuple[bytes, int]:
    """The whole body and how many reads it took."""
    parts: list[bytes] = []
    async with asyncio.timeout(20):
        while data := await read(content):
            parts.append(data)
    return b"".join(parts), len(parts)


@pytest.mark.parametrize("read", READERS)
async def test_every_chunk_arrives_in_order_and_the_body_ends(read: Reader) -> None:
    chunks = [b"data: {\"n\":%d}\n\n" % i for i in range(300)]
    script = Script(chunks)
    async with body_of(script) as resp:
        await script.wrote()  # one read may then take many chunks
        body, reads = await read_all(read, resp.content)
    assert body == b"".join(chunks)
    if read is read_any:
        assert reads < len(chunks) // 4


PAST_HIGH_WATER = {
    # Marks of 2,048 bytes and 64 chunks (a read_bufsize of 1,024).
    "in-chunks": [b"%03d" % i for i in range(300)],  # 300 chunks of 3 bytes
    "in-bytes": [bytes([65 + i % 26]) * 512 for i in range(128)],  # 64 KiB
}


@pytest.mark.parametrize("read", READERS)
@pytest.mark.parametrize("past", list(PAST_HIGH_WATER))
async def test_a_body_past_a_high_water_mark_resumes_and_ends(read: Reader, past: str) -> None:
    chunks = PAST_HIGH_WATER[past]
    script = Script(chunks)
    async with body_of(script, read_bufsize=1024) as resp:
        await script.wrote()
        body, _ = await read_all(read, resp.content)
    assert body == b"".join(chunks)


@pytest.mark.parametrize("read", READERS)
async def test_a_body_cut_in_the_middle_is_the_same_payload_error(read: Reader) -> None:
    chunks = [b"data: %d\n\n" % i for i in range(200)]
    script = Script(chunks, cut=True)
    async with body_of(script) as resp:
        await script.wrote()
        parts: list[bytes] = []
        with pytest.raises(aiohttp.ClientPayloadError):
            async with asyncio.timeout(20):
                while data := await read(resp.content):
                    parts.append(data)
    assert b"".join(parts) == b"".join(chunks)


@pytest.mark.parametrize("read", READERS)
async def test_a_read_after_a_partial_one_gives_the_rest_once(read: Reader) -> None:
    chunks = [b"data: %d\n\n" % i for i in range(50)]
    script = Script(chunks)
    async with body_of(script) as resp:
        await script.wrote()
        head = await resp.content.read(3)  # a part of the first chunk
        body, _ = await read_all(read, resp.content)
    assert head + body == b"".join(chunks)


async def test_a_reader_of_no_body_reads_as_its_end() -> None:
    # What aiohttp gives a request without a body: a reader of another type, with none of
    # the internals.
    assert await read_any(aiohttp.streams.EmptyStreamReader()) == b""


@pytest.mark.parametrize("read", READERS)
@pytest.mark.parametrize("inflated", [64 * 1024, 32 * 1024 * 1024], ids=["small", "bomb-like"])
async def test_a_compressed_body_inflates_to_the_same_bytes(read: Reader, inflated: int) -> None:
    # aiohttp inflates it as it is read, in bounded blocks that it goes on with when the
    # reader resumes the connection: a body that inflates 1,000 times over needs many.
    plain = (b"data: {\"choices\":[{\"delta\":{\"content\":\"tok\"}}]}\n\n" * inflated)[:inflated]
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    packed = packer.compress(plain) + packer.flush()
    script = Script([packed[i:i + 4096] for i in range(0, len(packed), 4096)], gzip=True)
    async with body_of(script) as resp:
        await script.wrote()
        body, _ = await read_all(read, resp.content)
    assert body == plain


@pytest.mark.parametrize("waited", [True, False], ids=["whole-before-the-read", "as-it-comes"])
@pytest.mark.parametrize("count", [1, 300])
async def test_read_whole_gives_the_whole_body_whenever_it_arrived(
    waited: bool, count: int
) -> None:
    chunks = [b"data: {\"n\":%d}\n\n" % i for i in range(count)]
    script = Script(chunks)
    async with body_of(script) as resp:
        if waited:
            await script.wrote()
        async with asyncio.timeout(20):
            body = await read_whole(resp.content, 1 << 20)
    assert body == b"".join(chunks)


@pytest.mark.parametrize("waited", [True, False], ids=["whole-before-the-read", "as-it-comes"])
@pytest.mark.parametrize("count", [1, 300])
async def test_read_whole_refuses_a_body_one_byte_past_its_limit(
    waited: bool, count: int
) -> None:
    chunks = [b"data: {\"n\":%d}\n\n" % i for i in range(count)]
    size = sum(map(len, chunks))
    for limit, expected in ((size, b"".join(chunks)), (size - 1, None)):
        script = Script(chunks)
        async with body_of(script) as resp:
            if waited:
                await script.wrote()
            async with asyncio.timeout(20):
                assert await read_whole(resp.content, limit) == expected
