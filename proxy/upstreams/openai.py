"""The `openai` kind: any server that speaks `/v1/chat/completions` (vLLM, LM Studio, Ollama...).

Streams are relayed event by event without parsing each chunk's JSON: the proxy only frames
the SSE stream (so a truncated stream is noticed) and looks for a finish_reason with a regex.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
from multidict import CIMultiDict
from yarl import URL

from proxy.config import UpstreamSpec
from proxy.errors import ProxyError, UpstreamFailed, UpstreamTimeout
from proxy.sse import SSEDecoder, SSEError, encode_comment
from proxy.upstreams.base import Call, EventStream, Upstream
from proxy.upstreams.http_errors import (
    connection_error,
    error_from_response,
    read_answer,
    read_error_body,
)
from proxy.upstreams.watch import Watch

# A finish chunk carries a string finish_reason; every other chunk has null or nothing.
_FINISH = re.compile(r'"finish_reason"\s*:\s*"')
_FINISH_BYTES = re.compile(rb'"finish_reason"\s*:\s*"')
_BOUNDARY = b"\n\n"
# Whole events, each a single `data:` line holding a JSON object that is not an error (the
# caller rules out CR, which SSE also reads as a line end). `[^\n]*` rather than a class of
# two characters: the regex engine scans a single excluded byte several times faster, and a
# read that does not match fails in linear time.
_PLAIN_EVENTS = re.compile(rb'(?:data: \{(?!"error")[^\n]*\n\n)+')
_DONE_EVENT = b"data: [DONE]\n\n"
_DONE_LEN = len(_DONE_EVENT)
_KEEPALIVE = encode_comment()

# Response headers the proxy sets itself, or that describe one hop only (RFC 9110 §7.6.1).
_NOT_RELAYED = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
        "trailer", "trailers", "transfer-encoding", "upgrade", "content-length",
        "content-type", "content-encoding", "date", "server", "x-request-id",
        "server-timing", "set-cookie", "cache-control", "x-accel-buffering",
    }
)


def relayable_headers(raw: tuple[tuple[bytes, bytes], ...]) -> list[tuple[str, str]]:
    """The upstream's response headers that go on to the client, from the raw header lines
    (the names' verdicts cached: upstreams send the same few names every time)."""
    out: list[tuple[str, str]] = []
    for name, value in raw:
        relayed = _VERDICTS.get(name, _UNSEEN)
        if relayed is _UNSEEN:
            relayed = _verdict(name)
        if relayed is not None:
            # As aiohttp decodes header bytes, so what is relayed is what the client sent.
            out.append((relayed, value.decode("utf-8", "surrogateescape")))
    return out


# Raw header name: its str when relayed, None when not. Bounded: names come from upstreams.
_VERDICTS: dict[bytes, str | None] = {}
_VERDICTS_MAX = 512
_UNSEEN = ""


def _verdict(name: bytes) -> str | None:
    text = name.decode("utf-8", "surrogateescape")
    relayed = None if text.lower() in _NOT_RELAYED else text
    if len(_VERDICTS) < _VERDICTS_MAX:
        _VERDICTS[name] = relayed
    return relayed


class OpenAI(Upstream):
    kind = "openai"

    def __init__(self, spec: UpstreamSpec) -> None:
        super().__init__(spec)
        assert spec.url is not None
        self.chat_url = URL(spec.url + "/chat/completions")
        self.models_url = URL(spec.url + "/models")
        headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        if spec.api_key:
            headers["Authorization"] = f"Bearer {spec.api_key}"
        headers.update(spec.headers)
        # Built once per route table, in the type aiohttp would convert a dict to per request.
        self._headers: CIMultiDict[str] = CIMultiDict(headers)
        self._forward = spec.forward_headers
        t = spec.timeouts
        self._first_event = t.first_event
        self._timeout = aiohttp.ClientTimeout(total=t.total, sock_connect=t.connect)

    def _request_headers(self, call: Call) -> CIMultiDict[str]:
        if not self._forward:
            return self._headers
        headers = self._headers.copy()
        for name in self._forward:
            value = call.headers.get(name)
            if value is not None:
                headers[name] = value
        return headers

    def _payload(self, call: Call) -> bytes:
        body = call.body
        if call.upstream_model is not None and body.get("model") != call.upstream_model:
            body = {**body, "model": call.upstream_model}
        return orjson.dumps(body)

    def _timed_out(self, what: str, seconds: float | None) -> UpstreamTimeout:
        return UpstreamTimeout(
            f"Upstream '{self.name}' sent nothing within {seconds:g} s (timeouts.{what})."
        )

    def _unanswered(self, exc: TimeoutError | aiohttp.ClientError) -> ProxyError:
        """What a failure of the request itself (not of reading its answer) means."""
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return UpstreamTimeout(
                f"Upstream '{self.name}' did not accept a connection within "
                f"{self.spec.timeouts.connect:g} s (timeouts.connect)."
            )
        if isinstance(exc, TimeoutError):
            return _total_exceeded(self.name, self.spec.timeouts.total)
        return connection_error(self.name, exc)

    def _watch(self, call: Call) -> Watch:
        """One watch for the whole answer, armed and waiting for the upstream: first_event
        until the answer (a sync one whole), then a stream's deadlines and keep-alives. A
        Watch, not asyncio.timeout: it costs no timer of its own while the deadline is far
        (see proxy/upstreams/watch.py)."""
        watch = Watch(self.name, self.spec.timeouts, None, task=call.task)
        watch.arm()
        watch.waiting = True
        return watch

    def _post(
        self, call: Call, http: aiohttp.ClientSession
    ) -> Awaitable[aiohttp.ClientResponse]:
        # aiohttp's own awaitable, returned unawaited: the caller awaits it in place, since a
        # helper coroutine would be one more layer to pass at each suspension of the request.
        return http.post(
            self.chat_url,
            data=self._payload(call),
            headers=self._request_headers(call),
            timeout=self._timeout,
        )

    def _interrupted(
        self, exc: BaseException, watch: Watch, resp: aiohttp.ClientResponse | None
    ) -> BaseException:
        """What an exception out of sending a request (`resp` None) or reading its answer
        means to the client (`exc` itself when it already says it, as the proxy's own errors
        and a client's cancellation do); the watch is disarmed."""
        watch.waiting = False
        expired = isinstance(exc, asyncio.CancelledError) and watch.expired() is not None
        watch.disarm()
        if expired:
            return self._timed_out("first_event", self._first_event)
        if resp is None and isinstance(exc, (TimeoutError, aiohttp.ClientError)):
            return self._unanswered(exc)
        if isinstance(exc, TimeoutError):
            return _total_exceeded(self.name, self.spec.timeouts.total)
        if isinstance(exc, aiohttp.ClientError):
            # An answer under way broke: cut short, or a Content-Encoding it does not have.
            return UpstreamFailed(
                f"Upstream '{self.name}' closed the connection in the middle of the answer."
            )
        return exc

    async def complete(self, call: Call, http: aiohttp.ClientSession) -> bytes:
        started = time.perf_counter()
        watch = self._watch(call)
        resp = None
        try:
            resp = await self._post(call, http)
            try:
                if resp.status >= 300:
                    raise error_from_response(
                        self.name, resp.status, await read_error_body(resp), resp.headers
                    )
                data = await read_answer(resp, self.name)
            finally:
                resp.release()
        except BaseException as exc:
            raise self._interrupted(exc, watch, resp) from None
        watch.waiting = False
        watch.disarm()
        call.mark_answered(started)
        try:
            parsed = orjson.loads(data)
        except orjson.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict) or not isinstance(parsed.get("choices"), list):
            raise UpstreamFailed(
                f"Upstream '{self.name}' answered with a body that is not a chat completion."
            )
        call.response_headers = relayable_headers(resp.raw_headers)
        return data

    async def open_stream(self, call: Call, http: aiohttp.ClientSession) -> EventStream:
        started = time.perf_counter()
        resp = None
        watch = self._watch(call)
        try:
            resp = await self._post(call, http)
            if resp.status >= 300:
                try:
                    body = await read_error_body(resp)
                finally:
                    resp.release()
                raise error_from_response(self.name, resp.status, body, resp.headers)
        except BaseException as exc:
            raise self._interrupted(exc, watch, resp) from None
        watch.waiting = False
        if not resp.headers.get("Content-Type", "").startswith("text/event-stream"):
            resp.close()
            watch.disarm()
            raise UpstreamFailed(
                f"Upstream '{self.name}' answered a streaming request without an event stream "
                f"(Content-Type {resp.headers.get('Content-Type', 'missing')!r})."
            )
        call.mark_answered(started)
        call.response_headers = relayable_headers(resp.raw_headers)
        watch.set_keepalive(self.spec.keepalive)
        return EventStream(self._relay(resp, watch), _closer(resp), watch)

    async def _relay(
        self, resp: aiohttp.ClientResponse, watch: Watch
    ) -> AsyncGenerator[bytes, None]:
        decoder = SSEDecoder()
        state = _RelayState()
        content = resp.content
        read = watch.read
        try:
            while not state.done:
                chunk = await read(content)
                if chunk is None:
                    yield _KEEPALIVE
                    continue
                if not chunk:
                    cut = decoder.partial_line
                    events = decoder.flush()
                    if cut and events and events[0].data != "[DONE]":
                        # The body stopped inside a line: that event is cut short, and the
                        # client must not get its broken JSON.
                        raise UpstreamFailed(
                            f"Upstream '{self.name}' closed the connection in the middle of "
                            "the stream."
                        )
                    out = state.frame(self.name, events)
                    if out:
                        yield out
                    if state.error is not None:
                        raise state.error
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
                    out = state.frame(self.name, decoder.feed(chunk))
                if out:
                    watch.sent()
                    yield out
                elif decoder.comments != comments:
                    # Pass the upstream's own keep-alives on, so the client's idle timer resets.
                    watch.sent()
                    yield _KEEPALIVE
                if state.error is not None:
                    raise state.error
        except SSEError as exc:
            raise UpstreamFailed(f"Upstream '{self.name}' sent a malformed stream: {exc}") from None
        except TimeoutError:
            raise _total_exceeded(self.name, self.spec.timeouts.total) from None
        except aiohttp.ClientError:
            raise UpstreamFailed(
                f"Upstream '{self.name}' closed the connection in the middle of the stream."
            ) from None
        finally:
            if state.done:
                resp.release()
            else:
                resp.close()
        if not state.finished:
            raise UpstreamFailed(
                f"Upstream '{self.name}' ended the stream without a finish_reason."
            )
        if not state.done:
            raise UpstreamFailed(f"Upstream '{self.name}' ended the stream without [DONE].")

    async def list_models(self, http: aiohttp.ClientSession) -> list[dict[str, Any]]:
        try:
            async with asyncio.timeout(self._first_event):
                async with http.get(
                    self.models_url, headers=self._headers, timeout=self._timeout
                ) as resp:
                    if resp.status >= 300:
                        raise error_from_response(
                            self.name, resp.status, await read_error_body(resp), resp.headers
                        )
                    data = await read_answer(resp, self.name)
        except TimeoutError:
            raise self._timed_out("first_event", self._first_event) from None
        except aiohttp.ClientError as exc:
            raise connection_error(self.name, exc) from None
        try:
            listing = orjson.loads(data)
        except orjson.JSONDecodeError:
            listing = None
        cards = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(cards, list):
            raise UpstreamFailed(f"Upstream '{self.name}' answered /models with no model list.")
        return [c for c in cards if isinstance(c, dict) and isinstance(c.get("id"), str)]


