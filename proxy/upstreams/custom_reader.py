"""A custom upstream's answer -> the internal chunk language (sans-IO: bytes in, chunks out).

`StreamReader` reads a streamed answer: the framing decoder turns bytes into
`(event_name, payload)` events, and for each event the first rule that matches (its `when`
values equal, its `has` paths truthy) says what the event carries: a text delta (or the
whole text so far, or a recap of deltas already sent), reasoning, usage, the finish reason,
values to capture, an error, or the end. `SyncReader` (custom_sync.py, re-exported here)
reads one JSON body with the `sync` mapping into the same chunks, so a sync answer is exactly
what accumulating the stream gives.

Chunks follow the letta kind: the role chunk on the first upstream event, content deltas,
`reasoning_content` only when reasoning is shown, one finish chunk, and the usage chunk only
when asked for. Failures are raised as UpstreamFailed after the chunks that came before them.

Every value taken as text follows one fixed coercion rule (custom-apis.md §6.5, in
custom_extract.py), which is what lets a dotted path read content blocks (Anthropic, Gemini
parts, n8n `{text_chunk}` objects).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from proxy.chunks import Out
from proxy.errors import UpstreamFailed
from proxy.openai_types import ChunkFactory, Usage, make_usage
from proxy.upstreams.custom_extract import (
    FAILED_FINISH,
    add_usage,
    coerce_text,
    error_message_of,
    failed_turn,
    failure,
    finish_reason,
    is_json_content_type,
    parse_json_body,
    session_id_of,
    usage_of,
)
from proxy.upstreams.custom_framing import DEFAULT_MAX_EVENT, Item, make_decoder
from proxy.upstreams.custom_rules import Rule
from proxy.upstreams.custom_sync import SyncReader, sync_chunks

if TYPE_CHECKING:
    from proxy.upstreams.custom_spec import CustomSpec

__all__ = [
    "StreamReader",
    "SyncReader",
    "coerce_text",
    "error_message_of",
    "is_json_content_type",
    "parse_json_body",
]


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
        return UpstreamFailed(f"{self._label} sent a stream that cannot be read: {problem}.")

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
                try:
                    self.session_id = session_id_of(self._from_response(payload, name),
                                                    self._label)
                except UpstreamFailed as exc:
                    self._failure = exc
                    break
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
            self._failure = failure(
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
            usage = usage_of(rule.usage, payload, name)
            if usage is not None:
                if rule.usage_sum and self._usage is not None:
                    usage = add_usage(self._usage, usage)
                self._usage = usage
        if rule.finish is not None:
            reason = finish_reason(rule.finish(payload, name))
            if reason == FAILED_FINISH:
                self._failure = failed_turn(self._label)
                return
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
                    sync_chunks(
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
                f"{self._label} ended its stream before its end event: the answer is truncated."
            )
            return out
        out.append(self._factory.finish(self._finish or "stop"))
        if self._include_usage:
            # The contract promises the usage chunk; zeros say "not reported".
            out.append(self._factory.usage(self._usage or make_usage(0, 0)))
        return out
