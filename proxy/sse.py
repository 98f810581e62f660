"""Every SSE byte the proxy reads or writes: a sans-IO codec (bytes in, events out, no
sockets and no event loop). The writer that puts the bytes on a client's connection is
proxy/sse_writer.py.

Decoding follows the WHATWG HTML "event stream interpretation" algorithm, so it agrees with
browsers and with httpx-sse about what an upstream sent, with two deliberate differences:

* A blank line with no `data` field dispatches nothing (the spec's rule; httpx-sse would
  yield an empty event there).
* `flush()` at end of stream keeps an event whose final line or blank line never arrived.
  The spec discards it, but many OpenAI-compatible servers end with `data: [DONE]` followed
  by one newline or none, and dropping that would make a complete stream look truncated.

The proxy sits on the streaming hot path, so the decoder never loops over single bytes in
Python: it finds line ends with `bytes.rfind`/`bytes.splitlines` (C loops), only ever scans
each received byte a bounded number of times, and decodes UTF-8 once per field value rather
than per chunk, which is also why a character split across two reads decodes intact.
"""

from __future__ import annotations

from contextlib import suppress
from dataclasses import dataclass

from proxy.errors import ProxyError

__all__ = [
    "DONE",
    "EVENT_END",
    "KEEPALIVE",
    "SSE_HEADERS",
    "Event",
    "SSEDecoder",
    "SSEError",
    "encode_comment",
    "encode_data",
    "encode_named",
    "error_event",
    "event_head",
    "reframe",
]

_BOM = b"\xef\xbb\xbf"
# The largest event an upstream may send, in bytes (docs/resilience.md): far above any chunk
# of text or tool call, and what 30 concurrent such events can cost stays in the low hundreds
# of MiB.
MAX_EVENT = 4 * 1024 * 1024
_CR = 0x0D
_LF = 0x0A
_SPACE = 0x20

DONE: bytes = b"data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class Event:
    """One dispatched event.

    `id` and `retry` are stream state, not per-event fields: as in the spec (and `lastEventId`
    in browsers), they carry the last value the stream set, even on later events that do not
    repeat it. `retry` is the reconnection time in milliseconds; None means never set.
    """

    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None


class SSEError(ValueError):
    """The upstream stream cannot be decoded safely (a line longer than `max_line`)."""


