"""A reusable check of any Responses API event stream, raw SSE bytes or already parsed.

`assert_responses_stream(stream)` raises AssertionError at the first rule a stream breaks and
returns the terminal response object. The rules (DESIGN "Responses API", the Open Responses
specification, and what openai-python's `responses.stream()` accumulates):

* every event's `event:` name equals its data's `type`; `data: [DONE]` comes once, last;
* `sequence_number` is 0, 1, 2, … with no gap;
* `response.created` then `response.in_progress` first, exactly one terminal event
  (`response.completed` / `response.incomplete` / `response.failed`) last, one response id
  (`resp_…`) in all of them, and every field the specification requires in each object;
* items one at a time: `output_item.added` (output_index 0, 1, …; `msg_`/`rs_`/`fc_` ids,
  unique) → content parts (`content_part.added` → deltas → `<kind>.done` →
  `content_part.done`) or function-call argument deltas (at least one) →
  `function_call_arguments.done` → `output_item.done` with the same id;
* each `.done` text equals its deltas joined; function-call `.done` arguments equal theirs;
* the terminal object's `output` equals the items as they were done (same ids, same
  content), and its output text equals every `output_text` delta joined;
* every event parses as openai-python's `ResponseStreamEvent` (a response object as its
  `Response`) with no field the type does not know, but `SPEC_ONLY`
  (`assert_response_types`); every item has `id` and `status`, every `output_text` part
  `annotations` and `logprobs`, which the types leave optional.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import pydantic
from openai.types.responses import Response, ResponseStreamEvent

from proxy.sse import SSEDecoder

__all__ = [
    "RESPONSE_REQUIRED", "Parsed", "assert_response_types", "assert_responses_stream",
    "parse_sse",
]

# ResponseResource's `required` list in the Open Responses specification.
RESPONSE_REQUIRED = frozenset({
    "id", "object", "created_at", "completed_at", "status", "incomplete_details", "model",
    "previous_response_id", "instructions", "output", "error", "tools", "tool_choice",
    "truncation", "parallel_tool_calls", "text", "top_p", "presence_penalty",
    "frequency_penalty", "top_logprobs", "temperature", "reasoning", "usage",
    "max_output_tokens", "max_tool_calls", "store", "background", "service_tier", "metadata",
    "safety_identifier", "prompt_cache_key",
})
USAGE_REQUIRED = frozenset({
    "input_tokens", "input_tokens_details", "output_tokens", "output_tokens_details",
    "total_tokens",
})
# Response fields the Open Responses specification requires (and OpenAI's API sends) that
# openai-python's `Response` type does not declare.
SPEC_ONLY = frozenset({"presence_penalty", "frequency_penalty", "store"})
_EVENT: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(ResponseStreamEvent)
# Each event type's model, to name what is wrong with an event the union refuses (the union's
# own error lists every member's).
_EVENT_TYPES: dict[str, type[pydantic.BaseModel]] = {
    typing.get_args(member.model_fields["type"].annotation)[0]: member
    for member in typing.get_args(typing.get_args(ResponseStreamEvent)[0])
}
TERMINAL = ("response.completed", "response.incomplete", "response.failed")
LIFECYCLE = ("response.created", "response.in_progress", *TERMINAL)
ID = re.compile(r"[A-Za-z0-9_-]+")
ITEM_PREFIX = {"message": "msg_", "reasoning": "rs_", "function_call": "fc_"}
PART_OF = {  # delta/done event kind -> the content part type it belongs to, and its field
    "output_text": ("output_text", "text"),
    "refusal": ("refusal", "refusal"),
    "reasoning_text": ("reasoning_text", "text"),
}


@dataclass
class Parsed:
    events: list[tuple[str | None, dict[str, Any]]] = field(default_factory=list)
    done: int = 0
    after_done: int = 0
    comments: int = 0


def parse_sse(raw: bytes) -> Parsed:
    """Each event's name and JSON data; counts `[DONE]` and anything after it."""
    decoder = SSEDecoder()
    events = decoder.feed(raw)
    assert decoder.at_boundary, "the stream ends inside an event"
    parsed = Parsed(comments=raw.count(b"\n:") + raw.startswith(b":"))
    for event in events:
        if parsed.done:
            parsed.after_done += 1
            continue
        if event.data == "[DONE]":
            parsed.done += 1
            continue
        data = orjson.loads(event.data)
        assert isinstance(data, dict), f"event data is not a JSON object: {event.data[:80]}"
        parsed.events.append((event.event, data))
    return parsed


