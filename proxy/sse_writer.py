"""The writer of one SSE stream to one client, and the send timeout that guards every stream
an app writes. The bytes themselves come from proxy/sse.py."""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from proxy.sse import DONE

if TYPE_CHECKING:
    from proxy.exchange import Exchange

__all__ = ["SSEWriter", "Streams"]


class Streams:
    """The streams an app is writing, and the send timeout that guards them.

    A client that stops reading blocks the writer (aiohttp waits for the socket to drain),
    so no upstream deadline fires and the stream would hold its upstream, its concurrency
    slot and any session lock for good. Each write notes when it began; one sweep a second
    interrupts a request whose write has been blocked longer than `send_timeout` (the
    protocol of proxy/exchange.py). A timer per write would cost more than the write.
    """

    __slots__ = ("_open", "send_timeout")

    def __init__(self, send_timeout: float = 60.0) -> None:
        self.send_timeout = send_timeout
        self._open: set[SSEWriter] = set()

    def __len__(self) -> int:
        return len(self._open)

    def sweep(self, now: float) -> None:
        limit = now - self.send_timeout
        for writer in self._open:
            since = writer.writing_since
            if since and since < limit:
                writer.exchange.interrupt("send")


class SSEWriter:
    """The one writer of a stream to one client: headers, events, the end.

    Writes after the client left return False instead of raising, so a disconnect never
    reaches the front's catch-all as a 500; the caller stops at the first False.
    """

    __slots__ = (
        "_request", "_response", "_streams", "_time", "closed", "exchange", "writing_since",
    )

    def __init__(
        self,
        request: web.Request,
        response: web.StreamResponse,
        exchange: Exchange,
        streams: Streams,
    ) -> None:
        self._request = request
        self._response = response
        self.exchange = exchange
        self._streams = streams
        task = exchange.task
        assert task is not None
        self._time = task.get_loop().time
        self.closed = False
        self.writing_since = 0.0

    async def commit(self) -> None:
        await self._response.prepare(self._request)
        # aiohttp sends a stream's head at once: what its writer counted so far is not body.
        self.exchange.body_offset = self._request.writer.output_size
        self._streams._open.add(self)

    async def write(self, data: bytes) -> bool:
        if self.closed:
            return False
        self.writing_since = self._time()
        try:
            await self._response.write(data)
        except ConnectionResetError:
            # aiohttp's ClientConnectionResetError: the transport is already closing.
            self.closed = True
            self._refused(len(data), False)
            return False
        finally:
            self.writing_since = 0.0
        return True

    async def pump(
        self,
        items: AsyncIterable[Any],
        encode: Callable[[Any], bytes] | None,
        token: Callable[[Any], bool],
    ) -> bool:
        """Writes each of `items` (its bytes from `encode`, or the item itself when None)
        as `write` does, until they end; False as soon as a write finds the client gone. The
        time to the first item `token` says carries output is the exchange's `ttft`.

        `write`'s body, inlined in the loop: this runs once per upstream read, and a
        coroutine call per write cost more than the write's own Python."""
        if self.closed:
            return False
        exchange = self.exchange
        write = self._response.write
        clock = self._time
        async for item in items:
            if exchange.ttft is None and token(item):
                exchange.ttft = time.perf_counter() - exchange.started
            data: bytes = item if encode is None else encode(item)
            self.writing_since = clock()
            try:
                await write(data)
            except ConnectionResetError:
                self.closed = True
                self._refused(len(data), False)
                return False
            finally:
                self.writing_since = 0.0
        return True

    def abandon(self) -> None:
        """The client stopped reading: drop the connection, never write to it again."""
        self.closed = True
        transport = self._request.transport
        if transport is not None:
            transport.abort()

    def detach(self) -> None:
        """No more writes will block: the send timeout stops watching this stream. Called
        after `end`, whose write blocks like any other."""
        self._streams._open.discard(self)

    async def end(self, tail: bytes = DONE) -> None:
        """`tail` and the end of the chunked body in one write: one send to the client."""
        if self.closed:
            return
        self.writing_since = self._time()
        try:
            await self._response.write_eof(tail)
        except ConnectionResetError:
            self.closed = True
            self._refused(len(tail), True)
            # Its end never reached the client: the stream was cut short on its side.
            self.exchange.error = self.exchange.error or "client_closed"
        finally:
            self.writing_since = 0.0

    def _refused(self, size: int, end: bool) -> None:
        """aiohttp counts a write as output before it finds the transport closing and raises
        (a lost connection ends the wait of a write with another error, or the handler's
        cancellation): that write's bytes, as framed, are taken back out of the count."""
        if self._response.headers.get("Transfer-Encoding") == "chunked":
            framed = size + len(f"{size:x}") + 4 if size else 0
            size = framed + 5 if end else framed  # and the last chunk, `0\r\n\r\n`
        self.exchange.body_offset += size