class SSEDecoder:
    """Incremental decoder: `feed()` each chunk as it arrives, then `flush()` once at EOF.

    After an SSEError the decoder refuses further input: resuming mid-line could read the
    tail of an oversized `data` line as fields of its own.
    """

    __slots__ = (
        "_bom_pending",
        "_buf",
        "_data",
        "_error",
        "_event",
        "_size",
        "_skip_lf",
        "comments",
        "last_event_id",
        "max_line",
        "retry",
    )

    def __init__(self, max_line: int = MAX_EVENT) -> None:
        if max_line < 1:
            raise ValueError("max_line must be positive")
        # Bounds one line and also one event's data lines together: a hostile upstream must
        # not make the proxy hold more than this for one event, however it splits it.
        self.max_line = max_line
        self._size = 0
        self.comments = 0
        self.last_event_id: str | None = None
        self.retry: int | None = None
        # Bytes of the line still waiting for its end; never holds a CR or LF.
        self._buf = bytearray()
        # The last chunk ended in CR: an LF starting the next chunk completes that same CRLF.
        self._skip_lf = False
        self._bom_pending = True
        self._data: list[bytes] = []
        self._event = ""
        self._error: str | None = None

    def feed(self, chunk: bytes) -> list[Event]:
        """Consumes one chunk and returns the events it completed (often none)."""
        if self._error is not None:
            raise SSEError(self._error)
        if self._skip_lf and chunk:
            self._skip_lf = False
            if chunk[0] == _LF:
                chunk = chunk[1:]
        if self._bom_pending:
            chunk = self._strip_bom(chunk)

        buf = self._buf
        # Only the new chunk is searched, so a long line arriving in many small chunks costs
        # linear time overall: bytes already in `buf` are known to hold no line end.
        end = max(chunk.rfind(b"\n"), chunk.rfind(b"\r"))
        if end < 0:
            buf += chunk
            if len(buf) > self.max_line:
                self._fail()
            return []

        stop = end + 1
        if buf:
            buf += memoryview(chunk)[:stop]
            block = bytes(buf)
            buf.clear()
        else:
            block = chunk[:stop]
        if stop < len(chunk):
            buf += memoryview(chunk)[stop:]
            if len(buf) > self.max_line:
                self._fail()
        elif chunk[end] == _CR:
            self._skip_lf = True

        # `block` ends with a line end, so splitlines yields only complete lines, and a blank
        # line comes out as b"". bytes.splitlines breaks on exactly CR, LF and CRLF.
        lines = block.splitlines()
        if len(block) > self.max_line and max(map(len, lines)) > self.max_line:
            self._fail()
        return self._process(lines)

    @property
    def at_boundary(self) -> bool:
        """Whether the decoder holds nothing between events: no partial line, no pending
        event, no CR waiting for its LF, no error. A chunk of whole events may then be taken
        by a caller without the decoder (see `passed_over`)."""
        return not (self._buf or self._data or self._skip_lf or self._event or self._error)

    def passed_over(self) -> None:
        """The caller took a chunk of whole events itself, at a boundary: the stream has begun,
        so a byte-order mark can no longer come."""
        self._bom_pending = False

    @property
    def partial_line(self) -> bool:
        """Whether bytes of a line whose end has not arrived are waiting: a body that ends
        here was cut inside a line (flush() still reads that line as complete)."""
        return bool(self._buf)

    def flush(self) -> list[Event]:
        """Ends the stream: returns the event left pending, if it has any data.

        Unlike the spec, which discards an event the stream did not finish with a blank line,
        a buffered partial line is treated as complete and a pending event with data is
        dispatched, because OpenAI-compatible servers often end with `data: [DONE]` and a
        single newline or none. Calling it again returns [].
        """
        if self._error is not None:
            raise SSEError(self._error)
        tail = bytes(self._buf)
        self._buf.clear()
        self._skip_lf = False
        self._bom_pending = False
        return self._process([tail, b""] if tail else [b""])

    def _strip_bom(self, chunk: bytes) -> bytes:
        if self._buf:
            # Earlier chunks held nothing but the start of a BOM.
            chunk = bytes(self._buf) + chunk
            self._buf.clear()
        if len(chunk) < len(_BOM) and _BOM.startswith(chunk):
            self._buf += chunk
            return b""
        self._bom_pending = False
        return chunk[3:] if chunk.startswith(_BOM) else chunk

    def _fail(self) -> None:
        self._buf.clear()
        self._data.clear()
        self._error = f"SSE line longer than {self.max_line} bytes"
        raise SSEError(self._error)

    def _too_big(self) -> None:
        self._buf.clear()
        self._data.clear()
        self._error = f"SSE event larger than {self.max_line} bytes"
        raise SSEError(self._error)

    def _process(self, lines: list[bytes]) -> list[Event]:
        events: list[Event] = []
        data = self._data
        for line in lines:
            if not line:
                if data:
                    # Joining before decoding is safe: b"\n" never sits inside a UTF-8
                    # sequence, and one decode per event is cheaper than one per line.
                    events.append(
                        Event(
                            b"\n".join(data).decode("utf-8", "replace"),
                            self._event or "message",
                            self.last_event_id,
                            self.retry,
                        )
                    )
                    data.clear()
                self._size = 0
                self._event = ""
                continue
            colon = line.find(b":")
            if colon == 0:
                self.comments += 1
                continue
            if colon < 0:
                name = line
                value = b""
            else:
                name = line[:colon]
                start = colon + 1
                if len(line) > start and line[start] == _SPACE:
                    start += 1
                value = line[start:]
            if name == b"data":
                data.append(value)
                self._size += len(value) + 1
                if self._size > self.max_line:
                    self._too_big()
            elif name == b"event":
                self._event = value.decode("utf-8", "replace")
            elif name == b"id":
                if b"\0" not in value:
                    self.last_event_id = value.decode("utf-8", "replace")
            elif name == b"retry" and value.isdigit():
                # Past Python's int-from-digits limit the value is ignored; no sane delay is
                # that long.
                with suppress(ValueError):
                    self.retry = int(value)
        return events


def encode_data(data: bytes) -> bytes:
    """Frames one single-line payload (compact JSON, `[DONE]`) as a `data` event."""
    # find(), not `in`: on CPython 3.11 `in` on bytes first tries its operand as an integer,
    # an exception raised and cleared per call, which doubles the cost of the check.
    if data.find(b"\n") >= 0 or data.find(b"\r") >= 0:
        # A line end would let payload text pose as SSE fields or end the event early.
        raise ValueError("SSE data payload must not contain CR or LF")
    return b"data: " + data + b"\n\n"


def reframe(data: bytes, event: str = "") -> bytes:
    """An event whose payload came from an upstream's own (already decoded) event: every
    line gets its own `data:` field, so no line of it can pose as a field of its own."""
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + data.replace(b"\n", b"\ndata: ") + EVENT_END


def event_head(event: str) -> bytes:
    """The start of a named event, up to its data: callers that build many events of one
    name keep it, then add a single-line payload and `EVENT_END`."""
    if "\n" in event or "\r" in event:
        raise ValueError("SSE event name must not contain CR or LF")
    return b"event: " + event.encode() + b"\ndata: "


EVENT_END: bytes = b"\n\n"


def encode_comment(text: str = "keep-alive") -> bytes:
    """A comment block: clients ignore it, but it keeps idle connections from timing out."""
    if "\n" in text or "\r" in text:
        raise ValueError("SSE comment must not contain CR or LF")
    return b": " + text.encode() + b"\n\n"


# -- writing to the client -----------------------------------------------------------------

KEEPALIVE: bytes = encode_comment()
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def encode_named(event: str, data: bytes) -> bytes:
    """An event with a name (`event:` line) and a single-line payload."""
    if "\n" in event or "\r" in event or data.find(b"\n") >= 0 or data.find(b"\r") >= 0:
        raise ValueError("SSE event name and payload must not contain CR or LF")
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


def error_event(err: ProxyError) -> bytes:
    """The one data event that ends a chat stream after the 200 went out."""
    return b"data: " + err.to_json() + b"\n\n"
