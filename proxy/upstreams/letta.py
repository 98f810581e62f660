"""The `letta` kind: Letta agents as OpenAI models, each caller's session a Letta conversation.

Every request, sync included, uses Letta's token stream, so a sync answer is exactly the
accumulated stream (Letta's own sync answer leaves out text written before a tool call).

Chaining (the Responses API): every result names the conversation that served the turn
(`session`, None for the agent's default thread). A call that continues one (`fork_from`)
forks it first (`POST /v1/conversations/{id}/fork`) and sends only the new turn to the fork,
so the forked conversation is never written again and every response id stays a fixed branch
point. A call that needs a continuable conversation (`new_conversation`) and has no session
hint gets a new conversation, not the agent's default thread, which has no id to continue.
Ids that Letta returns are checked against its documented shapes before they go into a URL
path: a hostile or broken server must not be able to point the proxy's requests, which carry
the Letta key, at another path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from typing import Any, ClassVar

import aiohttp
import orjson

from proxy.chunks import KEEP_ALIVE, Out
from proxy.config import ModelSpec
from proxy.errors import ProxyError, UpstreamFailed
from proxy.exchange import Exchange
from proxy.failover import SessionSlot
from proxy.openai_types import ChunkFactory, accumulate
from proxy.session_locks import busy
from proxy.sse import SSEError
from proxy.upstreams.base import Answer, ByteStream, Call, ChunkStream, hold_answer
from proxy.upstreams.deadlines import Deadlines
from proxy.upstreams.http import HttpUpstream, is_event_stream
from proxy.upstreams.http_errors import error_from_response, read_error_body
from proxy.upstreams.letta_directory import LettaDirectory
from proxy.upstreams.letta_request import (
    UPSTREAM_FAILED,
    LettaRun,
    cancel_cause,
    is_busy,
    letta_body,
    new_turn_start,
    refuse_unserved,
    session_summary,
    to_letta_messages,
)
from proxy.upstreams.letta_translator import LettaTranslator, shorten

log = logging.getLogger(__name__)

# Without it Letta takes the caller for a legacy client: it embeds every tool and memory
# block in agent listings and refuses `"streaming": true` with a 422.
STAINLESS = ("X-Stainless-Package-Version", "1.0.0")
CANCEL_TIMEOUT = 5.0
RUN_ID_WAIT = 2.0
# The most of a Letta error's `detail` that one log line holds.
DETAIL_LIMIT = 2000
PER_KEY_HINT = "\0per-key"
# Between two tries of a turn that Letta answered "conversation busy".
BUSY_FIRST_PAUSE = 0.05
BUSY_MAX_PAUSE = 1.0


class Letta(HttpUpstream):
    kind: ClassVar[str] = "letta"
    chains: ClassVar[bool] = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.directory = LettaDirectory(self)

    def extra_headers(self) -> dict[str, str]:
        return {STAINLESS[0]: STAINLESS[1]}

    async def agent_id(
        self, ref: str, http: aiohttp.ClientSession, exchange: Exchange, route: str, *,
        wildcard: bool,
    ) -> str:
        return await self.directory.agent_id(ref, http, exchange, route, wildcard=wildcard)

    async def list_models(
        self, http: aiohttp.ClientSession, exchange: Exchange
    ) -> list[dict[str, Any]]:
        return await self.directory.agent_cards(http, exchange)

    async def probe_route(
        self, route: ModelSpec, http: aiohttp.ClientSession, exchange: Exchange
    ) -> list[tuple[str, str]]:
        """The route's agent must resolve to exactly one agent of the server."""
        if route.agent is None:
            return []
        try:
            await self.agent_id(route.agent, http, exchange, route.name, wildcard=False)
        except ProxyError as exc:
            return [("agent", exc.message)]
        return []

    # -- a chat turn -----------------------------------------------------------------------

    async def _open(
        self, call: Call, http: aiohttp.ClientSession, include_usage: bool,
        keepalive: float | None,
    ) -> LettaRun:
        # Before the agent lookup: a refused request costs Letta nothing.
        refuse_unserved(call.body)
        route = call.route
        exchange = call.exchange
        messages = call.body["messages"]
        start = new_turn_start(messages)
        letta_messages = to_letta_messages(
            messages[start:], client_system=route.client_system, index_base=start
        )
        wildcard = route.wildcard_prefix is not None
        ref = call.upstream_model if wildcard else route.agent
        assert ref is not None
        route_name = call.client_model if wildcard else route.name
        agent = await self.agent_id(ref, http, exchange, route_name, wildcard=wildcard)
        try:
            conversation = await self._thread(call, agent, http)
        except ProxyError as refused:
            # An agent id is taken as it is (a name's is cached): Letta's 404 to a lookup or
            # creation of the agent's conversation is the agent that is not there.
            if refused.status != 404:
                raise
            raise self.directory.missing(route_name, ref, agent, None, wildcard=wildcard) from None
        lock_key = f"{self.base}|{agent}|{conversation or 'default'}"
        locks = self.state.session_locks
        # A turn that waits for the conversation gives its concurrency slot back meanwhile.
        await locks.acquire(lock_key, route.session.busy_timeout, SessionSlot(self))
        try:
            path = (
                f"/v1/conversations/{conversation}/messages"
                if conversation
                else f"/v1/agents/{agent}/messages"
            )
            resp, deadlines = await self._send_turn(
                http, path, letta_messages, exchange, route.session.busy_timeout
            )
            if resp.status >= 300:
                deadlines.close()
                err = await self.refused(resp)
                if resp.status == 404:
                    err = self.directory.missing(
                        route_name, ref, agent, conversation, wildcard=wildcard
                    )
                # Letta had the message: it may have stored it before it failed.
                err.delivered = True
                raise err
            if not is_event_stream(resp.headers.get("Content-Type")):
                # An error page or a JSON body is known to be no answer before the client's
                # stream is committed: a 502 now, not an error event after the role chunk.
                deadlines.close()
                resp.close()
                err = UpstreamFailed(
                    f"Upstream '{self.name}' answered the agent's turn without an event stream."
                )
                err.delivered = True
                raise err
        except BaseException:
            locks.release(lock_key)
            raise
        deadlines.set_keepalive(keepalive)
        translator = LettaTranslator(
            ChunkFactory(call.client_model),
            show_reasoning="reasoning" in route.show,
            show_tools="tools" in route.show,
            include_usage=include_usage,
        )
        return LettaRun(agent, lock_key, conversation, resp, translator, deadlines, exchange)

    async def _thread(self, call: Call, agent: str, http: aiohttp.ClientSession) -> str | None:
        """The conversation the turn runs in (None: the agent's default thread)."""
        exchange = call.exchange
        if call.fork_from is not None:
            # A continued response wins over any session hint: the id names its branch.
            return await self.directory.fork(call.fork_from, agent, http, exchange)
        hint = call.session_hint
        if hint is None and call.route.session.without_hint == "per_key":
            hint = PER_KEY_HINT
        if hint is not None:
            return await self.directory.conversation(
                agent, session_summary(call.key_id, hint), http, exchange
            )
        if call.new_conversation:
            return await self.directory.new_conversation(agent, http, exchange)
        return None

    async def _send_turn(
        self,
        http: aiohttp.ClientSession,
        path: str,
        letta_messages: list[dict[str, Any]],
        exchange: Exchange,
        busy_timeout: float,
    ) -> tuple[aiohttp.ClientResponse, Deadlines]:
        """The turn posted, waiting out Letta's own "conversation busy" answer like the local
        session lock: that 409 means Letta did not take the message (another request of the
        session runs, on another replica or from another client), so sending it again is
        safe. Any other answer is returned as it is, with the deadlines of its attempt."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + busy_timeout
        pause = BUSY_FIRST_PAUSE
        while True:
            deadlines = self.deadlines(exchange)
            try:
                resp = await self._post_turn(http, path, letta_messages, deadlines)
                if resp.status != 409:
                    return resp, deadlines
                body = await read_error_body(resp)
                resp.release()
            except BaseException:
                deadlines.close()
                raise
            deadlines.close()
            if not is_busy(body):
                err = error_from_response(self.name, 409, body, resp.headers)
                err.delivered = True
                raise self.scrubbed(err)
            left = give_up - loop.time()
            if left <= 0:
                raise busy(busy_timeout)
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, BUSY_MAX_PAUSE)

    async def _post_turn(
        self,
        http: aiohttp.ClientSession,
        path: str,
        letta_messages: list[dict[str, Any]],
        deadlines: Deadlines,
    ) -> aiohttp.ClientResponse:
        body = letta_body(letta_messages)
        try:
            return await deadlines.answer(
                self.send(http, "POST", self.base + path, data=_dumps(body))
            )
        except BaseException as exc:
            raise self.turn_failure(exc) from None

    async def _batches(self, run: LettaRun) -> AsyncGenerator[list[Out], None]:
        """What each upstream read translates to; raises the stream's terminal error.

        Letta's pings count as the upstream's activity (they say the run is alive), so a run
        that thinks for minutes before its first token trips neither first_event nor idle.
        """
        translator, decoder, deadlines = run.translator, run.decoder, run.deadlines
        content = run.resp.content
        read = deadlines.read
        yield list(translator.start())
        try:
            while not (run.saw_done or translator.error is not None):
                data = await read(content)
                if data is None:
                    yield [KEEP_ALIVE]
                    continue
                out: list[Out] = []
                if not data:
                    for event in decoder.flush():
                        run.saw_done = run.saw_done or event.data == "[DONE]"
                        out.extend(translator.feed(event))
                    if out:
                        yield out
                    break
                for event in decoder.feed(data):
                    if event.data == "[DONE]":
                        run.saw_done = True
                        break
                    out.extend(translator.feed(event))
                if out:
                    deadlines.sent()
                    yield out
        except BaseException as exc:
            run.cause = cancel_cause(exc, run.exchange)
            raise self.failure(exc, answered=True, what="stream") from None
        final = translator.finish()
        if final:
            yield list(final)
        if translator.error is not None:
            run.cause = UPSTREAM_FAILED
            if translator.error_detail:
                # Scrubbed before it is cut, so no part of a secret survives; one bounded line,
                # so Letta's text cannot forge log lines of its own nor flood the log.
                log.warning(
                    "Letta run %s failed: %s", translator.run_id,
                    shorten(self.scrub(translator.error_detail), DETAIL_LIMIT),
                )
            raise self.scrubbed(translator.error)

    async def _close(self, run: LettaRun, http: aiohttp.ClientSession) -> None:
        if run.closed:
            return
        run.closed = True
        run.deadlines.close()
        if run.finished_upstream:
            self.state.session_locks.release(run.lock_key)
            if run.saw_done:
                run.resp.release()
            else:
                run.resp.close()
            return
        # The client left (or the stream broke, or the proxy shuts down) while the agent was
        # still running: stop the run too, not just the socket. The run id arrives in Letta's
        # first ping; if it has not come yet, read on a little for it, in the background (the
        # app awaits it when it closes). The session lock is released only after, so that the
        # next message of the conversation never reaches Letta before this run's cancel.
        self.state.spawn(self._cancel(run, http), name=f"letta-cancel-{run.agent_id}")

    async def _cancel(self, run: LettaRun, http: aiohttp.ClientSession) -> None:
        task = asyncio.current_task()
        # A record of its own: the deadlines of the cancel call interrupt this task only.
        exchange = Exchange(0.0, "letta-cancel", task)
        try:
            if run.translator.run_id is None:
                await self._read_run_id(run)
            run_id = run.translator.run_id
            run.resp.close()
            if run_id is None:
                log.warning(
                    "could not cancel a Letta run of agent %s after %s: no run id",
                    run.agent_id, run.cause,
                )
                return
            async with asyncio.timeout(CANCEL_TIMEOUT):
                await self.call_api(
                    http, exchange, "POST", f"/v1/agents/{run.agent_id}/messages/cancel",
                    body={"run_ids": [run_id]},
                )
            log.info("cancelled Letta run %s after %s", run_id, run.cause)
        except (ProxyError, TimeoutError, RuntimeError) as exc:
            log.warning(
                "cancelling a Letta run of agent %s failed: %s", run.agent_id,
                self.scrub(str(exc)),
            )
        finally:
            run.resp.close()
            self.state.session_locks.release(run.lock_key)

    async def _read_run_id(self, run: LettaRun) -> None:
        try:
            async with asyncio.timeout(RUN_ID_WAIT):
                async for data in run.resp.content.iter_any():
                    for event in run.decoder.feed(data):
                        run.translator.feed(event)
                    if run.translator.run_id is not None or run.finished_upstream:
                        return
        except (TimeoutError, aiohttp.ClientError, SSEError):
            return

    async def complete(self, call: Call, http: aiohttp.ClientSession) -> Answer:
        started = time.perf_counter()
        run = await self._open(call, http, include_usage=True, keepalive=None)
        upstream_ms = (time.perf_counter() - started) * 1000.0
        batches = self._batches(run)
        try:
            chunks = await hold_answer(batches, f"Upstream '{self.name}'")
        finally:
            await batches.aclose()
            await self._close(run, http)
        return Answer(
            accumulate(chunks), upstream_ms=upstream_ms, session=run.conversation, chunks=chunks
        )

    async def open_stream(
        self, call: Call, http: aiohttp.ClientSession
    ) -> ChunkStream | ByteStream:
        started = time.perf_counter()
        run = await self._open(
            call, http, include_usage=call.include_usage, keepalive=self.spec.keepalive
        )
        upstream_ms = (time.perf_counter() - started) * 1000.0
        batches = self._batches(run)

        async def close() -> None:
            try:
                await batches.aclose()
            finally:
                await self._close(run, http)

        return ChunkStream(
            batches, on_close=close, upstream_ms=upstream_ms, session=run.conversation
        )


def _dumps(body: Any) -> bytes:
    return orjson.dumps(body)