@dataclass
class _Item:
    index: int
    id: str
    type: str
    added: dict[str, Any]
    parts: list[dict[str, Any]] = field(default_factory=list)
    part: dict[str, Any] | None = None
    part_texts: list[str] = field(default_factory=list)
    part_done_text: str | None = None
    args: list[str] = field(default_factory=list)
    args_done: str | None = None
    done: dict[str, Any] | None = None


def assert_responses_stream(
    stream: bytes | Parsed | Sequence[dict[str, Any]] | Sequence[tuple[str | None, dict[str, Any]]],
    *,
    require_done: bool = True,
) -> dict[str, Any]:
    """Checks the whole stream and returns the terminal response object."""
    if isinstance(stream, bytes):
        stream = parse_sse(stream)
    if isinstance(stream, Parsed):
        if require_done:
            assert stream.done == 1, f"expected one data: [DONE], got {stream.done}"
            assert stream.after_done == 0, "events after data: [DONE]"
        events = stream.events
    else:
        events = [e if isinstance(e, tuple) else (None, e) for e in stream]
    assert events, "no events"

    for n, (name, data) in enumerate(events):
        kind = data.get("type")
        assert isinstance(kind, str), f"event {n} has no type"
        assert_response_types(data, f"event {n} ({kind})")
        if name is not None:
            assert name == kind, f"event {n}: `event: {name}` but type {kind}"
        assert data.get("sequence_number") == n, (
            f"event {n} ({kind}) has sequence_number {data.get('sequence_number')}"
        )

    kinds = [d["type"] for _, d in events]
    assert kinds[:2] == ["response.created", "response.in_progress"], (
        f"stream must open with created, in_progress; got {kinds[:2]}"
    )
    terminals = [k for k in kinds if k in TERMINAL]
    assert len(terminals) == 1, f"expected exactly one terminal event, got {terminals}"
    assert kinds[-1] in TERMINAL, f"the terminal event must be last, got {kinds[-1]}"

    response_id = events[0][1]["response"]["id"]
    assert response_id.startswith("resp_") and ID.fullmatch(response_id), response_id
    for _, data in events:
        if data["type"] in LIFECYCLE:
            _check_response_object(data["response"], response_id, data["type"])
    created = events[0][1]["response"]
    assert created["status"] == "in_progress" and created["output"] == [], created["status"]

    items: list[_Item] = []
    ids: set[str] = set()
    open_item: _Item | None = None
    text_deltas: list[str] = []
    for n, (_, data) in enumerate(events[2:-1], 2):
        kind = data["type"]
        where = f"event {n} ({kind})"
        assert kind not in LIFECYCLE, f"{where}: lifecycle event in the middle of the stream"
        if kind == "response.output_item.added":
            assert open_item is None, f"{where}: item {open_item and open_item.id} still open"
            item = data["item"]
            assert data["output_index"] == len(items), f"{where}: output_index out of order"
            _check_item_id(item, where)
            assert item["id"] not in ids, f"{where}: duplicate item id {item['id']}"
            assert item.get("status") == "in_progress", f"{where}: added item not in_progress"
            ids.add(item["id"])
            open_item = _Item(len(items), item["id"], item["type"], item)
            items.append(open_item)
            continue
        assert open_item is not None, f"{where}: no open item"
        assert data.get("output_index") == open_item.index, f"{where}: wrong output_index"
        if "item_id" in data or kind != "response.output_item.done":
            assert data.get("item_id") == open_item.id, f"{where}: item_id is not the open item"
        if kind == "response.content_part.added":
            assert open_item.type in ("message", "reasoning"), f"{where}: part on a call"
            assert open_item.part is None, f"{where}: a content part is still open"
            assert data["content_index"] == len(open_item.parts), f"{where}: content_index"
            part = data["part"]
            assert part.get(PART_OF.get(part["type"], ("", "text"))[1]) == "", (
                f"{where}: a new part must be empty"
            )
            open_item.part = part
            open_item.part_texts = []
            open_item.part_done_text = None
        elif kind.endswith(".delta") and kind != "response.function_call_arguments.delta":
            part_kind = kind[len("response."):-len(".delta")]
            _check_part_event(open_item, data, part_kind, where)
            assert open_item.part_done_text is None, f"{where}: delta after the part's done"
            assert isinstance(data["delta"], str), where
            open_item.part_texts.append(data["delta"])
            if part_kind == "output_text":
                text_deltas.append(data["delta"])
        elif kind == "response.content_part.done":
            assert open_item.part is not None, f"{where}: no open part"
            assert data["content_index"] == len(open_item.parts), f"{where}: content_index"
            assert open_item.part_done_text is not None, f"{where}: before the part's text done"
            part = data["part"]
            assert part["type"] == open_item.part["type"], f"{where}: part type changed"
            field_name = PART_OF[part["type"]][1]
            assert part[field_name] == open_item.part_done_text, f"{where}: part text differs"
            open_item.parts.append(part)
            open_item.part = None
        elif kind.endswith(".done") and kind[len("response."):-len(".done")] in PART_OF:
            part_kind = kind[len("response."):-len(".done")]
            _check_part_event(open_item, data, part_kind, where)
            assert open_item.part_done_text is None, f"{where}: done twice"
            text = data[PART_OF[part_kind][1]]
            assert text == "".join(open_item.part_texts), f"{where}: text != joined deltas"
            open_item.part_done_text = text
        elif kind == "response.function_call_arguments.delta":
            assert open_item.type == "function_call", f"{where}: arguments on a non-call"
            assert open_item.args_done is None, f"{where}: delta after arguments done"
            assert isinstance(data["delta"], str), where
            open_item.args.append(data["delta"])
        elif kind == "response.function_call_arguments.done":
            assert open_item.type == "function_call", f"{where}: arguments on a non-call"
            assert open_item.args, f"{where}: a function call needs at least one delta"
            assert data["arguments"] == "".join(open_item.args), (
                f"{where}: arguments != joined deltas"
            )
            open_item.args_done = data["arguments"]
        elif kind == "response.output_item.done":
            item = data["item"]
            assert item["id"] == open_item.id and item["type"] == open_item.type, (
                f"{where}: the done item is not the added one"
            )
            assert open_item.part is None, f"{where}: a content part is still open"
            assert item.get("status") in ("completed", "incomplete"), f"{where}: status"
            if open_item.type == "function_call":
                assert open_item.args_done is not None, f"{where}: before arguments done"
                assert item["arguments"] == open_item.args_done, f"{where}: arguments differ"
                assert item["call_id"] == open_item.added["call_id"], f"{where}: call_id changed"
                assert item["name"], f"{where}: function call without a name"
            else:
                assert item["content"] == open_item.parts, f"{where}: content != done parts"
            open_item.done = item
            open_item = None
        else:
            raise AssertionError(f"{where}: unexpected event type")

    terminal_kind = kinds[-1]
    final = events[-1][1]["response"]
    expected_status = terminal_kind[len("response."):]
    assert final["status"] == expected_status, f"{terminal_kind} with status {final['status']}"
    output = final["output"]
    assert [o["id"] for o in output] == [i.id for i in items], "final output ids differ"
    if terminal_kind == "response.failed":
        error = final["error"]
        assert error and error.get("code") and error.get("message"), "failed without an error"
        for item, out in zip(items, output, strict=True):
            if item.done is not None:
                assert out == item.done, f"final item {item.id} differs from its done event"
    else:
        assert open_item is None, f"item {open_item and open_item.id} never done"
        assert final["error"] is None, "an error on a response that did not fail"
        assert output == [i.done for i in items], "final output differs from the done items"
        if terminal_kind == "response.incomplete":
            assert (final.get("incomplete_details") or {}).get("reason"), "no incomplete reason"
        else:
            assert isinstance(final["completed_at"], int), "completed without completed_at"
        assert isinstance(final["usage"], dict) and final["usage"].keys() >= USAGE_REQUIRED
    assert output_text(final) == "".join(text_deltas), "final output text != joined deltas"
    return final