def _total_exceeded(upstream: str, total: float | None) -> UpstreamTimeout:
    limit = f"within {total:g} s " if total is not None else ""
    return UpstreamTimeout(f"Upstream '{upstream}' did not finish {limit}(timeouts.total).")


def _closer(resp: aiohttp.ClientResponse) -> Callable[[], Awaitable[None]]:
    async def close() -> None:
        # A no-op once the relay released the connection after [DONE].
        resp.close()

    return close


class _RelayState:
    """What the relay must know to enforce the stream guarantees, and nothing more."""

    __slots__ = ("done", "error", "finished")

    def __init__(self) -> None:
        self.done = False
        self.finished = False
        # Raised only after the events before it were passed on.
        self.error: ProxyError | None = None

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
        # [DONE] ends the stream: it comes last in its read, and the handler writes its own.
        done = chunk.endswith(_DONE_EVENT) and (
            len(chunk) == _DONE_LEN or chunk[-_DONE_LEN - 2 : -_DONE_LEN] == _BOUNDARY
        )
        if done:
            chunk = chunk[:-_DONE_LEN]
            if not chunk:
                self.done = True
                return chunk
        # Every event one `data:` line holding a JSON object that is not an error (so not
        # empty, not [DONE]), and nothing else: one pass of the regex engine over the read,
        # about twice as fast as counting line ends and boundaries separately.
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

    def frame(self, upstream: str, events: list[Any]) -> bytes:
        out: list[bytes] = []
        for ev in events:
            if self.done or self.error is not None:
                break
            data: str = ev.data
            if data == "[DONE]":
                self.done = True
                break
            if ev.event == "error" or data.startswith('{"error"'):
                self.error = stream_error(upstream, data)
                break
            if not data:
                continue
            if not self.finished and _FINISH.search(data) is not None:
                self.finished = True
            payload = data.encode()
            if b"\n" in payload:
                # A multi-line data event: each line needs its own `data:` field, or the
                # client reads the lines after the first as fields of their own.
                payload = payload.replace(b"\n", b"\ndata: ")
            out.append(b"data: " + payload + b"\n\n")
        return b"".join(out)


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
