"""A `custom` upstream's one JSON answer -> the chunks of a complete answer (sans-IO).

The `sync` mapping reads the body into the same chunks a stream gives (role, content,
reasoning when shown, one finish chunk, the usage chunk), so a sync answer is exactly what
accumulating a stream gives. The stream reader uses it too, for NDJSON's single-document
fallback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from proxy.errors import UpstreamFailed
from proxy.openai_types import ChatChunk, ChunkFactory, make_usage
from proxy.upstreams.custom_extract import (
    FAILED_FINISH,
    coerce_text,
    failed_turn,
    failure,
    finish_reason,
    parse_json_body,
    session_id_of,
    usage_of,
)
from proxy.upstreams.custom_rules import SyncMapping

if TYPE_CHECKING:
    from proxy.upstreams.custom_spec import CustomSpec

__all__ = ["SyncReader", "sync_chunks"]


def sync_chunks(
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
            raise failure(label, problem)
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
    finish = finish_reason(mapping.finish(payload, event)) if mapping.finish else None
    if finish == FAILED_FINISH:
        raise failed_turn(label)
    chunks.append(factory.finish(finish or "stop"))
    if include_usage:
        usage = usage_of(mapping.usage, payload, event) if mapping.usage else None
        chunks.append(factory.usage(usage or make_usage(0, 0)))
    return chunks


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
            self.session_id = session_id_of(from_response(payload, "message"), self._label)
        return sync_chunks(
            self._spec.sync,
            payload,
            self._factory,
            show_reasoning=self._show_reasoning,
            include_usage=self._include_usage,
            label=self._label,
            role=True,
        )

