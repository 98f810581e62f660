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
* each chat tool call (by its `index`) → a `function_call` item (`fc_`), `call_id` = the chat
  call's id; its arguments stream as `function_call_arguments.delta` (at least one) and end
  with `.done` carrying exactly what was streamed (`{}` when the upstream sent none).

Per event, a text delta is one bytes format of a prefix built once per part, its JSON text
and its sequence number; a TextRun's texts need no chunk read.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import orjson

from proxy.chunks import HELD_CHUNK, Comment, Out, TextRun, held_by_calls
from proxy.errors import ProxyError, UpstreamFailed
from proxy.ingress.responses_items import (
    END,
    PARTS,
    SEQ,
    OpenCall,
    OpenItem,
    Unencodable,
    empty_part,
    encode_event,
    frame,
    new_item_base,
)
from proxy.ingress.responses_object import (
    INCOMPLETE,
    bare_failure,
    failure_error,
    response_base,
    responses_usage,
)
from proxy.openai_types import ToolCallDelta
from proxy.sse import DONE, encode_comment
from proxy.upstreams.http_errors import MAX_ANSWER, answer_too_large

__all__ = ["ResponsesWriter"]

# A delta event from its prefix (proxy/responses_items.py), its JSON text and its sequence
# number: one bytes format instead of four concatenations.
_DELTA: Final = b"%b%b" + SEQ + b"%d" + END
_UNREADABLE: Final = "The upstream sent a chat completion chunk with a delta of the wrong types."
_NAMELESS: Final = "The upstream sent a tool call without a function name."
# A TextRun's field -> the item and part kinds its texts go to.
_RUN_KINDS: Final = {
    "content": ("message", "output_text"), "reasoning_content": ("reasoning", "reasoning_text"),
}


class ResponsesWriter:
    """Turns one response's chunk batches into Responses SSE bytes and the final object."""

    __slots__ = (
        "_base", "_call", "_calls", "_clock", "_events", "_final", "_finish_reason", "_held",
        "_ids", "_item", "_out", "_output", "_seq", "_started", "_usage", "response_id",
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

    def feed(self, batch: Iterable[Out]) -> bytes:
        """The events for one batch of chunks (keep-alive comments included)."""
        if self._final is not None:
            return b""
        if not self._started:
            self._start()
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
                        raise UpstreamFailed(_UNREADABLE)
                    self._finish_reason = reason
        if self._held > MAX_ANSWER:
            # Every text is kept for the final object: an endless upstream must end here.
            raise answer_too_large()
        data = b"".join(self._out)
        self._out.clear()
        return data

    @property
    def started(self) -> bool:
        return self._started

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

    def final(self) -> dict[str, Any]:
        """The terminal response object (the sync answer); only after finish() or fail()."""
        if self._final is None:
            raise RuntimeError("the response has not ended: call finish() or fail() first")
        return self._final

    def _flush(self) -> bytes:
        data = b"".join(self._out)
        self._out.clear()
        return data

    def _emit(self, payload: dict[str, Any]) -> None:
        if self._events:
            payload["sequence_number"] = self._seq
            self._out.append(encode_event(frame(payload["type"]), payload))
        self._seq += 1

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
            raise UpstreamFailed(_UNREADABLE)
        item = self._item
        if item is None or item.kind != kind:
            item = self._open_item(kind, part_kind)
        elif item.part_kind != part_kind:
            self._close_part(item)
            self._open_part(item, part_kind)
        item.texts.append(text)
        self._held += len(text) + HELD_CHUNK
        if self._events:
            self._out.append(_DELTA % (item.prefix, orjson.dumps(text), self._seq))
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
            self._out += [_DELTA % (prefix, dumps(text), n) for n, text in enumerate(texts, seq)]
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
        call = self._call
        if call is not None:
            if not call.name:
                # No client can run it (the name may come in a later delta, so only now).
                raise UpstreamFailed(_NAMELESS)
            self._call = None
            arguments = "".join(call.args)
            if not arguments:
                # Clients json-parse the arguments: a call with none takes an empty object,
                # and every call streams at least one delta.
                arguments = "{}"
                call.args.append(arguments)
                self._args_delta(call, arguments)
            self._emit({"type": "response.function_call_arguments.done", "item_id": call.id,
                        "output_index": call.index, "arguments": arguments})
            final = call.snapshot(status, arguments)
            self._output[call.index] = final
            self._emit({"type": "response.output_item.done", "output_index": call.index,
                        "item": final})

    def _tool_calls(self, calls: list[ToolCallDelta]) -> None:
        for delta in calls:
            chat_index = delta.get("index", 0)
            function = delta.get("function") or {}
            args = function.get("arguments") or ""
            name = function.get("name") or ""
            if type(args) is not str or type(name) is not str:
                raise UpstreamFailed(_UNREADABLE)
            call = self._calls.get(chat_index)
            if call is None:
                self._close_open("completed")
                index = len(self._output)
                call_id = delta.get("id") or f"call_{self._ids}_{chat_index}"
                if type(call_id) is not str:
                    raise UpstreamFailed(_UNREADABLE)
                call = OpenCall(f"fc_{self._ids}_{index}", index, chat_index, call_id, name)
                self._calls[chat_index] = call
                self._call = call
                self._output.append(call)
                self._emit({"type": "response.output_item.added", "output_index": index,
                            "item": call.snapshot("in_progress")})
            elif call is not self._call:
                if args or (name and name != call.name):
                    # Its `.done` already went out with the arguments final: a client would
                    # run a call whose arguments the upstream then changed.
                    raise UpstreamFailed(
                        "The upstream interleaved the arguments of parallel tool calls, which "
                        "the Responses stream cannot represent after a call was completed."
                    )
                continue
            elif name and name != call.name:
                call.name += name
            if args:
                call.args.append(args)
                self._args_delta(call, args)

    def _args_delta(self, call: OpenCall, args: str) -> None:
        if self._events:
            self._out.append(_DELTA % (call.prefix, orjson.dumps(args), self._seq))
        self._seq += 1

