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

import asyncio
import time
from collections.abc import AsyncGenerator
from typing import Any, ClassVar

import aiohttp
import orjson
from multidict import CIMultiDict

from proxy.chunks import KEEP_ALIVE, Out
from proxy.errors import InvalidRequest, UpstreamFailed
from proxy.exchange import Exchange
from proxy.openai_types import ChatCompletion
from proxy.session_keys import session_key
from proxy.sse import KEEPALIVE as _KEEPALIVE
from proxy.sse import SSEDecoder
from proxy.upstreams.base import Answer, ByteStream, Call, ChunkStream
from proxy.upstreams.bulk_read import read_any
from proxy.upstreams.deadlines import Deadlines
from proxy.upstreams.forwarding import forward
from proxy.upstreams.http import HttpUpstream, is_event_stream, let_go
from proxy.upstreams.http_errors import read_answer
from proxy.upstreams.openai_native import native_events
from proxy.upstreams.openai_options import OpenAIOptions
from proxy.upstreams.openai_relay import RelayState, reported_error


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
        forward(headers, call.headers, self._forward)
        return headers

    def _payload(self, call: Call) -> bytes:
        body = call.body
        if call.upstream_model is not None and body.get("model") != call.upstream_model:
            body = {**body, "model": call.upstream_model}
        try:
            return orjson.dumps(body)
        except orjson.JSONEncodeError:
            # Deeper than orjson writes once translated (proxy/json_body.py leaves room for
            # it): the request's fault, never counted against the upstream's circuit.
            raise InvalidRequest(
                "The request is nested too deeply to be forwarded to the upstream."
            ) from None

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
        return self._object(data, what), data, self.relayable_headers(resp.raw_headers), upstream_ms

    def _object(self, data: bytes, what: str) -> dict[str, Any]:
        try:
            parsed = orjson.loads(data)
        except orjson.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise UpstreamFailed(f"Upstream '{self.name}' answered with a body that is not {what}.")
        return parsed

    async def complete(self, call: Call, http: aiohttp.ClientSession) -> Answer:
        # `_json_answer` written out: every sync chat request's path, one coroutine layer
        # less at each of its suspensions.
        started = time.perf_counter()
        deadlines = self.deadlines(call.exchange)
        try:
            resp, data = await deadlines.answer(
                self._fetch(call, http, self.chat_url, self._payload(call))
            )
        except BaseException as exc:
            raise self.failure(exc, answered=False) from None
        finally:
            deadlines.close()
        upstream_ms = (time.perf_counter() - started) * 1000.0
        parsed = self._object(data, "a chat completion")
        headers = self.relayable_headers(resp.raw_headers)
        if parsed.get("error") is not None:
            # A 200 that reports an error (OpenRouter's, beside the choices it cut short).
            raise self.scrubbed(reported_error(self.name, parsed, "in its answer"))
        if not isinstance(parsed.get("choices"), list):
            raise UpstreamFailed(
                f"Upstream '{self.name}' answered with a body that is not a chat completion."
            )
        completion: ChatCompletion = parsed  # type: ignore[assignment]
        return Answer(completion, headers, upstream_ms, data)

    async def respond(self, call: Call, http: aiohttp.ClientSession) -> Answer:
        parsed, data, headers, upstream_ms = await self._json_answer(
            call, http, self.responses_url, self._responses_payload(call), "a response object"
        )
        if not isinstance(parsed.get("output"), list):
            # Not even a failed response (which lists its output): no client could read it.
            if parsed.get("error") is not None:  # a 200 that reports an error (OpenRouter's)
                raise self.scrubbed(reported_error(self.name, parsed, "in its answer"))
            raise UpstreamFailed(
                f"Upstream '{self.name}' answered with a body that is not a response object."
            )
        return Answer(None, headers, upstream_ms, data)

    async def embed(self, call: Call, http: aiohttp.ClientSession) -> Answer:
        parsed, data, headers, upstream_ms = await self._json_answer(
            call, http, self.embeddings_url, self._payload(call), "an embeddings list"
        )
        if parsed.get("error") is not None:  # a 200 that reports an error (OpenRouter's)
            raise self.scrubbed(reported_error(self.name, parsed, "in its answer"))
        if not isinstance(parsed.get("data"), list):
            raise UpstreamFailed(
                f"Upstream '{self.name}' answered with a body that is not an embeddings list."
            )
        if "model" in parsed and parsed["model"] != call.client_model:
            # The client's name for the model, as in every other answer of the proxy.
            parsed["model"] = call.client_model
            try:
                data = orjson.dumps(parsed)
            except orjson.JSONEncodeError:  # nested deeper than orjson writes (it reads deeper)
                msg = f"Upstream '{self.name}' answered JSON nested too deeply."
                raise UpstreamFailed(msg) from None
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
        if not is_event_stream(resp.headers.get("Content-Type")):
            resp.close()
            deadlines.close()
            # Quoted as JSON and cut short: the upstream's text, in the client's message.
            kind = orjson.dumps(resp.headers.get("Content-Type", "missing")[:100]).decode()
            raise UpstreamFailed(
                f"Upstream '{self.name}' answered a streaming request without an event stream "
                f"(Content-Type {kind})."
            )
        deadlines.set_keepalive(self.spec.keepalive)
        return resp, deadlines, (time.perf_counter() - started) * 1000.0

    async def open_responses(self, call: Call, http: aiohttp.ClientSession) -> ByteStream:
        resp, deadlines, upstream_ms = await self._accepted_stream(
            call, http, self.responses_url, self._responses_payload(call)
        )
        return ByteStream(
            native_events(self, resp, deadlines), on_close=_closer(resp),
            deadlines=deadlines, headers=self.relayable_headers(resp.raw_headers),
            upstream_ms=upstream_ms,
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
        state = RelayState(self.name)
        # aiohttp's readany(), not read_any: at 64 streams read_any gained the byte relay no
        # throughput and doubled its p90 latency (40-56 -> 94-116 ms in three of four
        # alternating runs; docs/performance.md). Why is not known.
        readany = resp.content.readany
        # Per read, what the decoder need not be asked: whether it was ever fed (else it
        # holds no part of an event), and whether it was told the stream began.
        clean = True
        passed = False
        max_line = decoder.max_line
        try:
            while not state.done:
                # Deadlines.read, inline (its protocol): once per event.
                deadlines.waiting = True
                try:
                    chunk = await readany()
                except asyncio.CancelledError as exc:
                    deadlines.interrupted(exc)
                    yield _KEEPALIVE
                    continue
                # Whole events, which the relay may take without the decoder.
                whole = (clean or decoder.at_boundary) and len(chunk) <= max_line
                if whole:
                    template = state.template
                    if template is not None and template.text_at(chunk) is not None:
                        # One token event of the stream's template (RelayState.relay_read's
                        # first check, taken here): what a model server sends nearly every
                        # read.
                        deadlines.relayed()
                        yield chunk
                        continue
                deadlines.arrived()
                if not chunk:
                    out = state.frame(state.flush(decoder))
                    if out:
                        yield out
                    break
                comments = decoder.comments
                plain = state.learn_through(chunk) if whole else None
                if plain is not None:
                    if not passed:
                        decoder.passed_over()
                        passed = True
                    out = plain
                else:
                    clean = False
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
            let_go(resp, state.done)
        self._check_end(state)

    async def _decode(
        self, resp: aiohttp.ClientResponse, deadlines: Deadlines
    ) -> AsyncGenerator[list[Out], None]:
        decoder = SSEDecoder()
        state = RelayState(self.name)
        content = resp.content
        max_line = decoder.max_line
        # Whether the decoder holds no part of an event: asked of it only after it was fed.
        boundary = True
        try:
            while not state.done:
                # Deadlines.read, inline (its protocol): once per event.
                deadlines.waiting = True
                try:
                    chunk = await read_any(content)
                except asyncio.CancelledError as exc:
                    deadlines.interrupted(exc)
                    yield [KEEP_ALIVE]
                    continue
                template = state.template
                if (
                    boundary and template is not None and len(chunk) <= max_line
                    and (text := template.text_at(chunk)) is not None
                ):
                    # One token event of the stream's template (RelayState.decode_read's
                    # first case, taken here): what a model server sends nearly every read.
                    deadlines.relayed()
                    yield [template.texts([text])]
                    continue
                deadlines.arrived()
                comments = decoder.comments
                out = state.decode_read(decoder, chunk)
                boundary = decoder.at_boundary
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
            let_go(resp, state.done)
        self._check_end(state)

    def _check_end(self, state: RelayState) -> None:
        """Raises the relayed stream's terminal error, if it has one, scrubbed."""
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
        # An empty id would be listed as the bare prefix, which no request can name.
        return [c for c in cards
                if isinstance(c, dict) and isinstance(c.get("id"), str) and c["id"]]


def _closer(resp: aiohttp.ClientResponse) -> Any:
    async def close() -> None:
        # A no-op once the relay released the connection after [DONE].
        resp.close()

    return close

