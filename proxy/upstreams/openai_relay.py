"""The `openai` kind's stream relay, sans-IO: what it must know about the upstream's events to
enforce the stream guarantees, and nothing more (no sockets; proxy/upstreams/openai.py reads).

Chat completions: a read of whole, plain events passes through as the upstream framed them
(`pass_through`: a few C-level scans instead of a decode per event); anything unusual goes
through the SSE decoder and is framed again (`frame`), or decoded into chunks (`decode`) for
an ingress that needs objects. Native Responses streams: proxy/upstreams/openai_native.py.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from proxy.chunks import Out
from proxy.errors import ProxyError, UpstreamFailed
from proxy.openai_types import ChatChunk
from proxy.sse import SSEDecoder, reframe
from proxy.upstreams.http_errors import message_text
from proxy.upstreams.openai_template import TextTemplate

# A finish chunk carries a non-empty string finish_reason; every other chunk has null or
# nothing.
_FINISH = re.compile(r'"finish_reason"\s*:\s*"[^"]')
_FINISH_BYTES = re.compile(rb'"finish_reason"\s*:\s*"[^"]')
_FINISH_KEY = b'"finish_reason"'
_BOUNDARY = b"\n\n"
# Whole events, each a single `data:` line holding what has the shape of a JSON object (the
# caller rules out CR, which SSE also reads as a line end, and errors): `{`, then anything
# but a line end, then `}`. `[^\n]*` rather than a class of two characters: the regex engine
# scans a single excluded byte several times faster, and a read that does not match fails in
# linear time.
_PLAIN_EVENTS = re.compile(rb'(?:data: \{[^\n]*\}\n\n)+')
# An `error` member, wherever it is in an event and however it is spaced, has these bytes; a
# JSON string holding the word in quotes has them escaped (`\"error\"`), so a read without
# them needs no parse to rule an error out, and one with them is rare.
_ERROR_KEY = b'"error"'
_ERROR_TEXT = '"error"'
_DONE_EVENT = b"data: [DONE]\n\n"
_DONE_LEN = len(_DONE_EVENT)
# Token chunks a stream may offer to teach a template (a first one, and one for each shape
# its tokens turn to) before the decode path stops trying: a server whose tokens cannot be
# read from one usually never can.
_TEMPLATE_TRIES = 4
# Reads of one event the byte relay decodes to learn a template from (the role chunk, then
# a first token, and again where the tokens turn from reasoning to the answer): a stream of
# tool calls, which teaches none, stops costing a decode a read after these.
_PEEKS = 8



def flush_events(decoder: SSEDecoder, upstream: str) -> list[Any]:
    """The events left at the end of an upstream's body."""
    cut = decoder.partial_line
    events = decoder.flush()
    if cut and events and events[0].data != "[DONE]":
        # The body stopped inside a line: that event is cut short, and the client must not
        # get its broken JSON.
        raise UpstreamFailed(
            f"Upstream '{upstream}' closed the connection in the middle of the stream."
        )
    return events


