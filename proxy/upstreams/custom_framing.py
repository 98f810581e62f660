"""Sans-IO decoders for the three stream framings of the `custom` kind (custom-apis.md §6.6).

Each decoder takes the body's bytes as they arrive, `feed(chunk)`, and returns the events the
chunk completed as `(event_name, payload)` pairs; `flush()` at EOF returns what is left.

- `sse`: WHATWG event-stream framing (CR, LF or CRLF; several `data:` lines joined by `\\n`;
  unknown fields such as Flowise's `message:` ignored; comments are activity only), with one
  deliberate departure: an event that has an `event:` name but no `data:` line still comes
  out, with payload None, because real servers end streams (LangServe `event: end`) or ping
  (Dify `event: ping`) that way. `data` is parsed as JSON when it parses, otherwise kept as a
  string, so `data: [DONE]` is the string "[DONE]".
- `ndjson`: one JSON value per line; blank lines are skipped (Langflow ends every object
  with a blank line); a line that is not JSON is a stream error.
- `text`: every chunk is text, decoded incrementally as UTF-8.

The event name is `message` where the framing has none. No single event or line may grow
past `max_event` bytes: a hostile upstream cannot make the proxy buffer without limit. A
decoder that failed keeps `error` set and refuses more input; events completed before the
failure in the same chunk are still returned.
"""

from __future__ import annotations

import codecs
from contextlib import suppress
from typing import Any, Final, Literal, Protocol, TypeAlias

import orjson

from proxy.sse import Event, SSEDecoder, SSEError

__all__ = [
    "DEFAULT_MAX_EVENT",
    "FRAMINGS",
    "Decoder",
    "Framing",
    "FramingError",
    "Item",
    "NdjsonDecoder",
    "SseDecoder",
    "TextDecoder",
    "make_decoder",
]

Framing = Literal["sse", "ndjson", "text"]
FRAMINGS: Final[tuple[str, ...]] = ("sse", "ndjson", "text")
DEFAULT_MAX_EVENT: Final = 16 * 1024 * 1024
MESSAGE: Final = "message"

Item: TypeAlias = tuple[str, Any]

_BOM: Final = b"\xef\xbb\xbf"
# First bytes of a JSON text: anything else is kept as a string without trying to parse it.
_JSON_START: Final = frozenset(b'{["-0123456789tfn \t')


class FramingError(ValueError):
    """The upstream's stream cannot be decoded (an oversized event, a line that is not JSON)."""


class Decoder(Protocol):
    """`feed` each read, `flush` once at EOF. `error` is set when the stream cannot be read;
    from then on both raise FramingError."""

    error: str | None

    def feed(self, chunk: bytes) -> list[Item]: ...

    def flush(self) -> list[Item]: ...


class _Fields(SSEDecoder):
    """proxy.sse's line framing (line ends, byte-order mark, the line bound, EOF), with the
    field interpreter `_process` replaced: it keeps sse.py's pending-event state (`_data`,
    `_event`), and differs in what it dispatches: `Item`s with the data already parsed, and
    named events without data."""

    __slots__ = ("items", "max_event", "named", "names", "size")

    def __init__(self, max_event: int) -> None:
        super().__init__(max_line=max_event)
        self.max_event = max_event
        self.items: list[Item] = []
        self.names: dict[bytes, str] = {}
        self.size = 0
        # An `event:` line was seen in the pending event (it may end up with no data).
        self.named = False

    def _process(self, lines: list[bytes]) -> list[Event]:
        items = self.items
        data = self._data
        for line in lines:
            if not line:
                if data:
                    raw = data[0] if len(data) == 1 else b"\n".join(data)
                    payload: Any
                    if raw and raw[0] in _JSON_START:
                        try:
                            payload = orjson.loads(raw)
                        except orjson.JSONDecodeError:
                            payload = raw.decode("utf-8", "replace")
                            # JSON whose only fault is bytes that are not UTF-8: replaced
                            # (U+FFFD, as the text framing does), or no rule would match it
                            # and its text would be lost without a word.
                            with suppress(orjson.JSONDecodeError):
                                payload = orjson.loads(payload)
                    else:
                        payload = raw.decode("utf-8", "replace")
                    items.append((self._event or MESSAGE, payload))
                    data.clear()
                    self.size = 0
                elif self.named:
                    items.append((self._event or MESSAGE, None))
                self._event = ""
                self.named = False
                continue
            # `data:` and `event:` first, without splitting the line at its colon: nearly
            # every line of a stream is one of them.
            if line.startswith(b"data:"):
                value = line[6:] if len(line) > 5 and line[5] == 0x20 else line[5:]
            elif line.startswith(b"event:"):
                # Streams repeat a handful of event names: decode each once.
                name = self.names.get(line)
                if name is None:
                    value = line[7:] if len(line) > 6 and line[6] == 0x20 else line[6:]
                    name = value.decode("utf-8", "replace")
                    if len(self.names) < 64:
                        self.names[line] = name
                self._event = name
                # `event:` with no name names nothing: such an event still needs data.
                self.named = bool(name)
                continue
            else:
                colon = line.find(b":")
                if colon == 0:
                    self.comments += 1
                    continue
                # A field with no colon has an empty value; of those only a bare `data`
                # line adds anything (an empty data line). `id` and `retry` concern
                # reconnection, which a proxy never does; other field names (Flowise's
                # `message:`) are ignored, as the spec says.
                if line not in (b"data", b"event"):
                    continue
                if line == b"event":
                    self._event = ""
                    self.named = False
                    continue
                value = b""
            self.size += len(value) + 1
            if self.size > self.max_event:
                data.clear()
                self.size = 0
                raise SSEError(f"SSE event longer than {self.max_event} bytes")
            data.append(value)
        return []


