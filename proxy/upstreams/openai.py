"""The `openai` kind: any server that speaks `/v1/chat/completions` (vLLM, LM Studio, Ollama...).

For a chat-completions client the stream is relayed event by event without parsing each
chunk's JSON (`ByteStream`): the proxy only frames the SSE stream, so a truncated stream is
noticed, checks each event's shape, and looks for a finish_reason with a regex. For any other
ingress the same stream is decoded into chunks (`ChunkStream`).

The adapter owns the rest of its upstream's API that the proxy relays: `embed` (`/embeddings`,
`model` rewritten both ways) and, with `responses: native`, `respond` / `open_responses`
(`/responses`, `model` rewritten and `store: false`, since the proxy keeps every route
stateless but Letta's; events relayed as the upstream sent them, `[DONE]` left to the writer).
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncGenerator
from typing import Any, ClassVar

import aiohttp
import orjson
from multidict import CIMultiDict

from proxy.chunks import KEEP_ALIVE, Out
from proxy.errors import ProxyError, UpstreamFailed
from proxy.exchange import Exchange
from proxy.openai_types import ChatChunk, ChatCompletion
from proxy.session_keys import session_key
from proxy.sse import SSEDecoder, encode_comment
from proxy.upstreams.base import Answer, ByteStream, Call, ChunkStream
from proxy.upstreams.deadlines import Deadlines
from proxy.upstreams.http import HttpUpstream
from proxy.upstreams.http_errors import read_answer
from proxy.upstreams.openai_options import OpenAIOptions

# A finish chunk carries a string finish_reason; every other chunk has null or nothing.
_FINISH = re.compile(r'"finish_reason"\s*:\s*"')
_FINISH_BYTES = re.compile(rb'"finish_reason"\s*:\s*"')
_BOUNDARY = b"\n\n"
# Whole events, each a single `data:` line holding what has the shape of a JSON object that
# is not an error (the caller rules out CR, which SSE also reads as a line end): `{`, then
# anything but a line end, then `}`. `[^\n]*` rather than a class of two characters: the
# regex engine scans a single excluded byte several times faster, and a read that does not
# match fails in linear time.
_PLAIN_EVENTS = re.compile(rb'(?:data: \{(?!"error")[^\n]*\}\n\n)+')
_DONE_EVENT = b"data: [DONE]\n\n"
_DONE_LEN = len(_DONE_EVENT)
_KEEPALIVE = encode_comment()
# The last event of a Responses stream, by `event:` name or, without one, by its data's type.
_RESPONSES_TERMINAL = frozenset(
    {"response.completed", "response.incomplete", "response.failed"}
)
_RESPONSES_TERMINAL_TYPE = re.compile(
    r'^\{[^{]*?"type"\s*:\s*"response\.(?:completed|incomplete|failed)"'
)


class OpenAI(HttpUpstream):
    kind: ClassVar[str] = "openai"
    embeds: ClassVar[bool] = True

    @property
    def native_responses(self) -> bool:
        return self.options.responses == "native"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        options = self.spec.options
        # A spec built by hand (not read from a file) has no options: the defaults.
        self.options = options if isinstance(options, OpenAIOptions) else OpenAIOptions()
        self.chat_url = self.base + "/chat/completions"
        self.models_url = self.base + "/models"
        self.responses_url = self.base + "/responses"
        self.embeddings_url = self.base + "/embeddings"
        self._forward = self.spec.forward_headers
        self._session_header = self.options.session_header

    @property
    def wants_session(self) -> bool:
        return self._session_header is not None

    def _request_headers(self, call: Call) -> CIMultiDict[str]:
        session = self._session_header
        if session is not None and call.session_hint is not None:
            headers = self.headers.copy()
            # The proxy's own key for the chat, namespaced by the caller's API key: one
            # client chat is one upstream session, and two keys never share one.
            headers[session] = session_key(call.key_id, call.session_hint)
        elif not self._forward:
            return self.headers
        else:
            headers = self.headers.copy()
        client = call.headers
        # Headers the client's own `Connection` header names are for its hop only (RFC 9110
        # §7.6.1), even when forward_headers lists them.
        hop = {
            name.strip().lower() for name in client.get("Connection", "").split(",")
        }
        for name in self._forward:
            value = client.get(name)
            if value is not None and name.lower() not in hop:
                headers[name] = value
        return headers

    def _payload(self, call: Call) -> bytes:
        body = call.body
        if call.upstream_model is not None and body.get("model") != call.upstream_model:
            body = {**body, "model": call.upstream_model}
        return orjson.dumps(body)

    def _responses_payload(self, call: Call) -> bytes:
        assert call.responses is not None
        body = dict(call.responses)
        if call.upstream_model is not None:
            body["model"] = call.upstream_model
        body["store"] = False
        return orjson.dumps(body)

    def _post(
        self, call: Call, http: aiohttp.ClientSession, url: str | None = None,
        payload: bytes | None = None,
    ) -> Any:
        return self.send(
            http, "POST", url or self.chat_url,
            data=self._payload(call) if payload is None else payload,
            headers=self._request_headers(call),
        )

    async def _json_answer(
        self, call: Call, http: aiohttp.ClientSession, url: str, payload: bytes, what: str
    ) -> tuple[dict[str, Any], bytes, tuple[tuple[str, str], ...], float]:
        """POST `payload` to `url`: the parsed JSON object, its bytes, the headers to relay and
        the milliseconds it took; anything but a JSON object is the upstream's failure."""
        started = time.perf_counter()
        deadlines = self.deadlines(call.exchange)
        try:
            resp, data = await deadlines.answer(self._fetch(call, http, url, payload))
        except BaseException as exc:
            raise self.failure(exc, answered=False) from None
        finally:
            deadlines.close()
        upstream_ms = (time.perf_counter() - started) * 1000.0
        try:
            parsed = orjson.loads(data)
        except orjson.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise UpstreamFailed(f"Upstream '{self.name}' answered with a body that is not {what}.")
        return parsed, data, self.relayable_headers(resp.raw_headers), upstream_ms

    async def complete(self, call: Call, http: aiohttp.ClientSession) -> Answer:
        parsed, data, headers, upstream_ms = await self._json_answer(
            call, http, self.chat_url, self._payload(call), "a chat completion"
        )
        if not isinstance(parsed.get("choices"), list):
            raise UpstreamFailed(
                f"Upstream '{self.name}' answered with a body that is not a chat completion."
            )
        completion: ChatCompletion = parsed  # type: ignore[assignment]
        return Answer(completion, headers, upstream_ms, data)

    async def respond(self, call: Call, http: aiohttp.ClientSession) -> Answer:
        _, data, headers, upstream_ms = await self._json_answer(
            call, http, self.responses_url, self._responses_payload(call), "a response object"
        )
        return Answer(None, headers, upstream_ms, data)

    async def embed(self, call: Call, http: aiohttp.ClientSession) -> Answer:
        parsed, data, headers, upstream_ms = await self._json_answer(
            call, http, self.embeddings_url, self._payload(call), "an embeddings list"
        )
        if not isinstance(parsed.get("data"), list):
            raise UpstreamFailed(
                f"Upstream '{self.name}' answered with a body that is not an embeddings list."
            )
        if "model" in parsed and parsed["model"] != call.client_model:
            # The client's name for the model, as in every other answer of the proxy.
            parsed["model"] = call.client_model
            data = orjson.dumps(parsed)
        return Answer(None, headers, upstream_ms, data)

    async def _fetch(
        self, call: Call, http: aiohttp.ClientSession, url: str, payload: bytes
    ) -> tuple[aiohttp.ClientResponse, bytes]:
        resp = await self._post(call, http, url, payload)
        try:
            if resp.status >= 300:
                raise await self.refused(resp)
            try:
                return resp, await read_answer(resp, self.name)
            except aiohttp.ClientError as exc:
                raise self.failure(exc, answered=True) from None
        finally:
            resp.release()

    async def _accepted_stream(
        self, call: Call, http: aiohttp.ClientSession, url: str, payload: bytes | None
    ) -> tuple[aiohttp.ClientResponse, Deadlines, float]:
        """The upstream's answer to a streaming request, once it is a 2xx event stream."""
        started = time.perf_counter()
        deadlines = self.deadlines(call.exchange)
        try:
            resp = await deadlines.answer(self._post(call, http, url, payload))
            if resp.status >= 300:
                raise await self.refused(resp)
        except BaseException as exc:
            deadlines.close()
            raise self.failure(exc, answered=False) from None
        if not resp.headers.get("Content-Type", "").startswith("text/event-stream"):
            resp.close()
            deadlines.close()
            raise UpstreamFailed(
                f"Upstream '{self.name}' answered a streaming request without an event stream "
                f"(Content-Type {resp.headers.get('Content-Type', 'missing')!r})."
            )
        deadlines.set_keepalive(self.spec.keepalive)
        return resp, deadlines, (time.perf_counter() - started) * 1000.0

    async def open_responses(self, call: Call, http: aiohttp.ClientSession) -> ByteStream:
        resp, deadlines, upstream_ms = await self._accepted_stream(
            call, http, self.responses_url, self._responses_payload(call)
        )
        return ByteStream(
            self._relay_responses(resp, deadlines), on_close=_closer(resp),
            deadlines=deadlines, headers=self.relayable_headers(resp.raw_headers),
            upstream_ms=upstream_ms,
        )

    async def _relay_responses(
        self, resp: aiohttp.ClientResponse, deadlines: Deadlines
    ) -> AsyncGenerator[bytes, None]:
        """The upstream's Responses events, each framed again as `event:` + `data:` (so a
        truncated event never reaches the client), up to its terminal event; its `[DONE]`, if
        it sends one, is dropped (the writer ends every stream with its own)."""
        decoder = SSEDecoder()
        state = _RelayState(self.name)
        terminal = ended = False
        failure: ProxyError | None = None
        content = resp.content
        read = deadlines.read
        try:
            while not (terminal or ended):
                chunk = await read(content)
                if chunk is None:
                    yield _KEEPALIVE
                    continue
                comments = decoder.comments
                out: list[bytes] = []
                for ev in decoder.feed(chunk) if chunk else state.flush(decoder):
                    data: str = ev.data
                    if data == "[DONE]":
                        ended = True
                        break
                    if not data:
                        continue
                    # SSE names an event without an `event:` line "message".
                    name = "" if ev.event == "message" else ev.event
                    if name == "error" or data.startswith('{"error"'):
                        failure = stream_error(self.name, data)
                        break
                    if not (data.startswith("{") and data.rstrip().endswith("}")):
                        failure = UpstreamFailed(
                            f"Upstream '{self.name}' sent a stream event that is not a JSON "
                            "object."
                        )
                        break
                    payload = data.encode().replace(b"\n", b"\ndata: ")
                    head = b"event: " + name.encode() + b"\n" if name else b""
                    out.append(head + b"data: " + payload + b"\n\n")
                    if (
                        name in _RESPONSES_TERMINAL
                        if name
                        else _RESPONSES_TERMINAL_TYPE.match(data) is not None
                    ):
                        terminal = True
                        break
                if out:
                    deadlines.sent()
                    yield b"".join(out)
                elif decoder.comments != comments:
                    deadlines.sent()
                    yield _KEEPALIVE
                if failure is not None:
                    # Raised only after the events before it were passed on.
                    raise failure
                ended = ended or not chunk
        except BaseException as exc:
            raise self.failure(exc, answered=True, what="stream") from None
        finally:
            _let_go(resp, terminal)
        if not terminal:
            raise UpstreamFailed(
                f"Upstream '{self.name}' ended the Responses stream without a terminal event."
            )

    async def open_stream(
        self, call: Call, http: aiohttp.ClientSession
    ) -> ChunkStream | ByteStream:
        resp, deadlines, upstream_ms = await self._accepted_stream(
            call, http, self.chat_url, None
        )
        headers = self.relayable_headers(resp.raw_headers)
        close = _closer(resp)
        if call.raw:
            return ByteStream(
                self._relay(resp, deadlines), on_close=close, deadlines=deadlines,
                headers=headers, upstream_ms=upstream_ms,
            )
        return ChunkStream(
            self._decode(resp, deadlines), on_close=close, deadlines=deadlines,
            headers=headers, upstream_ms=upstream_ms,
        )

    async def _relay(
        self, resp: aiohttp.ClientResponse, deadlines: Deadlines
    ) -> AsyncGenerator[bytes, None]:
        decoder = SSEDecoder()
        state = _RelayState(self.name)
        content = resp.content
        read = deadlines.read
        try:
            while not state.done:
                chunk = await read(content)
                if chunk is None:
                    yield _KEEPALIVE
                    continue
                if not chunk:
                    out = state.frame(state.flush(decoder))
                    if out:
                        yield out
                    break
                comments = decoder.comments
                plain = (
                    state.pass_through(chunk)
                    if decoder.at_boundary and len(chunk) <= decoder.max_line
                    else None
                )
                if plain is not None:
                    decoder.passed_over()
                    out = plain
                else:
                    out = state.frame(decoder.feed(chunk))
                if out:
                    deadlines.sent()
                    yield out
                elif decoder.comments != comments:
                    # Pass the upstream's own keep-alives on, so the client's idle timer resets.
                    deadlines.sent()
                    yield _KEEPALIVE
                if state.error is not None:
                    break
        except BaseException as exc:
            raise self.failure(exc, answered=True, what="stream") from None
        finally:
            _let_go(resp, state.done)
        if state.error is not None:
            raise self.scrubbed(state.error)
        state.check_end()

    async def _decode(
        self, resp: aiohttp.ClientResponse, deadlines: Deadlines
    ) -> AsyncGenerator[list[Out], None]:
        decoder = SSEDecoder()
        state = _RelayState(self.name)
        content = resp.content
        read = deadlines.read
        try:
            while not state.done:
                chunk = await read(content)
                if chunk is None:
                    yield [KEEP_ALIVE]
                    continue
                comments = decoder.comments
                out = state.decode(decoder.feed(chunk) if chunk else state.flush(decoder))
                if out:
                    deadlines.sent()
                    yield out
                elif decoder.comments != comments:
                    deadlines.sent()
                    yield [KEEP_ALIVE]
                if not chunk or state.error is not None:
                    break
        except BaseException as exc:
            raise self.failure(exc, answered=True, what="stream") from None
        finally:
            _let_go(resp, state.done)
        if state.error is not None:
            raise self.scrubbed(state.error)
        state.check_end()

    async def list_models(
        self, http: aiohttp.ClientSession, exchange: Exchange
    ) -> list[dict[str, Any]]:
        listing = await self.call_api(http, exchange, "GET", "/models")
        cards = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(cards, list):
            raise UpstreamFailed(f"Upstream '{self.name}' answered /models with no model list.")
        return [c for c in cards if isinstance(c, dict) and isinstance(c.get("id"), str)]


