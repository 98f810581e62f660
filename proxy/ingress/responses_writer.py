"""The Responses API writer: internal chunks in, Responses stream events and object out. Sans-IO.

One ResponsesWriter per response. `start()` gives `response.created` and
`response.in_progress`; `feed(batch)` turns each batch of chunks into events; `finish()` closes
what is open and ends with `response.completed` (or `response.incomplete` after a `length` or
`content_filter` stop); `fail(err)` ends with `response.failed`. Both end with `data: [DONE]`.
`final()` is the finished response object: a sync answer made of chunks (echo, Letta, custom)
is the same writer fed them; a whole chat completion's is built at once and held equal to it by
the tests (proxy/ingress/responses_object.py).

Items, in the order the chunks bring them, one open at a time:
* `reasoning_content` → a `reasoning` item (`rs_`) with one `reasoning_text` part;
* `content` (and `refusal`) → a `message` item (`msg_`) with `output_text` (`refusal`) parts;
* each chat tool call (by its `index`) → a `function_call` item (proxy/ingress/responses_events.py).

Per event, a text delta is one bytes format of a prefix built once per part, its JSON text
and its sequence number; a TextRun's texts need no chunk read, and a batch of one TextRun of
one text for the part already open (a token stream read as it comes) takes a path of its own.
The writer is the stream relay's Encoder (proxy/ingress/streaming.py) itself: `batch`, `error`
and `end` are `feed`, `fail` and `finish`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

import orjson

from proxy.chunks import HELD_CHUNK, Comment, Out, TextRun, held_by_calls
from proxy.errors import ProxyError, UpstreamFailed
from proxy.ingress.responses_events import DELTA, UNREADABLE, ResponseEvents
from proxy.ingress.responses_items import (
    PARTS,
    OpenCall,
    OpenItem,
    Unencodable,
    empty_part,
    new_item_base,
)
from proxy.ingress.responses_object import (
    INCOMPLETE,
    bare_failure,
    failure_error,
    response_base,
    responses_usage,
)
from proxy.sse import DONE, encode_comment
from proxy.upstreams.http_errors import MAX_ANSWER, answer_too_large

__all__ = ["ResponsesWriter"]

_UNSHAPED: Final = "The upstream sent a chat completion chunk the Responses stream cannot read."
# A TextRun's field -> the item and part kinds its texts go to.
_RUN_KINDS: Final = {
    "content": ("message", "output_text"), "reasoning_content": ("reasoning", "reasoning_text"),
}
_RUN_PARTS: Final = {field: part_kind for field, (_, part_kind) in _RUN_KINDS.items()}


class ResponsesWriter(ResponseEvents):
    """Turns one response's chunk batches into Responses SSE bytes and the final object."""

    __slots__ = (
        "_base", "_clock", "_final", "_finish_reason", "_held", "_item", "_started", "_usage",
        "response_id",
    )

    def __init__(
        self, response_id: str, model: str, created_at: float, echo: Mapping[str, Any],
        store: bool = False, *, clock: Callable[[], float] = time.time,
        item_base: str | None = None, events: bool = True,
    ) -> None:
        self.response_id = response_id
        # False for a sync answer, which only needs the final object: the events are not
        # serialized at all (their sequence numbers still count, which nothing then reads).
        self._events = events
        self._base = response_base(response_id, model, created_at, echo, store)
        self._tools = echo.get("tools")
        self._clock = clock
        # Item ids only need to be unique and URL-safe: one random base per response, then
        # the output index (no random draw per item).
        self._ids = item_base or new_item_base()
        self._seq = 0
        self._out: list[bytes] = []
        self._output: list[OpenItem | OpenCall | dict[str, Any]] = []
        self._item: OpenItem | None = None
        self._call: OpenCall | None = None
        self._calls: dict[int, OpenCall] = {}
        self._finish_reason: str | None = None
        self._usage: Mapping[str, Any] | None = None
        self._started = False
        self._final: dict[str, Any] | None = None
        self._held = 0  # what the texts and arguments kept for the final object hold

    def start(self) -> bytes:
        """`response.created` and `response.in_progress`; empty if already started."""
        if not self._started:
            self._start()
        return self._flush()

    def feed(self, batch: Sequence[Out]) -> bytes:
        """The events for one batch of chunks (keep-alive comments included)."""
        if len(batch) == 1:
            # A token stream read as it comes: one text a read, for the part already open.
            run = batch[0]
            item = self._item
            if (
                type(run) is TextRun and item is not None and len(texts := run.texts) == 1
                and item.part_kind == _RUN_PARTS[run.field] and self._final is None
                and self._events and (token := texts[0])
            ):
                item.texts.append(token)
                self._held += len(token) + HELD_CHUNK
                if self._held > MAX_ANSWER:
                    raise answer_too_large()
                seq = self._seq
                self._seq = seq + 1
                return DELTA % (item.prefix, orjson.dumps(token), seq)
        if self._final is not None:
            return b""
        if not self._started:
            if all(type(out) is Comment for out in batch):
                # Keep-alives before the first chunk: plain comments; nothing has started.
                return b"".join(encode_comment(o.text) for o in batch if isinstance(o, Comment))
            self._start()
        try:
            return self._feed(batch)
        except (AttributeError, KeyError, TypeError):
            # A chunk of the wrong shape (the relay checks only that it is an object with a
            # list of choices): the upstream's failure, ended as one, not the proxy's crash.
            raise UpstreamFailed(_UNSHAPED) from None

    # The relay's Encoder (proxy/ingress/streaming.py) is the writer itself.
    batch = feed

    def _feed(self, batch: Iterable[Out]) -> bytes:
        for out in batch:
            if isinstance(out, TextRun):
                texts = out.texts
                kind, part_kind = _RUN_KINDS[out.field]
                if len(texts) != 1:
                    self._run(texts, kind, part_kind)
                elif texts[0]:
                    # A token stream read as it comes: one text a run, which `_text` writes
                    # for less than the run's loop costs to set up.
                    self._text(texts[0], kind, part_kind)
                continue
            if isinstance(out, Comment):
                self._out.append(encode_comment(out.text))
                continue
            usage = out.get("usage")
            if usage:
                self._usage = usage
            for choice in out["choices"]:
                delta = choice["delta"]
                if len(delta) == 1 and "content" in delta:
                    # A token of text, nearly every chunk of a stream: one lookup, not four.
                    text = delta["content"]
                    if text:
                        self._text(text, "message", "output_text")
                elif delta:
                    text = delta.get("reasoning_content")
                    if text:
                        self._text(text, "reasoning", "reasoning_text")
                    text = delta.get("content")
                    if text:
                        self._text(text, "message", "output_text")
                    text = delta.get("refusal")
                    if text:
                        self._text(text, "message", "refusal")
                    calls = delta.get("tool_calls")
                    if calls:
                        self._tool_calls(calls)
                        self._held += held_by_calls(calls)
                reason = choice["finish_reason"]
                if reason is not None:
                    if type(reason) is not str:
                        raise UpstreamFailed(UNREADABLE)
                    self._finish_reason = reason
        if self._held > MAX_ANSWER:
            # Every text is kept for the final object: an endless upstream must end here.
            raise answer_too_large()
        data = b"".join(self._out)
        self._out.clear()
        return data

    def finish(self) -> bytes:
        """Closes every item, then `response.completed` / `response.incomplete`, then [DONE]."""
        if self._final is not None:
            return b""
        if not self._started:
            self._start()
        reason = INCOMPLETE.get(self._finish_reason or "")
        status = "completed" if reason is None else "incomplete"
        if not self._output:
            # A chat answer with no content is an empty string; clients read output[0].
            self._open_item("message", "output_text")
        self._close_open(status)
        response = self._response(status)
        if reason is None:
            response["completed_at"] = int(self._clock())
            self._emit({"type": "response.completed", "response": response})
        else:
            response["incomplete_details"] = {"reason": reason}
            self._emit({"type": "response.incomplete", "response": response})
        self._final = response
        self._out.append(DONE)
        return self._flush()

    def fail(self, err: ProxyError) -> bytes:
        """`response.failed` with the error (after the start events if none went out), [DONE].

        Open items get no `.done` event, so no client acts on a half-streamed function call;
        the failed object lists them as `incomplete`. Events of a batch that raised go first.
        """
        if self._final is not None:
            return b""
        response = self._response("failed")
        response["error"] = failure_error(err)
        try:
            if not self._started:
                self._start()
            self._emit({"type": "response.failed", "response": response})
        except Unencodable:  # an echoed request too deep: fail without it
            response = bare_failure(response, self._seq > 0, self._emit)
        self._final = response
        self._out.append(DONE)
        return self._flush()

    error = fail
    end = finish

    def final(self) -> dict[str, Any]:
        """The terminal response object (the sync answer); only after finish() or fail()."""
        if self._final is None:
            raise RuntimeError("the response has not ended: call finish() or fail() first")
        return self._final

    def _start(self) -> None:
        self._started = True
        if not self._events:
            self._seq += 2
            return
        response = self._response("in_progress", usage=False)
        self._emit({"type": "response.created", "response": response})
        self._emit({"type": "response.in_progress", "response": response})

    def _response(self, status: str, *, usage: bool = True) -> dict[str, Any]:
        response = dict(self._base)
        response["status"] = status
        response["completed_at"] = None
        response["error"] = None
        response["incomplete_details"] = None
        response["output"] = [
            o if isinstance(o, dict) else o.snapshot("incomplete") for o in self._output
        ]
        response["usage"] = responses_usage(self._usage) if usage else None
        return response

    def _text(self, text: str, kind: str, part_kind: str) -> None:
        if type(text) is not str:
            raise UpstreamFailed(UNREADABLE)
        item = self._item
        if item is None or item.kind != kind:
            item = self._open_item(kind, part_kind)
        elif item.part_kind != part_kind:
            self._close_part(item)
            self._open_part(item, part_kind)
        item.texts.append(text)
        self._held += len(text) + HELD_CHUNK
        if self._events:
            self._out.append(DELTA % (item.prefix, orjson.dumps(text), self._seq))
        self._seq += 1

    def _run(self, texts: list[str], kind: str, part_kind: str) -> None:
        """The texts of a TextRun: what `_text` does for each, with one delta format per
        text and no per-text call."""
        if "" in texts:
            texts = [text for text in texts if text]
        if not texts:
            return
        item = self._item
        # A part's kind belongs to one item kind (output_text and refusal to a message).
        if item is None or item.part_kind != part_kind:
            # The first opens the item or its part, as `_text` does.
            self._text(texts[0], kind, part_kind)
            texts = texts[1:]
            item = self._item
            assert item is not None
        item.texts += texts
        self._held += sum(map(len, texts)) + HELD_CHUNK * len(texts)
        seq = self._seq
        if self._events:
            prefix = item.prefix
            dumps = orjson.dumps
            self._out += [DELTA % (prefix, dumps(text), n) for n, text in enumerate(texts, seq)]
        self._seq = seq + len(texts)

    def _open_item(self, kind: str, part_kind: str) -> OpenItem:
        self._close_open("completed")
        index = len(self._output)
        item = OpenItem(kind, f"{'msg' if kind == 'message' else 'rs'}_{self._ids}_{index}", index)
        self._output.append(item)
        self._item = item
        self._emit({"type": "response.output_item.added", "output_index": index,
                    "item": item.snapshot("in_progress")})
        self._open_part(item, part_kind)
        return item

    def _open_part(self, item: OpenItem, part_kind: str) -> None:
        content_index = len(item.parts)
        item.open_part(part_kind, self._events)
        if not self._events:
            self._seq += 1
            return
        self._emit({"type": "response.content_part.added", "item_id": item.id,
                    "output_index": item.index, "content_index": content_index,
                    "part": empty_part(part_kind)})

    def _close_part(self, item: OpenItem) -> None:
        part = item.part
        if part is None:
            return
        done_type, field = PARTS[item.part_kind][1:]
        content_index = len(item.parts)
        text = "".join(item.texts)
        part[field] = text
        done: dict[str, Any] = {"type": done_type, "item_id": item.id,
                                "output_index": item.index, "content_index": content_index,
                                field: text}
        if item.part_kind == "output_text":
            done["logprobs"] = []
        self._emit(done)
        self._emit({"type": "response.content_part.done", "item_id": item.id,
                    "output_index": item.index, "content_index": content_index, "part": part})
        item.parts.append(part)
        item.part = None
        item.texts = []

    def _close_open(self, status: str) -> None:
        item = self._item
        if item is not None:
            self._close_part(item)
            final = item.snapshot(status)
            self._output[item.index] = final
            self._item = None
            self._emit({"type": "response.output_item.done", "output_index": item.index,
                        "item": final})
        self._close_call(status)
