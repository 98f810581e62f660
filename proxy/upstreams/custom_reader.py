"""A custom upstream's answer -> the internal chunk language (sans-IO: bytes in, chunks out).

`StreamReader` reads a streamed answer: the framing decoder turns bytes into
`(event_name, payload)` events, and for each event the first rule that matches (its `when`
values equal, its `has` paths truthy) says what the event carries: a text delta (or the
whole text so far, or a recap of deltas already sent), reasoning, usage, the finish reason,
values to capture, an error, or the end. `SyncReader` reads one JSON body with the `sync`
mapping into the same chunks, so a sync answer is exactly what accumulating the stream gives.

Chunks follow the letta kind: the role chunk on the first upstream event, content deltas,
`reasoning_content` only when reasoning is shown, one finish chunk, and the usage chunk only
when asked for. Failures are raised as UpstreamFailed after the chunks that came before them.

Every value taken as text follows one fixed coercion rule (custom-apis.md §6.5), which is what
lets a dotted path read content blocks (Anthropic, Gemini parts, n8n `{text_chunk}` objects).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

import orjson

from proxy.chunks import Out
from proxy.errors import UpstreamFailed
from proxy.openai_types import ChatChunk, ChunkFactory, Usage, make_usage
from proxy.upstreams.custom_framing import DEFAULT_MAX_EVENT, Item, make_decoder
from proxy.upstreams.custom_spec import CustomSpec, Rule, SyncMapping, UsageMapping
from proxy.upstreams.letta_translator import shorten

__all__ = [
    "StreamReader",
    "SyncReader",
    "coerce_text",
    "error_message_of",
    "is_json_content_type",
    "parse_json_body",
]

ERROR_LIMIT: Final = 300
_GENERIC_ERROR: Final = "the request failed"


def coerce_text(value: Any, join: str = "") -> str:
    """A value as text: strings as they are, numbers and booleans spelled as JSON, lists
    concatenated (with `join` between non-empty parts), an object its `text` when it is a
    text block (`type` absent or "text", not a thought), anything else nothing."""
    if type(value) is str:
        return value
    if value is None:
        return ""
    if type(value) is list:
        parts = [text for item in value if (text := coerce_text(item, join))]
        return join.join(parts)
    if type(value) is dict:
        block = value.get("text")
        if (
            type(block) is str
            and value.get("type", "text") == "text"
            and value.get("thought") is not True
        ):
            return block
        return ""
    if type(value) is bool:
        return "true" if value else "false"
    if type(value) is int or type(value) is float:
        return repr(value)
    return ""


def _count(value: Any) -> int | None:
    if type(value) is int:
        return value
    if type(value) is float:
        return int(value)
    return None


def _usage(mapping: UsageMapping, payload: Any, event: str) -> Usage | None:
    """The usage an event or body reports; None when it reports none at all."""
    if mapping.parent is not None:
        parent = mapping.parent(payload, event)
        if type(parent) is not dict:
            return None
        p_key, c_key, t_key = mapping.keys
        prompt = _count(parent.get(p_key)) if p_key is not None else None
        completion = _count(parent.get(c_key)) if c_key is not None else None
        total = _count(parent.get(t_key)) if t_key is not None else None
    else:
        prompt = _count(mapping.prompt_tokens(payload, event)) if mapping.prompt_tokens else None
        completion = (
            _count(mapping.completion_tokens(payload, event))
            if mapping.completion_tokens
            else None
        )
        total = _count(mapping.total_tokens(payload, event)) if mapping.total_tokens else None
    if prompt is None and completion is None and total is None:
        return None
    usage = make_usage(prompt or 0, completion or 0)
    if total is not None:
        usage["total_tokens"] = total
    return usage


def _add_usage(old: Usage, new: Usage) -> Usage:
    return {
        "prompt_tokens": old.get("prompt_tokens", 0) + new.get("prompt_tokens", 0),
        "completion_tokens": old.get("completion_tokens", 0) + new.get("completion_tokens", 0),
        "total_tokens": old.get("total_tokens", 0) + new.get("total_tokens", 0),
    }


def _finish_reason(value: Any) -> str | None:
    if value is None:
        return None
    # "length" is the one reason a client acts on (the answer was cut); the rest mean stop.
    return "length" if value == "length" else "stop"


def _error_text(value: Any) -> str:
    text = coerce_text(value)
    if not text and isinstance(value, dict | list) and value:
        try:
            text = orjson.dumps(value).decode()
        except orjson.JSONEncodeError:
            text = ""
    return shorten(text, ERROR_LIMIT) if text else ""


def _failure(label: str, value: Any) -> UpstreamFailed:
    text = _error_text(value) or _GENERIC_ERROR
    return UpstreamFailed(f"{label} reported an error: {text}")


def parse_json_body(raw: bytes, label: str = "The upstream") -> Any:
    """A sync answer's JSON (leading keep-alive newlines are whitespace to JSON)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise UpstreamFailed(f"{label} answered with a body that is not JSON.") from None


