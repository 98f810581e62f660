"""A JSON request body as every API the proxy serves takes it: an object, parsed once,
refused with an OpenAI-shaped 400 (never a 500) when it is not JSON, not an object, or nested
deeper than the proxy can write back."""

from __future__ import annotations

from typing import Any

import orjson

from proxy.errors import InvalidRequest

# orjson parses JSON nested up to 1024 levels but serializes only up to 254, and the proxy's
# translations nest what the client sent deeper (a Responses event wraps the echoed request in
# `{"response": ...}`, a chat tool adds `function`, a custom template may add more): a body
# accepted at 254 levels would fail to encode after its 200 was committed. Real requests nest
# a few dozen levels at most (OpenAI's structured outputs take schemas 10 levels deep).
MAX_DEPTH = 128
_ENCODABLE_DEPTH = 254


def load_object(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest(
            "We could not parse the JSON body of your request. The body must be a JSON object."
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    # Counting brackets is a cheap bound on the depth: only bodies that could be too deep pay
    # for the trial serialization, of the body under the levels it must leave to spare.
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH:
        wrapped: Any = body
        for _ in range(_ENCODABLE_DEPTH - MAX_DEPTH):
            wrapped = [wrapped]
        try:
            orjson.dumps(wrapped)
        except orjson.JSONEncodeError:
            raise InvalidRequest(
                f"The request body is nested too deeply (more than {MAX_DEPTH} levels)."
            ) from None
    return body


def kind_of(value: Any) -> str:
    """A JSON value's type, as an error message names it."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "null"