class RelayState:
    """What the relay must know to enforce the stream guarantees, and nothing more."""

    __slots__ = ("_peeks", "_tries", "done", "error", "finished", "template", "upstream")

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.done = False
        self.finished = False
        # Raised only after the events before it were passed on.
        self.error: ProxyError | None = None
        # The shortcut for token chunks (proxy/upstreams/openai_template.py): the decode
        # path's, and the byte relay's (which checks it first, itself, for each read).
        self.template: TextTemplate | None = None
        self._tries = _TEMPLATE_TRIES
        self._peeks = _PEEKS

    def flush(self, decoder: SSEDecoder) -> list[Any]:
        return flush_events(decoder, self.upstream)

    def check_end(self) -> None:
        """Raises the stream's terminal error, if it has one."""
        if self.error is not None:
            raise self.error
        if not self.finished:
            raise UpstreamFailed(
                f"Upstream '{self.upstream}' ended the stream without a finish_reason."
            )
        if not self.done:
            raise UpstreamFailed(f"Upstream '{self.upstream}' ended the stream without [DONE].")

    def pass_through(self, chunk: bytes) -> bytes | None:
        """The client's bytes for a read that holds only whole, plain events, as the upstream
        framed them; None when anything in it needs the decoder (call `frame` instead).

        Read at an event boundary, a model server's chunk is usually a run of
        `data: <one line of JSON>\\n\\n` events, and `frame` would give back exactly those
        bytes. Checking that takes a few scans of the chunk in C instead of a decode, an
        Event and an encode per event. Anything else (comments, other fields, CR line ends,
        multi-line data, empty data, an error event, invalid UTF-8, a [DONE] inside a value)
        takes the decoder's path, so the output never differs from `frame`'s.
        """
        # find(), not `in`: see proxy/sse.py encode_data.
        if not chunk.endswith(_BOUNDARY) or chunk.find(b"\r") >= 0 or chunk.find(_ERROR_KEY) >= 0:
            return None
        # [DONE] ends the stream: it comes last in its read, and the writer writes its own.
        done = chunk.endswith(_DONE_EVENT) and (
            len(chunk) == _DONE_LEN or chunk[-_DONE_LEN - 2 : -_DONE_LEN] == _BOUNDARY
        )
        if done:
            chunk = chunk[:-_DONE_LEN]
            if not chunk:
                self.done = True
                return chunk
        if _PLAIN_EVENTS.fullmatch(chunk) is None:
            return None
        if not chunk.isascii():
            try:
                chunk.decode()
            except UnicodeDecodeError:
                return None  # the decoder replaces what is not UTF-8
        if not self.finished:
            # The finish chunk is usually the last event with a finish_reason: look there
            # first, and scan the rest of the read only when that one is null and another
            # comes before it (a read of one event, what a token stream sends, has none).
            last = chunk.rfind(_FINISH_KEY)
            if last >= 0 and (
                _FINISH_BYTES.match(chunk, last) is not None
                or (
                    chunk.find(_FINISH_KEY, 0, last) >= 0
                    and _FINISH_BYTES.search(chunk, 0, last + 2) is not None
                )
            ):
                self.finished = True
        self.done = done
        return chunk

    def relay_read(self, chunk: bytes) -> bytes | None:
        """`pass_through` for the byte relay, with the decode path's template: a read that is
        one token event of the stream's template is plain with nothing to check (see
        TextTemplate.text_at), and a model server sends its tokens one event a read. The
        template is learned from token events alone in their read that passed the checks,
        as the decode path learns it; `_PEEKS` such reads at most are decoded to find one."""
        template = self.template
        if template is not None and template.text_at(chunk) is not None:
            return chunk
        return self.learn_through(chunk)

    def learn_through(self, chunk: bytes) -> bytes | None:
        """`relay_read` after its template's check (which the byte relay's loop takes
        itself): `pass_through`, and the template learned from a token event alone in its
        read that passed."""
        plain = self.pass_through(chunk)
        if (
            plain and self._peeks and self._tries and not (self.finished or self.done)
            # One event: its first line end is its blank line's.
            and plain.find(b"\n") == len(plain) - 2
        ):
            self._peeks -= 1
            try:
                parsed = orjson.loads(plain[6:-2])
            except orjson.JSONDecodeError:
                return plain
            if isinstance(parsed, dict):
                self._learn(plain[:-2], parsed)
        return plain

    def _data(self, ev: Any) -> str | None:
        """An event's data when it is a chunk to pass on; None to skip it or stop."""
        if self.done or self.error is not None:
            return None
        data: str = ev.data
        if data == "[DONE]":
            self.done = True
            return None
        if ev.event == "error" or (_ERROR_TEXT in data and reports_error(data)):
            self.error = stream_error(self.upstream, data)
            return None
        if not data:
            return None
        if not (data.startswith("{") and data.rstrip().endswith("}")):
            # The shape of a JSON object, checked without parsing: a client SDK would raise
            # a decode error on anything else instead of reporting an API error.
            self.error = UpstreamFailed(
                f"Upstream '{self.upstream}' sent a stream event that is not a JSON object."
            )
            return None
        if not self.finished and _FINISH.search(data) is not None:
            self.finished = True
        return data

    def frame(self, events: list[Any]) -> bytes:
        out: list[bytes] = []
        for ev in events:
            data = self._data(ev)
            if data is None:
                if self.done or self.error is not None:
                    break
                continue
            # A multi-line data event keeps each line in a `data:` field of its own.
            out.append(reframe(data.encode()))
        return b"".join(out)

    def decode(self, events: list[Any]) -> list[Out]:
        out: list[Out] = []
        for ev in events:
            data = self._data(ev)
            if data is None:
                if self.done or self.error is not None:
                    break
                continue
            if not self._parsed(data, out):
                break
        return out

    def decode_read(self, decoder: SSEDecoder, chunk: bytes) -> list[Out]:
        """The chunks of one read of the upstream's body (b"": its end): parsed from the
        bytes when the read is whole, plain events at an event boundary, else through
        `decoder`. Token events that match the stream's template (TextTemplate) are read
        as a TextRun, without a decode."""
        if not chunk:
            return self.decode(self.flush(decoder))
        if decoder.at_boundary and len(chunk) <= decoder.max_line:
            template = self.template
            if template is not None and (text := template.text_at(chunk)) is not None:
                # One token event, as a model server sends them.
                return [template.texts([text])]
            if template is not None and chunk.startswith(template.prefix):
                texts, end = template.run(chunk, 0, not_one=True)
                if texts is not None:
                    # Whole events that decode exactly as the template's chunks: nothing
                    # in them for the relay to check.
                    if end == len(chunk):
                        return [texts]
                    out: list[Out] = [texts]
                    out += self._at_boundary(decoder, chunk[end:])
                    return out
            elif template is None and self._tries and chunk.endswith(_BOUNDARY):
                return self._learning(decoder, chunk)
            return self._at_boundary(decoder, chunk)
        return self.decode(decoder.feed(chunk))

    def _learning(self, decoder: SSEDecoder, chunk: bytes) -> list[Out]:
        """A read before the template is known: event by event until one teaches it, so
        that the rest of the read is read with it (checking the whole read first would cost
        more than the events it checks one by one). A plain event is one line, so the next
        one starts after its blank line; from the first that is not, the rest of the read
        goes the usual way."""
        out: list[Out] = []
        pos = 0
        end = chunk.find(_BOUNDARY)
        while end >= 0:
            plain = self.pass_through(chunk[pos : end + 2])
            if plain is None:
                break
            decoder.passed_over()
            out += self.decode_passed(plain)
            pos = end + 2
            if self.done or self.error is not None or self.template is not None:
                break
            end = chunk.find(_BOUNDARY, pos)
        if pos == len(chunk) or self.done or self.error is not None:
            return out
        if self.template is not None:
            out += self.decode_read(decoder, chunk[pos:])
        else:
            out += self._at_boundary(decoder, chunk[pos:])
        return out

    def _at_boundary(self, decoder: SSEDecoder, chunk: bytes) -> list[Out]:
        plain = self.pass_through(chunk)
        if plain is not None:
            decoder.passed_over()
            return self.decode_passed(plain)
        return self.decode(decoder.feed(chunk))

    def decode_passed(self, plain: bytes) -> list[Out]:
        """The chunks of a read `pass_through` took: each event's JSON parsed from its bytes,
        with no SSE decoder, no Event and no str per event, and the same checks as
        `decode`; a run of token events that match the template read as a TextRun.

        A template learned here serves the rest of the read at once."""
        out: list[Out] = []
        template = self.template
        pos = 0
        # Single-line `data: {...}` events, each ended by a blank line.
        end = plain.find(_BOUNDARY)
        while end >= 0:
            # Whether the event starts as the template's do; if not, it may teach one.
            shaped = False
            if template is not None and plain.startswith(template.prefix, pos):
                shaped = True
                texts, stop = template.run(plain, pos)
                if texts is not None:
                    out.append(texts)
                    pos = stop
                    end = plain.find(_BOUNDARY, pos)
                    continue
            if not self._parsed(plain[pos + 6 : end], out):
                break
            if self._tries and not shaped:
                # No template yet, or this chunk has another shape than the template's (the
                # stream turned from reasoning to its answer): it may teach one.
                template = self._learn(plain[pos:end], out[-1]) or template
            pos = end + 2
            end = plain.find(_BOUNDARY, pos)
        return out

    def _learn(self, event: bytes, chunk: Any) -> TextTemplate | None:
        field = TextTemplate.candidate(chunk)
        if field is None:
            return None
        self._tries -= 1
        learned = TextTemplate.learn(event, chunk, field)
        if learned is not None:
            self.template = learned
        return learned

    def _parsed(self, data: str | bytes, out: list[Out]) -> bool:
        """Adds the chunk in `data` to `out`; False (and the error set) when it is none."""
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            chunk = None
        if not isinstance(chunk, dict) or not isinstance(chunk.get("choices"), list):
            self.error = UpstreamFailed(
                f"Upstream '{self.upstream}' sent a stream event that is not a chat "
                "completion chunk."
            )
            return False
        typed: ChatChunk = chunk  # type: ignore[assignment]
        out.append(typed)
        return True



def reports_error(data: str) -> bool:
    """Whether a chat stream event is an error: an object with a non-null `error` member,
    first (`{"error": …}`) or beside the chunk's choices (OpenRouter's mid-stream errors); a
    broken object that starts as an error still counts as one."""
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        return data.startswith('{"error"')
    return isinstance(parsed, dict) and parsed.get("error") is not None


def stream_error(upstream: str, data: str) -> ProxyError:
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        parsed = None
    return reported_error(upstream, parsed, "mid-stream")


def reported_error(upstream: str, parsed: Any, where: str) -> ProxyError:
    """The failure for an error object an upstream sent (`{"error": …}` or the error alone)."""
    message = ""
    if isinstance(parsed, dict):
        err = parsed.get("error", parsed)
        if isinstance(err, dict):
            message = message_text(err.get("message"))
        elif isinstance(err, str):
            message = err
    detail = f": {message[:500]}" if message else ""
    return UpstreamFailed(f"Upstream '{upstream}' reported an error {where}{detail}")