def is_json_content_type(content_type: str | None) -> bool:
    """Whether a `sse`-framed call was answered with one JSON document instead (Flowise,
    when a flow cannot stream): then the body is read whole with the `sync` mapping."""
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def error_message_of(spec: CustomSpec, raw: bytes) -> str | None:
    """The message of a non-2xx JSON body, found with `error_message`; None if none."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    text = _error_text(spec.error_message(body, "message"))
    return text or None


def _sync_chunks(
    mapping: SyncMapping,
    payload: Any,
    factory: ChunkFactory,
    *,
    show_reasoning: bool,
    include_usage: bool,
    label: str,
    role: bool,
) -> list[ChatChunk]:
    event = "message"
    if mapping.error is not None:
        problem = mapping.error(payload, event)
        if problem:
            raise _failure(label, problem)
    text = coerce_text(mapping.text(payload, event), mapping.join)
    if mapping.require_text and not text:
        raise UpstreamFailed(f"{label} answered without any text.")
    chunks: list[ChatChunk] = [factory.role()] if role else []
    if text:
        chunks.append(factory.content(text))
    if show_reasoning and mapping.reasoning is not None:
        thought = coerce_text(mapping.reasoning(payload, event), mapping.join)
        if thought:
            chunks.append(factory.reasoning(thought))
    finish = _finish_reason(mapping.finish(payload, event)) if mapping.finish else None
    chunks.append(factory.finish(finish or "stop"))
    if include_usage:
        usage = _usage(mapping.usage, payload, event) if mapping.usage else None
        chunks.append(factory.usage(usage or make_usage(0, 0)))
    return chunks


def _session_id(value: Any) -> str | None:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


class SyncReader:
    """One JSON answer -> the chunks of a complete answer; `session_id` from `from_response`."""

    __slots__ = ("_factory", "_include_usage", "_label", "_show_reasoning", "_spec",
                 "session_id")

    def __init__(
        self,
        spec: CustomSpec,
        factory: ChunkFactory,
        *,
        show_reasoning: bool = False,
        include_usage: bool = True,
        label: str = "The upstream",
    ) -> None:
        if spec.sync is None:
            raise ValueError("this custom upstream has no `sync` mapping")
        self._spec = spec
        self._factory = factory
        self._show_reasoning = show_reasoning
        self._include_usage = include_usage
        self._label = label
        self.session_id: str | None = None

    def read(self, raw: bytes) -> list[ChatChunk]:
        return self.read_value(parse_json_body(raw, self._label))

    def read_value(self, payload: Any) -> list[ChatChunk]:
        assert self._spec.sync is not None  # checked in __init__
        from_response = self._spec.session.from_response
        if from_response is not None:
            self.session_id = _session_id(from_response(payload, "message"))
        return _sync_chunks(
            self._spec.sync,
            payload,
            self._factory,
            show_reasoning=self._show_reasoning,
            include_usage=self._include_usage,
            label=self._label,
            role=True,
        )


class StreamReader:
    """One streamed answer -> chunks, event by event.

    The adapter feeds every read and passes on what comes back; when `done` is set it stops
    reading (the end event came, or the stream failed), and at EOF or `done` it calls
    `finish()` until that returns []:

        for data in body:
            if out := reader.feed(data): yield out
            if reader.done: break
        while out := reader.finish(): yield out

    Both raise UpstreamFailed once the stream failed (an `error` rule, a line that is not
    JSON, an oversized event, EOF before the `end` event, no event at all), but only after
    returning the chunks that came before the failure.
    """

    __slots__ = (
        "_cumulative",
        "_decoder",
        "_factory",
        "_failure",
        "_fallback",
        "_finish",
        "_finished",
        "_from_response",
        "_has_end",
        "_include_usage",
        "_label",
        "_matched",
        "_only",
        "_pick",
        "_rules",
        "_sent",
        "_show_reasoning",
        "_started",
        "_sync",
        "_usage",
        "captured",
        "ended",
        "events",
        "session_id",
    )

    def __init__(
        self,
        spec: CustomSpec,
        factory: ChunkFactory,
        *,
        show_reasoning: bool = False,
        include_usage: bool = False,
        label: str = "The upstream",
        max_event: int = DEFAULT_MAX_EVENT,
    ) -> None:
        stream = spec.stream
        if stream is None:
            raise ValueError("this custom upstream has no `stream` mapping")
        self._rules: tuple[Rule, ...] = stream.rules
        self._pick = stream.pick
        self._has_end = stream.has_end
        self._decoder = make_decoder(stream.framing, max_event)
        self._sync = spec.sync
        # n8n in "last node" mode answers one JSON document on a streaming call.
        self._fallback = stream.framing == "ndjson" and spec.sync is not None
        self._from_response = spec.session.from_response
        self._factory = factory
        self._show_reasoning = show_reasoning
        self._include_usage = include_usage
        self._label = label
        self.captured: dict[str, Any] = {}
        self.session_id: str | None = None
        self.ended = False
        self.events = 0
        self._matched = 0
        self._only: Any = None
        self._started = False
        self._sent = False
        self._cumulative = ""
        self._usage: Usage | None = None
        self._finish: str | None = None
        self._failure: UpstreamFailed | None = None
        self._finished = False

    @property
    def done(self) -> bool:
        """Nothing more will be read: the end event came, or the stream failed."""
        return self.ended or self._failure is not None

    def feed(self, data: bytes) -> list[Out]:
        if self._failure is not None:
            raise self._failure
        if self.ended:
            return []
        decoder = self._decoder
        out = self._items(decoder.feed(data))
        if decoder.error is not None and not self.done:
            self._failure = self._unreadable(decoder.error)
        if self._failure is not None and not out:
            raise self._failure
        return out

    def feed_items(self, items: Iterable[Item]) -> list[Out]:
        """`feed` for events already decoded: `(event_name, payload)` pairs."""
        if self._failure is not None:
            raise self._failure
        out = self._items(items)
        if self._failure is not None and not out:
            raise self._failure
        return out

    def finish(self) -> list[Out]:
        """The chunks still due at EOF (or after the end event); [] once all are out."""
        if self._finished:
            if self._failure is not None:
                raise self._failure
            return []
        self._finished = True
        out: list[Out] = []
        if self._failure is None and not self.ended:
            decoder = self._decoder
            if decoder.error is None:
                out = self._items(decoder.flush())
                if decoder.error is not None and self._failure is None:
                    self._failure = self._unreadable(decoder.error)
        if self._failure is None:
            out.extend(self._close())
        if self._failure is not None and not out:
            raise self._failure
        return out

    def _unreadable(self, problem: str) -> UpstreamFailed:
        return UpstreamFailed(f"{self._label}'s stream cannot be read: {problem}.")

    # -- per event -----------------------------------------------------------------------

    def _items(self, items: Iterable[Item]) -> list[Out]:
        out: list[Out] = []
        pick = self._pick
        rules = self._rules
        for name, payload in items:
            if self.ended or self._failure is not None:
                break
            self.events += 1
            if not self._started:
                self._started = True
                out.append(self._factory.role())
            if self._from_response is not None and self.session_id is None:
                self.session_id = _session_id(self._from_response(payload, name))
            index = pick(payload, name)
            if index >= 0:
                self._matched += 1
                self._apply(rules[index], payload, name, out)
            elif self.events == 1:
                self._only = payload
        return out

    def _apply(self, rule: Rule, payload: Any, name: str, out: list[Out]) -> None:
        for key, get in rule.capture:
            value = get(payload, name)
            if value is not None:
                self.captured[key] = value
        if rule.is_error:
            self._failure = _failure(
                self._label, rule.error(payload, name) if rule.error is not None else None
            )
            return
        if rule.text is not None:
            text = rule.text(payload, name)
            if type(text) is not str:
                text = coerce_text(text)
            if rule.cumulative:
                text = self._new_suffix(text)
            elif rule.recap and self._sent:
                text = ""
            if text:
                if rule.separator and self._sent:
                    text = rule.separator + text
                self._sent = True
                out.append(self._factory.content(text))
        if rule.reasoning is not None and self._show_reasoning:
            thought = coerce_text(rule.reasoning(payload, name))
            if thought:
                out.append(self._factory.reasoning(thought))
        if rule.usage is not None:
            usage = _usage(rule.usage, payload, name)
            if usage is not None:
                if rule.usage_sum and self._usage is not None:
                    usage = _add_usage(self._usage, usage)
                self._usage = usage
        if rule.finish is not None:
            reason = _finish_reason(rule.finish(payload, name))
            if reason is not None:
                self._finish = reason
        if rule.end:
            self.ended = True

    def _new_suffix(self, text: str) -> str:
        """What a cumulative text adds to the last one. A text that does not extend it
        starts a new message (a second LLM call); one the last already covers adds nothing."""
        last = self._cumulative
        if text.startswith(last):
            self._cumulative = text
            return text[len(last) :]
        if last.startswith(text):
            return ""
        self._cumulative = text
        return text

    def _close(self) -> list[Out]:
        out: list[Out] = []
        if self.events == 0:
            self._failure = UpstreamFailed(
                f"{self._label} ended its stream without sending anything."
            )
            return out
        if self._fallback and self.events == 1 and self._matched == 0:
            assert self._sync is not None
            try:
                out.extend(
                    _sync_chunks(
                        self._sync,
                        self._only,
                        self._factory,
                        show_reasoning=self._show_reasoning,
                        include_usage=self._include_usage,
                        label=self._label,
                        role=False,
                    )
                )
            except UpstreamFailed as exc:
                self._failure = exc
            return out
        if self._has_end and not self.ended:
            self._failure = UpstreamFailed(
                f"{self._label}'s stream ended before its end event: the answer is truncated."
            )
            return out
        out.append(self._factory.finish(self._finish or "stop"))
        if self._include_usage:
            # The contract promises the usage chunk; zeros say "not reported".
            out.append(self._factory.usage(self._usage or make_usage(0, 0)))
        return out