def output_text(response: dict[str, Any]) -> str:
    return "".join(
        part["text"]
        for item in response["output"]
        if item["type"] == "message"
        for part in item["content"]
        if part["type"] == "output_text"
    )


def _check_response_object(response: dict[str, Any], response_id: str, kind: str) -> None:
    missing = RESPONSE_REQUIRED - response.keys()
    assert not missing, f"{kind}: response object lacks {sorted(missing)}"
    assert response["id"] == response_id, f"{kind}: response id changed"
    assert response["object"] == "response", kind


def _check_item_id(item: dict[str, Any], where: str) -> None:
    prefix = ITEM_PREFIX.get(item.get("type", ""))
    assert prefix is not None, f"{where}: unknown item type {item.get('type')}"
    item_id = item.get("id", "")
    assert item_id.startswith(prefix) and ID.fullmatch(item_id), f"{where}: item id {item_id}"


def _check_part_event(item: _Item, data: dict[str, Any], part_kind: str, where: str) -> None:
    assert item.part is not None, f"{where}: no open content part"
    assert item.part["type"] == PART_OF[part_kind][0], f"{where}: wrong part type"
    assert data["content_index"] == len(item.parts), f"{where}: content_index"


def assert_response_types(data: dict[str, Any], where: str = "response") -> None:
    """`data` parses as openai-python's type (a stream event, or a response object if it has
    no event type) and holds no field that type does not know, nor lacks what the Open
    Responses specification requires of its items and `output_text` parts."""
    is_event = not (data.get("object") == "response" and "output" in data)
    try:
        model = (
            _EVENT.validate_python(data, strict=False) if is_event
            else Response.model_validate(data, strict=False)
        )
    except pydantic.ValidationError as exc:
        member = _EVENT_TYPES.get(data.get("type", "")) if is_event else None
        if member is None:
            raise AssertionError(f"{where}: not an openai-python type: {exc}") from None
        try:
            member.model_validate(data, strict=False)
        except pydantic.ValidationError as narrow:
            exc = narrow
        raise AssertionError(f"{where}: not an openai-python {member.__name__}: {exc}") from None
    unknown = _unknown_fields(model, "")
    assert not unknown, f"{where}: fields the openai-python type does not know: {unknown}"
    response = data.get("response") if is_event else data
    items = list(response["output"]) if isinstance(response, dict) else []
    if is_event and isinstance(data.get("item"), dict):
        items.append(data["item"])
    for item in items:
        assert "id" in item and "status" in item, f"{where}: an item without id or status"
    parts = [p for i in items if i.get("type") == "message" for p in i.get("content", [])]
    if is_event and isinstance(data.get("part"), dict):
        parts.append(data["part"])
    for part in parts:
        if part.get("type") == "output_text":
            assert "annotations" in part and "logprobs" in part, (
                f"{where}: an output_text part without annotations or logprobs"
            )
    if data.get("type") == "response.completed" or (not is_event and data["status"] == "completed"):
        usage = (response or {}).get("usage") or {}
        assert "input_tokens_details" in usage and "output_tokens_details" in usage, (
            f"{where}: a completed response without usage details"
        )


def _unknown_fields(value: Any, path: str) -> list[str]:
    """Fields openai-python's models kept as extras (they allow any): a misspelled or made-up
    field of the proxy's."""
    found: list[str] = []
    if isinstance(value, pydantic.BaseModel):
        extra = value.model_extra or {}
        found += [
            f"{path}.{key}" for key in extra
            if not (isinstance(value, Response) and key in SPEC_ONLY)
        ]
        for name in type(value).model_fields:
            found += _unknown_fields(getattr(value, name), f"{path}.{name}")
    elif isinstance(value, list | tuple):
        for n, item in enumerate(value):
            found += _unknown_fields(item, f"{path}[{n}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            found += _unknown_fields(item, f"{path}.{key}")
    return found
