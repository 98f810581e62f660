"""The `custom` kind: any agent HTTP API, described in routes.yaml alone (docs/custom.md).

One chat turn:
1. The placeholder values (custom_values.py): the new turn, the session keys derived from
   the caller's key and session hint (proxy/session_keys.py), the route's model.
2. One turn per session at a time: the session lock, shared with the letta kind and the
   `--workers` of a host, is held from before the session is resolved to the end of the
   answer (agent servers interleave, refuse or starve concurrent turns of one session).
   A turn that waits for it gives its concurrency slot back meanwhile.
3. The session id: derived from the session key (`session.id`), or, where the block says the
   server issues ids (`lookup` or `from_response`), the one remembered for this key, else the
   lookup's, else none (the server starts a session). `session.create` runs first where the
   server needs it, once per key and `cache` period.
4. The chat call, by `mode`. A streamed call is read event by event (custom_reader.py);
   a sync call, and a streamed call answered with one JSON document (`sse` framing), is
   read whole with the `sync` mapping (custom_sync.py). Sync clients get the accumulated
   chunks, streaming clients the chunks as they come (one batch for a sync call), with
   keep-alives while the upstream is silent. Every wait is under the answer's Deadlines.
5. A 404 on a remembered or looked-up session id means the server refused the turn before
   running it: the id is forgotten and the turn sent once more without it (a created
   session is created again).
6. At the end, an id the answer reports (`from_response`) is remembered; a turn that the
   client left while the upstream was still answering is cancelled with the block's `cancel`
   request, in the background with a 2 s budget, never a turn whose answer had ended.

The session's own requests, the cancel, the model listing and the probe are in
custom_calls.py, which this class extends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Mapping
from typing import Any, ClassVar

import aiohttp
import orjson
from multidict import CIMultiDict

from proxy.chunks import KEEP_ALIVE, Out
from proxy.config import ModelSpec
from proxy.errors import UpstreamFailed, UpstreamTimeout
from proxy.failover import SessionSlot
from proxy.openai_types import ChunkFactory, accumulate
from proxy.session_keys import SessionKeys, session_keys
from proxy.upstreams.base import Answer, ByteStream, Call, ChunkStream, hold_answer
from proxy.upstreams.custom_calls import (
    TIMED_OUT,
    CustomCalls,
    TurnInFlight,
    left_because,
    let_go,
)
from proxy.upstreams.custom_extract import is_json_content_type
from proxy.upstreams.custom_options import CustomRoute
from proxy.upstreams.custom_reader import StreamReader
from proxy.upstreams.custom_requests import RequestSpec
from proxy.upstreams.custom_sync import SyncReader
from proxy.upstreams.custom_turn import ClientSystem, refuse_unserved
from proxy.upstreams.custom_values import request_values, session_id
from proxy.upstreams.deadlines import Deadlines
from proxy.upstreams.forwarding import forward
from proxy.upstreams.http_errors import MAX_ANSWER, answer_too_large

log = logging.getLogger(__name__)


class Custom(CustomCalls):
    kind: ClassVar[str] = "custom"

    def _headers(self, call: Call) -> CIMultiDict[str]:
        names = self.spec.forward_headers
        if not names:
            return self.headers
        headers = self.headers.copy()
        forward(headers, call.headers, names)
        return headers

    # -- a chat turn -----------------------------------------------------------------------

    async def complete(self, call: Call, http: aiohttp.ClientSession) -> Answer:
        started = time.perf_counter()
        turn = await self._open(call, http, keepalive=None)
        upstream_ms = (time.perf_counter() - started) * 1000.0
        batches = self._batches(turn, call, include_usage=True)
        try:
            chunks = await hold_answer(batches, self._label)
        finally:
            await batches.aclose()
            await self._close(turn, http)
        return Answer(
            accumulate(chunks),
            headers=self.relayable_headers(turn.resp.raw_headers),
            upstream_ms=upstream_ms,
            chunks=chunks,
        )

    async def open_stream(
        self, call: Call, http: aiohttp.ClientSession
    ) -> ChunkStream | ByteStream:
        started = time.perf_counter()
        turn = await self._open(call, http, keepalive=self.spec.keepalive)
        upstream_ms = (time.perf_counter() - started) * 1000.0
        batches = self._batches(turn, call, include_usage=call.include_usage)

        async def close() -> None:
            try:
                await batches.aclose()
            finally:
                await self._close(turn, http)

        return ChunkStream(
            batches, on_close=close, upstream_ms=upstream_ms,
            headers=self.relayable_headers(turn.resp.raw_headers),
        )

    async def _open(
        self, call: Call, http: aiohttp.ClientSession, keepalive: float | None
    ) -> TurnInFlight:
        """The upstream's accepted answer to the turn, with the session lock held."""
        refuse_unserved(call.body)
        spec = self.custom
        streams = spec.upstream_streams(call.stream)
        without_hint = spec.session.without_hint
        keys = session_keys(call.key_id, call.session_hint, without_hint)
        values = request_values(
            spec, call.body["messages"], session=keys, key_id=call.key_id,
            model=call.upstream_model, stream=streams, request_id=call.exchange.request_id,
            user=call.body.get("user"), client_system=_client_system(call.route),
        )
        derived = (None if keys.stateless or self._issued
                   else session_id(spec, values, keys, stream=streams))
        # A random key (no hint, `new` or `stateless`) is no other request's session.
        lasting = call.session_hint is not None or without_hint == "per_key"
        lock_key = f"{self.base}|{derived or keys.key}" if lasting else None
        locks = self.state.session_locks
        if lock_key is not None:
            await locks.acquire(lock_key, call.route.session.busy_timeout, SessionSlot(self))
        try:
            resp, deadlines = await self._send_turn(
                call, http, keys, values, derived, streams, lasting
            )
        except BaseException:
            if lock_key is not None:
                locks.release(lock_key)
            raise
        deadlines.set_keepalive(keepalive)
        streamed = streams and not (
            spec.stream is not None and spec.stream.framing == "sse"
            and is_json_content_type(resp.headers.get("Content-Type"))
        )
        turn = TurnInFlight(values, keys.key if lasting else None, lock_key, resp, deadlines,
                            streamed, call.exchange)
        if not streamed and spec.sync is None:
            # A whole answer came, only not one this block can read: nothing to cancel.
            turn.finished = True
            await self._close(turn, http)
            raise UpstreamFailed(
                f"{self._label} answered a streaming request with one JSON document, and its "
                "block has no `sync` mapping to read it with."
            )
        return turn

    async def _send_turn(
        self,
        call: Call,
        http: aiohttp.ClientSession,
        keys: SessionKeys,
        values: dict[str, Any],
        derived: str | None,
        streams: bool,
        lasting: bool,
    ) -> tuple[aiohttp.ClientResponse, Deadlines]:
        """The chat call, accepted (2xx); sent a second time after a 404 on a remembered id.
        A session key that is not `lasting` (random) has nothing to remember or look up."""
        spec = self.custom
        request = spec.call(stream=streams, stateless=keys.stateless)
        headers = self._headers(call)
        exchange = call.exchange
        for retry in (False, True):
            remembered = False
            if keys.stateless:
                values["session.id"] = None
            elif self._issued:
                found = None
                if lasting and not retry:
                    found = self._sessions.get(keys.key)
                    if found is None and spec.session.lookup is not None:
                        found = await self._lookup(http, exchange, values)
                remembered = found is not None
                values["session.id"] = found
            else:
                values["session.id"] = derived
                if spec.session.create is not None:
                    remembered = await self._ensure_session(
                        http, exchange, keys.key if lasting else None, values, retry
                    )
            deadlines = self.deadlines(exchange)
            try:
                resp = await self._post(http, request, values, headers, deadlines)
                if resp.status < 300:
                    return resp, deadlines
                err = await self._refused(resp)
            except BaseException:
                deadlines.close()
                raise
            deadlines.close()
            if resp.status == 404 and remembered and not retry:
                self._sessions.drop(keys.key)
                log.info("upstream %s: a remembered session was not found; sending the turn "
                         "again without it", self.name)
                continue
            # The upstream had the turn: it may have stored it before it failed.
            err.delivered = True
            raise err
        raise AssertionError("unreachable")

    async def _post(
        self,
        http: aiohttp.ClientSession,
        request: RequestSpec,
        values: Mapping[str, Any],
        headers: CIMultiDict[str],
        deadlines: Deadlines,
    ) -> aiohttp.ClientResponse:
        url = self._url(request.target(values))
        body = request.render_body(values)
        data = None if body is None else orjson.dumps(body)
        try:
            return await deadlines.answer(
                self.send(http, request.method, url, data=data, headers=headers)
            )
        except BaseException as exc:
            raise self.turn_failure(exc) from None

    async def _batches(
        self, turn: TurnInFlight, call: Call, *, include_usage: bool
    ) -> AsyncGenerator[list[Out], None]:
        """What each read of the answer gives; raises the answer's terminal error.

        Every byte read is the upstream's activity (LangGraph's heartbeats, `/runs/wait`'s
        newlines, Flowise's `message:` lines), so a long silence before the first token
        trips neither first_event nor idle as long as the server says it is alive.
        """
        factory = ChunkFactory(call.client_model)
        show_reasoning = "reasoning" in call.route.show
        deadlines = turn.deadlines
        read = deadlines.read
        content = turn.resp.content
        reader: StreamReader | None = None
        try:
            if not turn.streamed:
                parts: list[bytes] = []
                size = 0
                while True:
                    data = await read(content)
                    if data is None:
                        yield [KEEP_ALIVE]
                        continue
                    if not data:
                        break
                    size += len(data)
                    if size > MAX_ANSWER:
                        raise answer_too_large(self._label)
                    parts.append(data)
                turn.at_eof = turn.finished = True
                sync = SyncReader(self.custom, factory, show_reasoning=show_reasoning,
                                  include_usage=include_usage, label=self._label)
                # Leading keep-alive newlines (LangGraph `/runs/wait`) are JSON whitespace.
                chunks = sync.read(b"".join(parts))
                turn.session_id = sync.session_id
                deadlines.sent()
                yield list(chunks)
                return
            reader = turn.reader = StreamReader(
                self.custom, factory, show_reasoning=show_reasoning,
                include_usage=include_usage, label=self._label,
            )
            while not reader.done:
                data = await read(content)
                if data is None:
                    yield [KEEP_ALIVE]
                    continue
                if not data:
                    turn.at_eof = True
                    break
                out = reader.feed(data)
                if out:
                    deadlines.sent()
                    yield out
            turn.finished = True
            while out := reader.finish():
                yield out
        except BaseException as exc:
            if reader is not None and reader.done:
                # An error event, or a stream that cannot be read: the answer is over.
                turn.finished = True
            elif isinstance(exc, UpstreamTimeout):
                turn.cause = TIMED_OUT
            raise self.failure(
                exc, answered=True, what="stream" if turn.streamed else "answer"
            ) from None

    async def _close(self, turn: TurnInFlight, http: aiohttp.ClientSession) -> None:
        if turn.closed:
            return
        turn.closed = True
        turn.deadlines.close()
        reported = turn.reader.session_id if turn.reader is not None else turn.session_id
        if reported is not None and self._issued and turn.remember is not None:
            # Before the lock is let go, so the session's next turn finds it.
            self._sessions.put(turn.remember, reported)
        if turn.finished or self.custom.cancel is None:
            if turn.lock_key is not None:
                self.state.session_locks.release(turn.lock_key)
            let_go(turn)
            return
        # The cancel releases the lock when it is done, so the session's next turn never
        # reaches the upstream while this one still runs there.
        if turn.cause != TIMED_OUT:
            turn.cause = left_because(turn.exchange)
        self.state.spawn(self._cancel(turn, http), name=f"custom-cancel-{self.name}")


def _client_system(route: ModelSpec) -> ClientSystem:
    options = route.options
    if isinstance(options, CustomRoute):
        return options.client_system
    return route.client_system


