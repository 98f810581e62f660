"""Ending a Responses stream that an upstream serves natively (`responses: native`). Sans-IO.

The upstream's events go to the client as it framed them (proxy/upstreams/openai.py checks and
re-frames each one); the proxy only ends the stream. A whole stream ends with the upstream's
own terminal event, then `data: [DONE]`. A stream that breaks after the commit ends with a
`response.failed` of the proxy's making: it repeats the response the upstream announced in
`response.created` (id, model, created_at) with the error, and continues its sequence numbers.
Items the upstream had streamed before the failure are not listed in that object's `output`:
the proxy does not parse every event of a relayed stream to rebuild them. A stream that breaks
before the upstream sent any event (only keep-alives went out) gets the proxy's own
`response.created` and `response.in_progress` first, with a response object of its making, as
the translating writer builds it: SDKs refuse a stream whose first event is not
`response.created` (openai-python raises a RuntimeError that hides the error).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import orjson

from proxy.chunks import Comment, Out
from proxy.errors import ProxyError
from proxy.ingress.responses_items import frame
from proxy.ingress.responses_object import failure_error, response_base, responses_usage
from proxy.response_ids import new_response_id
from proxy.sse import DONE, EVENT_END, SSEDecoder, encode_comment
from proxy.upstreams.base import ByteStream

__all__ = ["NativeEncoder", "tracked"]


class NativeEncoder:
    """The relay's Encoder for a natively relayed stream: it sees the relayed bytes
    (`tracked`), and writes only the end."""

    __slots__ = ("_created", "_echo", "_model", "events")

    def __init__(self, model: str, echo: Mapping[str, Any]) -> None:
        self._model = model
        # The request's fields a response object of the proxy's making repeats.
        self._echo = echo
        self._created: dict[str, Any] | None = None
        # Data events relayed so far: the next sequence number, as the upstream counts from 0.
        self.events = 0

    def see(self, data: bytes) -> None:
        """Bytes relayed to the client: whole events, or one comment alone."""
        if data.startswith(b":"):
            return
        self.events += data.count(b"\n\n")
        if self._created is None and data.find(b"response.created") >= 0:
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
        start = b""
        created = self._created
        if created is not None:
            # An upstream's object may lack fields the specification requires (Letta Code's
            # does): the proxy's own fill them in, the upstream's values win.
            created = {**self._own(), **created}
        else:
            created = self._own()
            if not self.events:
                start = self._event("response.created", created)
                start += self._event("response.in_progress", created)
            created["usage"] = responses_usage(None)
        try:
            return start + self._event("response.failed", _failed(created, err))
        except orjson.JSONEncodeError:
            # The upstream's object nests deeper than orjson writes (it reads deeper): the
            # proxy's own stands in, under the upstream's id, so the stream still ends.
            own = self._own()
            if isinstance(created.get("id"), str):
                own["id"] = created["id"]
            own["usage"] = responses_usage(None)
            return start + self._event("response.failed", _failed(own, err))

    def _own(self) -> dict[str, Any]:
        created = response_base(new_response_id(), self._model, time.time(), self._echo, False)
        created.update(status="in_progress", completed_at=None, error=None,
                       incomplete_details=None, output=[], usage=None)
        return created

    def _event(self, kind: str, response: dict[str, Any]) -> bytes:
        data = orjson.dumps({"type": kind, "response": response, "sequence_number": self.events})
        self.events += 1
        return frame(kind) + data + EVENT_END

    def end(self) -> bytes:
        return DONE


def _failed(created: dict[str, Any], err: ProxyError) -> dict[str, Any]:
    response = dict(created)
    response["status"] = "failed"
    response["error"] = failure_error(err)
    response["output"] = []
    response["completed_at"] = None
    response["incomplete_details"] = None
    return response


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
