"""Ending a Responses stream that an upstream serves natively (`responses: native`). Sans-IO.

The upstream's events go to the client as it framed them (proxy/upstreams/openai.py checks and
re-frames each one); the proxy only ends the stream. A whole stream ends with the upstream's
own terminal event, then `data: [DONE]`. A stream that breaks after the commit ends with a
`response.failed` of the proxy's making: it repeats the response the upstream announced in
`response.created` (id, model, created_at) with the error, and continues its sequence numbers.
Items the upstream had streamed before the failure are not listed in that object's `output`:
the proxy does not parse every event of a relayed stream to rebuild them.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from typing import Any

import orjson

from proxy.chunks import Comment, Out
from proxy.errors import ProxyError
from proxy.ingress.responses_items import frame
from proxy.ingress.responses_object import failure_error
from proxy.response_ids import new_response_id
from proxy.sse import DONE, EVENT_END, SSEDecoder, encode_comment
from proxy.upstreams.base import ByteStream

__all__ = ["NativeEncoder", "tracked"]

_FAILED = frame("response.failed")


class NativeEncoder:
    """The relay's Encoder for a natively relayed stream: it sees the relayed bytes
    (`tracked`), and writes only the end."""

    __slots__ = ("_created", "_model", "events")

    def __init__(self, model: str) -> None:
        self._model = model
        self._created: dict[str, Any] | None = None
        # Data events relayed so far: the next sequence number, as the upstream counts from 0.
        self.events = 0

    def see(self, data: bytes) -> None:
        """Bytes relayed to the client: whole events, or one comment alone."""
        if data.startswith(b":"):
            return
        self.events += data.count(b"\n\n")
        if self._created is None and b"response.created" in data:
            for event in SSEDecoder().feed(data):
                try:
                    parsed = orjson.loads(event.data)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(parsed, dict) and parsed.get("type") == "response.created":
                    response = parsed.get("response")
                    if isinstance(response, dict):
                        self._created = response
                    break

    def batch(self, batch: list[Out]) -> bytes:
        # A relayed stream is bytes; only its keep-alives could come this way.
        return b"".join(encode_comment(o.text) for o in batch if isinstance(o, Comment))

    def error(self, err: ProxyError) -> bytes:
        response: dict[str, Any] = dict(self._created or {
            "id": new_response_id(),
            "object": "response",
            "created_at": int(time.time()),
            "model": self._model,
            "output": [],
        })
        response["status"] = "failed"
        response["error"] = failure_error(err)
        response["output"] = []
        response["completed_at"] = None
        response["incomplete_details"] = None
        event = {"type": "response.failed", "response": response, "sequence_number": self.events}
        self.events += 1
        return _FAILED + orjson.dumps(event) + EVENT_END

    def end(self) -> bytes:
        return DONE


def tracked(stream: ByteStream, encoder: NativeEncoder) -> ByteStream:
    """`stream`, with every item shown to `encoder` on its way to the client."""

    async def events() -> AsyncGenerator[bytes, None]:
        async for data in stream:
            encoder.see(data)
            yield data

    return ByteStream(
        events(), on_close=stream.aclose, headers=stream.headers,
        upstream_ms=stream.upstream_ms, session=stream.session,
    )
