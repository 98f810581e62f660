"""The `openai` kind's relay of a native Responses stream (`responses: native`): the
upstream's events framed again as `event:` + `data:` up to the terminal one (the framing,
`ResponsesRelayState`, sans-IO; `native_events` reads)."""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
import orjson

from proxy.errors import ProxyError, UpstreamFailed
from proxy.sse import KEEPALIVE, SSEDecoder, reframe
from proxy.upstreams.deadlines import Deadlines
from proxy.upstreams.http import HttpUpstream, let_go
from proxy.upstreams.openai_relay import flush_events, stream_error

# The last event of a Responses stream, by `event:` name or, without one, by its data's type.
_RESPONSES_TERMINAL = frozenset(
    {"response.completed", "response.incomplete", "response.failed"}
)
_RESPONSES_TERMINAL_TYPE = re.compile(
    r'^\{[^{]*?"type"\s*:\s*"response\.(?:completed|incomplete|failed)"'
)
# A terminal type's string anywhere in the event: where `type` comes after the response object
# (openai-python's models serialise `{"response":{…},"sequence_number":…,"type":…}`) the event
# is parsed. A text that holds the string has its quotes escaped, so other events rarely are.
_RESPONSES_TERMINAL_NAME = re.compile(r'"response\.(?:completed|incomplete|failed)"')


class ResponsesRelayState:
    """A native Responses stream: its events framed again as `event:` + `data:` (so a
    truncated event never reaches the client) up to the terminal event; `[DONE]` dropped (the
    writer ends every stream with its own)."""

    __slots__ = ("ended", "failure", "terminal", "upstream")

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.terminal = False
        self.ended = False
        # Raised by the reader only after the events before it were passed on.
        self.failure: ProxyError | None = None

    def flush(self, decoder: SSEDecoder) -> list[Any]:
        return flush_events(decoder, self.upstream)

    def frame(self, events: list[Any]) -> bytes:
        out: list[bytes] = []
        for ev in events:
            data: str = ev.data
            if data == "[DONE]":
                self.ended = True
                break
            if not data:
                continue
            # SSE names an event without an `event:` line "message".
            name = "" if ev.event == "message" else ev.event
            if name == "error" or data.startswith('{"error"'):
                self.failure = stream_error(self.upstream, data)
                break
            if not (data.startswith("{") and data.rstrip().endswith("}")):
                self.failure = UpstreamFailed(
                    f"Upstream '{self.upstream}' sent a stream event that is not a JSON object."
                )
                break
            out.append(reframe(data.encode(), name))
            if name in _RESPONSES_TERMINAL if name else _is_terminal(data):
                self.terminal = True
                break
        return b"".join(out)


def _is_terminal(data: str) -> bool:
    """Whether the data of a Responses event without an `event:` line is a terminal one."""
    if _RESPONSES_TERMINAL_TYPE.match(data) is not None:
        return True
    if _RESPONSES_TERMINAL_NAME.search(data) is None:
        return False
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return isinstance(parsed, dict) and parsed.get("type") in _RESPONSES_TERMINAL


async def native_events(
    upstream: HttpUpstream, resp: aiohttp.ClientResponse, deadlines: Deadlines
) -> AsyncGenerator[bytes, None]:
    """The upstream's Responses events, each framed again as `event:` + `data:` (so a
    truncated event never reaches the client), up to its terminal event; its `[DONE]`, if
    it sends one, is dropped (the writer ends every stream with its own)."""
    decoder = SSEDecoder()
    responses = ResponsesRelayState(upstream.name)
    content = resp.content
    read = deadlines.read
    try:
        while not (responses.terminal or responses.ended):
            chunk = await read(content)
            if chunk is None:
                yield KEEPALIVE
                continue
            comments = decoder.comments
            out = responses.frame(decoder.feed(chunk) if chunk else responses.flush(decoder))
            if out:
                deadlines.sent()
                yield out
            elif decoder.comments != comments:
                deadlines.sent()
                yield KEEPALIVE
            if responses.failure is not None:
                # Raised only after the events before it were passed on.
                raise responses.failure
            responses.ended = responses.ended or not chunk
    except BaseException as exc:
        raise upstream.failure(exc, answered=True, what="stream") from None
    finally:
        let_go(resp, responses.terminal)
    if not responses.terminal:
        raise UpstreamFailed(
            f"Upstream '{upstream.name}' ended the Responses stream without a terminal event."
        )