class SseDecoder:
    __slots__ = ("_fields", "_started", "error")

    def __init__(self, max_event: int = DEFAULT_MAX_EVENT) -> None:
        self._fields = _Fields(max_event)
        self._started = False
        self.error: str | None = None

    @property
    def comments(self) -> int:
        return self._fields.comments

    def feed(self, chunk: bytes) -> list[Item]:
        if self.error is not None:
            raise FramingError(self.error)
        fields = self._fields
        try:
            # Servers write whole events per chunk: when the decoder holds no partial line
            # (sse.py's `at_boundary`) and the chunk ends with its line end, its lines are
            # split here at once. The first chunk, which may hold a byte-order mark, and
            # anything ending mid-line go through the full decoder.
            if self._started and chunk.endswith(b"\n") and fields.at_boundary:
                fields._process(chunk.splitlines())
            else:
                fields.feed(chunk)
                # Once a byte went through, the decoder knows whether a byte-order mark came.
                self._started = self._started or bool(chunk)
        except SSEError as exc:
            self.error = str(exc)
        items = fields.items
        if items:
            fields.items = []
        return items

    def flush(self) -> list[Item]:
        if self.error is not None:
            raise FramingError(self.error)
        fields = self._fields
        try:
            fields.flush()
        except SSEError as exc:
            self.error = str(exc)
        items = fields.items
        if items:
            fields.items = []
        return items


class NdjsonDecoder:
    __slots__ = ("_buf", "_started", "error", "max_event")

    def __init__(self, max_event: int = DEFAULT_MAX_EVENT) -> None:
        self.max_event = max_event
        self.error: str | None = None
        self._buf = bytearray()
        self._started = False

    def feed(self, chunk: bytes) -> list[Item]:
        if self.error is not None:
            raise FramingError(self.error)
        if not self._started:
            if len(self._buf) + len(chunk) < len(_BOM) and _BOM.startswith(
                bytes(self._buf) + chunk
            ):
                self._buf += chunk
                return []
            self._started = True
            if self._buf:
                chunk = bytes(self._buf) + chunk
                self._buf.clear()
            if chunk.startswith(_BOM):
                chunk = chunk[len(_BOM) :]
        end = chunk.rfind(b"\n")
        buf = self._buf
        if end < 0:
            buf += chunk
            if len(buf) > self.max_event:
                self._too_long()
            return []
        if buf:
            buf += memoryview(chunk)[: end + 1]
            block = bytes(buf)
            buf.clear()
        else:
            block = chunk[: end + 1]
        if end + 1 < len(chunk):
            buf += memoryview(chunk)[end + 1 :]
        items = self._lines(block.split(b"\n"))
        if len(buf) > self.max_event and self.error is None:
            self._too_long()
        return items

    def flush(self) -> list[Item]:
        if self.error is not None:
            raise FramingError(self.error)
        self._started = True
        tail = bytes(self._buf)
        self._buf.clear()
        return self._lines([tail])

    def _lines(self, lines: list[bytes]) -> list[Item]:
        items: list[Item] = []
        limit = self.max_event
        for line in lines:
            if not line or line.isspace():
                continue
            if len(line) > limit:
                self._too_long()
                break
            try:
                items.append((MESSAGE, orjson.loads(line)))
            except orjson.JSONDecodeError:
                snippet = line[:80].decode("utf-8", "replace").strip()
                self.error = f"a line is not JSON: {snippet!r}"
                break
        return items

    def _too_long(self) -> None:
        self._buf.clear()
        self.error = f"a line is longer than {self.max_event} bytes"


class TextDecoder:
    __slots__ = ("_decoder", "error")

    def __init__(self, max_event: int = DEFAULT_MAX_EVENT) -> None:
        # Text is passed on as it arrives: nothing is buffered but a split UTF-8 sequence.
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.error: str | None = None

    def feed(self, chunk: bytes) -> list[Item]:
        text = self._decoder.decode(chunk)
        return [(MESSAGE, text)] if text else []

    def flush(self) -> list[Item]:
        text = self._decoder.decode(b"", True)
        return [(MESSAGE, text)] if text else []


def make_decoder(framing: Framing, max_event: int = DEFAULT_MAX_EVENT) -> Decoder:
    if framing == "sse":
        return SseDecoder(max_event)
    if framing == "ndjson":
        return NdjsonDecoder(max_event)
    return TextDecoder(max_event)
