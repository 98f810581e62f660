"""What a `custom` upstream's JSON says, read with the block's paths (sans-IO): text by the one
coercion rule, usage counts, the finish reason, error messages, session ids.

Every value taken as text follows one fixed coercion rule (custom-apis.md §6.5), which is what
lets a dotted path read content blocks (Anthropic, Gemini parts, n8n `{text_chunk}` objects).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Final

import orjson

from proxy.errors import UpstreamFailed
from proxy.openai_types import MAX_COUNT, Usage, make_usage, token_count
from proxy.upstreams.custom_paths import Getter
from proxy.upstreams.custom_rules import UsageMapping
from proxy.upstreams.letta_translator import shorten

if TYPE_CHECKING:
    from proxy.upstreams.custom_spec import CustomSpec

__all__ = [
    "ERROR_LIMIT",
    "FAILED_FINISH",
    "MAX_SESSION_ID",
    "add_usage",
    "coerce_text",
    "error_message_of",
    "error_text",
    "failed_turn",
    "failure",
    "finish_reason",
    "id_text",
    "is_json_content_type",
    "message_at",
    "parse_json_body",
    "session_id_of",
    "usage_of",
]

# A finish reason that says the upstream's turn failed (its error, not an answer).
FAILED_FINISH: Final = "error"
# An upstream-issued session id is kept per session and sent back in every later request:
# one longer than this, or with a control character, is the upstream's failure.
MAX_SESSION_ID: Final = 512
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")

ERROR_LIMIT: Final = 300
_GENERIC_ERROR: Final = "the request failed"
# Lists in lists that a text value may nest (content blocks nest two or three): orjson reads
# 1,024 levels, and each level here is a Python call, which a hostile upstream would run past
# the interpreter's recursion limit.
MAX_TEXT_DEPTH: Final = 32
_PASSED_FINISH: Final = frozenset({"length", "content_filter"})


def coerce_text(value: Any, join: str = "", depth: int = 0) -> str:
    """A value as text: strings as they are, numbers and booleans spelled as JSON, lists
    concatenated (with `join` between non-empty parts), an object its `text` when it is a
    text block (`type` absent or "text", not a thought), anything else nothing. Lists nested
    deeper than MAX_TEXT_DEPTH are the upstream's failure."""
    if type(value) is str:
        return value
    if value is None:
        return ""
    if type(value) is list:
        if depth >= MAX_TEXT_DEPTH:
            raise UpstreamFailed(
                f"The upstream sent a text value nested in more than {MAX_TEXT_DEPTH} lists."
            )
        depth += 1
        parts = [text for item in value if (text := coerce_text(item, join, depth))]
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


def usage_of(mapping: UsageMapping, payload: Any, event: str) -> Usage | None:
    """The usage an event or body reports; None when it reports none at all."""
    if mapping.parent is not None:
        parent = mapping.parent(payload, event)
        if type(parent) is not dict:
            return None
        p_key, c_key, t_key = mapping.keys
        prompt = token_count(parent.get(p_key)) if p_key is not None else None
        completion = token_count(parent.get(c_key)) if c_key is not None else None
        total = token_count(parent.get(t_key)) if t_key is not None else None
    else:
        prompt = (
            token_count(mapping.prompt_tokens(payload, event)) if mapping.prompt_tokens else None
        )
        completion = (
            token_count(mapping.completion_tokens(payload, event))
            if mapping.completion_tokens
            else None
        )
        total = token_count(mapping.total_tokens(payload, event)) if mapping.total_tokens else None
    if prompt is None and completion is None and total is None:
        return None
    usage = make_usage(prompt or 0, completion or 0)
    if total is not None:
        usage["total_tokens"] = total
    return usage


def add_usage(old: Usage, new: Usage) -> Usage:
    """Two reports' counts summed, each sum capped as a single count is (token_count)."""
    return {
        "prompt_tokens": min(old.get("prompt_tokens", 0) + new.get("prompt_tokens", 0), MAX_COUNT),
        "completion_tokens": min(
            old.get("completion_tokens", 0) + new.get("completion_tokens", 0), MAX_COUNT
        ),
        "total_tokens": min(old.get("total_tokens", 0) + new.get("total_tokens", 0), MAX_COUNT),
    }


def finish_reason(value: Any) -> str | None:
    """The finish reason a client gets; FAILED_FINISH is the caller's to raise (failed_turn)."""
    if value is None:
        return None
    if value == FAILED_FINISH:
        return FAILED_FINISH
    # The reasons a client acts on (the answer was cut, or withheld); the rest mean stop.
    return value if type(value) is str and value in _PASSED_FINISH else "stop"


def failed_turn(label: str) -> UpstreamFailed:
    return UpstreamFailed(f"{label} reported that its turn failed (finish reason `error`).")


def error_text(value: Any) -> str:
    try:
        text = coerce_text(value)
    except UpstreamFailed:  # too deep to read as text: the JSON, if orjson can write it
        text = ""
    if not text and isinstance(value, dict | list) and value:
        try:
            text = orjson.dumps(value).decode()
        except orjson.JSONEncodeError:
            text = ""
    return shorten(text, ERROR_LIMIT) if text else ""


def failure(label: str, value: Any) -> UpstreamFailed:
    text = error_text(value) or _GENERIC_ERROR
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
    return message_at(spec.error_message, raw)


def message_at(paths: Getter, raw: bytes) -> str | None:
    """The message `paths` find in a JSON body, shortened; None if it has none."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    text = error_text(paths(body, "message"))
    return text or None


def id_text(value: Any) -> str | None:
    """An id the upstream gave: a non-empty string, or an integer as text."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def session_id_of(value: Any, label: str = "The upstream") -> str | None:
    """A session id the upstream issued (id_text), refused as the upstream's failure when it
    is longer than MAX_SESSION_ID or holds a control character: it would be kept in memory
    and sent back in every later request of the session."""
    ident = id_text(value)
    if ident is None:
        return None
    if len(ident) > MAX_SESSION_ID:
        raise UpstreamFailed(
            f"{label} reported a session id longer than {MAX_SESSION_ID} characters."
        )
    if _CONTROL.search(ident) is not None:
        raise UpstreamFailed(f"{label} reported a session id with a control character.")
    return ident