def _closer(resp: aiohttp.ClientResponse) -> Any:
    async def close() -> None:
        # A no-op once the relay released the connection after [DONE].
        resp.close()

    return close


def _let_go(resp: aiohttp.ClientResponse, done: bool) -> None:
    # After [DONE] the connection is clean and goes back to the pool; otherwise it is closed.
    if done:
        resp.release()
    else:
        resp.close()


class _RelayState:
    """What the relay must know to enforce the stream guarantees, and nothing more."""

    __slots__ = ("done", "error", "finished", "upstream")

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.done = False
        self.finished = False
        # Raised only after the events before it were passed on.
        self.error: ProxyError | None = None

    def flush(self, decoder: SSEDecoder) -> list[Any]:
        """The events left at the end of the body."""
        cut = decoder.partial_line
        events = decoder.flush()
        if cut and events and events[0].data != "[DONE]":
            # The body stopped inside a line: that event is cut short, and the client must
            # not get its broken JSON.
            raise UpstreamFailed(
                f"Upstream '{self.upstream}' closed the connection in the middle of the stream."
            )
        return events

    def check_end(self) -> None:
        """Raises the stream's terminal error, if it has one."""
        if self.error is not None:
            raise self.error
        if not self.finished:
            raise UpstreamFailed(
                f"Upstream '{self.upstream}' ended the stream without a finish_reason."
            )
        if not self.done:
            raise UpstreamFailed(f"Upstream '{self.upstream}' ended the stream without [DONE].")

    def pass_through(self, chunk: bytes) -> bytes | None:
        """The client's bytes for a read that holds only whole, plain events, as the upstream
        framed them; None when anything in it needs the decoder (call `frame` instead).

        Read at an event boundary, a model server's chunk is usually a run of
        `data: <one line of JSON>\\n\\n` events, and `frame` would give back exactly those
        bytes. Checking that takes a few scans of the chunk in C instead of a decode, an
        Event and an encode per event. Anything else (comments, other fields, CR line ends,
        multi-line data, empty data, an error event, invalid UTF-8, a [DONE] inside a value)
        takes the decoder's path, so the output never differs from `frame`'s.
        """
        if not chunk.endswith(_BOUNDARY) or b"\r" in chunk:
            return None
        # [DONE] ends the stream: it comes last in its read, and the writer writes its own.
        done = chunk.endswith(_DONE_EVENT) and (
            len(chunk) == _DONE_LEN or chunk[-_DONE_LEN - 2 : -_DONE_LEN] == _BOUNDARY
        )
        if done:
            chunk = chunk[:-_DONE_LEN]
            if not chunk:
                self.done = True
                return chunk
        if _PLAIN_EVENTS.fullmatch(chunk) is None:
            return None
        if not chunk.isascii():
            try:
                chunk.decode()
            except UnicodeDecodeError:
                return None  # the decoder replaces what is not UTF-8
        if not self.finished:
            # The finish chunk is usually the last event with a finish_reason: look there
            # first, and scan the whole read only when that one is null.
            last = chunk.rfind(b'"finish_reason"')
            if last >= 0 and (
                _FINISH_BYTES.match(chunk, last) is not None
                or _FINISH_BYTES.search(chunk, 0, last + 1) is not None
            ):
                self.finished = True
        self.done = done
        return chunk

    def _data(self, ev: Any) -> str | None:
        """An event's data when it is a chunk to pass on; None to skip it or stop."""
        if self.done or self.error is not None:
            return None
        data: str = ev.data
        if data == "[DONE]":
            self.done = True
            return None
        if ev.event == "error" or data.startswith('{"error"'):
            self.error = stream_error(self.upstream, data)
            return None
        if not data:
            return None
        if not (data.startswith("{") and data.rstrip().endswith("}")):
            # The shape of a JSON object, checked without parsing: a client SDK would raise
            # a decode error on anything else instead of reporting an API error.
            self.error = UpstreamFailed(
                f"Upstream '{self.upstream}' sent a stream event that is not a JSON object."
            )
            return None
        if not self.finished and _FINISH.search(data) is not None:
            self.finished = True
        return data

    def frame(self, events: list[Any]) -> bytes:
        out: list[bytes] = []
        for ev in events:
            data = self._data(ev)
            if data is None:
                if self.done or self.error is not None:
                    break
                continue
            payload = data.encode()
            if b"\n" in payload:
                # A multi-line data event: each line needs its own `data:` field, or the
                # client reads the lines after the first as fields of their own.
                payload = payload.replace(b"\n", b"\ndata: ")
            out.append(b"data: " + payload + b"\n\n")
        return b"".join(out)

    def decode(self, events: list[Any]) -> list[Out]:
        out: list[Out] = []
        for ev in events:
            data = self._data(ev)
            if data is None:
                if self.done or self.error is not None:
                    break
                continue
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError:
                chunk = None
            if not isinstance(chunk, dict) or not isinstance(chunk.get("choices"), list):
                self.error = UpstreamFailed(
                    f"Upstream '{self.upstream}' sent a stream event that is not a chat "
                    "completion chunk."
                )
                break
            typed: ChatChunk = chunk  # type: ignore[assignment]
            out.append(typed)
        return out


def stream_error(upstream: str, data: str) -> ProxyError:
    message = ""
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict):
        err = parsed.get("error", parsed)
        if isinstance(err, dict):
            message = str(err.get("message") or "")
        elif isinstance(err, str):
            message = err
    detail = f": {message[:500]}" if message else ""
    return UpstreamFailed(f"Upstream '{upstream}' reported an error mid-stream{detail}")
