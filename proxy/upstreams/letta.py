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
import re
import time
from collections import Counter
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

import aiohttp
import orjson

from proxy.chunks import KEEP_ALIVE, Comment, Out
from proxy.config import ModelSpec
from proxy.errors import ModelNotFound, PreviousResponseNotFound, ProxyError, UpstreamFailed
from proxy.exchange import Exchange
from proxy.openai_types import ChatChunk, ChunkFactory, accumulate
from proxy.sse import SSEDecoder, SSEError
from proxy.upstreams.base import Answer, ByteStream, Call, ChunkStream
from proxy.upstreams.deadlines import Deadlines
from proxy.upstreams.http import HttpUpstream
from proxy.upstreams.letta_request import (
    letta_body,
    new_turn_start,
    pick_conversation,
    session_summary,
    to_letta_messages,
)
from proxy.upstreams.letta_translator import LettaTranslator

log = logging.getLogger(__name__)

_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
AGENT_ID = re.compile(
    r"agent-[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
)
CONVERSATION_ID = re.compile(f"conv-{_UUID}")
# Without it Letta takes the caller for a legacy client: it embeds every tool and memory
# block in agent listings and refuses `"streaming": true` with a 422.
STAINLESS = ("X-Stainless-Package-Version", "1.0.0")
AGENT_TTL = 30.0
CANCEL_TIMEOUT = 5.0
RUN_ID_WAIT = 2.0
PER_KEY_HINT = "\0per-key"
# The summary of a conversation made for one Responses turn: readable in Letta's own UI, and
# never a session token (those are `SESSION_PREFIX` + a digest), so no hint ever selects it.
NEW_CONVERSATION_SUMMARY = "agentproxy: Responses API"
MAX_CACHED_CONVERSATIONS = 10_000


@dataclass(slots=True)
class _Run:
    """One Letta run in flight: what closing it must release or cancel."""

    agent_id: str
    lock_key: str
    # The conversation the turn runs in; None for the agent's default thread.
    conversation: str | None
    resp: aiohttp.ClientResponse
    translator: LettaTranslator
    # The turn's deadlines, from the moment the message was sent (not from the lookups).
    deadlines: Deadlines
    decoder: SSEDecoder = field(default_factory=SSEDecoder)
    saw_done: bool = False
    closed: bool = False

    @property
    def finished_upstream(self) -> bool:
        """Letta ended the run itself: nothing left to cancel."""
        return self.saw_done or self.translator.stop_reason is not None


class Letta(HttpUpstream):
    kind: ClassVar[str] = "letta"
    chains: ClassVar[bool] = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._agents: dict[str, tuple[float, str]] = {}
        self._conversations: dict[tuple[str, str], str] = {}

    def extra_headers(self) -> dict[str, str]:
        return {STAINLESS[0]: STAINLESS[1]}

    # -- Letta's JSON API ------------------------------------------------------------------

    async def agent_id(
        self,
        ref: str,
        http: aiohttp.ClientSession,
        exchange: Exchange,
        route: str,
        *,
        wildcard: bool,
    ) -> str:
        """The id of the agent `ref` names: an id as it is, a name looked up and cached."""
        if AGENT_ID.fullmatch(ref):
            return ref
        now = time.monotonic()
        cached = self._agents.get(ref)
        if cached is not None and cached[0] > now:
            return cached[1]
        found = await self.call_api(http, exchange, "GET", "/v1/agents/", params={"name": ref})
        agents: list[str] = [
            a["id"]
            for a in _as_list(found)
            if isinstance(a, dict) and a.get("name") == ref and isinstance(a.get("id"), str)
        ]
        if not agents:
            if wildcard:
                raise ModelNotFound(route)
            raise UpstreamFailed(
                f"Route '{route}': no Letta agent named '{ref}' on upstream '{self.name}'."
            )
        if len(agents) > 1:
            shown = ", ".join(a for a in agents if AGENT_ID.fullmatch(a))
            raise UpstreamFailed(
                f"Route '{route}': {len(agents)} Letta agents are named '{ref}' on upstream "
                f"'{self.name}' ({shown}); name the agent by its id."
            )
        agent = self._checked(agents[0], AGENT_ID, "an agent id")
        self._agents[ref] = (now + AGENT_TTL, agent)
        return agent

    def _checked(self, value: Any, shape: re.Pattern[str], what: str) -> str:
        if not isinstance(value, str) or shape.fullmatch(value) is None:
            raise UpstreamFailed(f"Upstream '{self.name}' returned an invalid {what}.")
        return value

    async def conversation(
        self, agent_id: str, token: str, http: aiohttp.ClientSession, exchange: Exchange
    ) -> str:
        """The conversation marked `token`, created on first use."""
        key = (agent_id, token)
        cached = self._conversations.get(key)
        if cached is not None:
            return cached
        search = {"agent_id": agent_id, "summary_search": token, "limit": "50"}
        listing = await self.call_api(http, exchange, "GET", "/v1/conversations/", params=search)
        conversation = pick_conversation(_as_list(listing), token)
        if conversation is None:
            created = await self.call_api(
                http, exchange, "POST", "/v1/conversations/", params={"agent_id": agent_id},
                body={"summary": token},
            )
            # Two first requests may each have created one: all callers settle on the oldest.
            listing = await self.call_api(
                http, exchange, "GET", "/v1/conversations/", params=search
            )
            conversation = pick_conversation(_as_list(listing), token)
            if conversation is None and isinstance(created, dict):
                conversation = created.get("id")
        conversation = self._checked(conversation, CONVERSATION_ID, "conversation id")
        if len(self._conversations) >= MAX_CACHED_CONVERSATIONS:
            self._conversations.clear()
        self._conversations[key] = conversation
        return conversation

    async def fork(
        self, source: str, agent_id: str, http: aiohttp.ClientSession, exchange: Exchange
    ) -> str:
        """A new conversation that starts as a copy of `source`.

        `source` comes from a verified response id, but it is checked like any id before it
        goes into a path; a source that is gone, or that is another agent's (the route was
        pointed at another agent since), is the same previous_response_not_found as a bad id.
        """
        if CONVERSATION_ID.fullmatch(source) is None:
            raise PreviousResponseNotFound()
        try:
            forked = await self.call_api(
                http, exchange, "POST", f"/v1/conversations/{source}/fork"
            )
        except ProxyError as err:
            if err.status == 404:
                raise PreviousResponseNotFound() from None
            raise
        if not isinstance(forked, dict):
            raise UpstreamFailed(f"Upstream '{self.name}' answered a fork without a conversation.")
        conversation = self._checked(forked.get("id"), CONVERSATION_ID, "conversation id")
        if forked.get("agent_id") not in (None, agent_id):
            raise PreviousResponseNotFound()
        return conversation

    async def new_conversation(
        self, agent_id: str, http: aiohttp.ClientSession, exchange: Exchange
    ) -> str:
        """A conversation of its own for one Responses turn without a session hint."""
        created = await self.call_api(
            http, exchange, "POST", "/v1/conversations/", params={"agent_id": agent_id},
            body={"summary": NEW_CONVERSATION_SUMMARY},
        )
        conversation = created.get("id") if isinstance(created, dict) else None
        return self._checked(conversation, CONVERSATION_ID, "conversation id")

    async def list_models(
        self, http: aiohttp.ClientSession, exchange: Exchange
    ) -> list[dict[str, Any]]:
        """Every agent, as its name, or as its id where several agents share the name."""
        agents: list[dict[str, Any]] = []
        params = {"limit": "100", "order": "asc"}
        for _ in range(100):
            page = _as_list(
                await self.call_api(http, exchange, "GET", "/v1/agents/", params=params)
            )
            agents.extend(
                a for a in page
                if isinstance(a, dict) and isinstance(a.get("id"), str)
                and AGENT_ID.fullmatch(a["id"])
            )
            if len(page) < 100 or not agents:
                break
            params["after"] = agents[-1]["id"]
        names = Counter(a.get("name") for a in agents)
        cards = []
        for agent in agents:
            name = agent.get("name")
            unique = isinstance(name, str) and name and names[name] == 1
            card: dict[str, Any] = {"id": name if unique else agent["id"]}
            created = _timestamp(agent.get("created_at"))
            if created:
                card["created"] = created
            cards.append(card)
        return cards

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
    ) -> _Run:
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
        conversation = await self._thread(call, agent, http)
        lock_key = f"{self.base}|{agent}|{conversation or 'default'}"
        locks = self.state.session_locks
        await locks.acquire(lock_key, route.session.busy_timeout)
        try:
            path = (
                f"/v1/conversations/{conversation}/messages"
                if conversation
                else f"/v1/agents/{agent}/messages"
            )
            deadlines = self.deadlines(exchange)
            try:
                resp = await self._post_turn(http, path, letta_messages, deadlines)
                if resp.status >= 300:
                    err = self._turn_error(
                        await self.refused(resp), resp.status, route_name, ref, agent,
                        conversation,
                    )
                    # Letta had the message: it may have stored it before it failed.
                    err.delivered = True
                    raise err
            except BaseException:
                deadlines.close()
                raise
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
        return _Run(agent, lock_key, conversation, resp, translator, deadlines)

    async def _thread(self, call: Call, agent: str, http: aiohttp.ClientSession) -> str | None:
        """The conversation the turn runs in (None: the agent's default thread)."""
        exchange = call.exchange
        if call.fork_from is not None:
            # A continued response wins over any session hint: the id names its branch.
            return await self.fork(call.fork_from, agent, http, exchange)
        hint = call.session_hint
        if hint is None and call.route.session.without_hint == "per_key":
            hint = PER_KEY_HINT
        if hint is not None:
            return await self.conversation(
                agent, session_summary(call.key_id, hint), http, exchange
            )
        if call.new_conversation:
            return await self.new_conversation(agent, http, exchange)
        return None

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
            err = self.failure(exc, answered=False)
            # Unless the connection was refused or never made, Letta may have stored the
            # message and started a run even if no answer came back: the failure is
            # reported, and the message never sent to another upstream.
            if isinstance(err, ProxyError) and not isinstance(
                exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError
            ):
                err.delivered = True
            raise err from None

    def _turn_error(
        self,
        err: ProxyError,
        status: int,
        route: str,
        ref: str,
        agent: str,
        conversation: str | None,
    ) -> ProxyError:
        if status == 404:
            # The agent or the conversation is gone: look both up again next time.
            self._agents.pop(ref, None)
            self._conversations = {
                k: v for k, v in self._conversations.items() if v != conversation
            }
            what = f"conversation {conversation} of agent" if conversation else "agent"
            return UpstreamFailed(
                f"Route '{route}': Letta {what} '{ref}' ({agent}) was not found on upstream "
                f"'{self.name}'."
            )
        return err

    async def _batches(self, run: _Run) -> AsyncGenerator[list[Out], None]:
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
            raise self.failure(exc, answered=True, what="stream") from None
        final = translator.finish()
        if final:
            yield list(final)
        if translator.error is not None:
            if translator.error_detail:
                log.warning(
                    "Letta run %s failed: %s", translator.run_id,
                    self.scrub(translator.error_detail),
                )
            raise self.scrubbed(translator.error)

    async def _close(self, run: _Run, http: aiohttp.ClientSession) -> None:
        if run.closed:
            return
        run.closed = True
        run.deadlines.close()
        self.state.session_locks.release(run.lock_key)
        if run.finished_upstream:
            if run.saw_done:
                run.resp.release()
            else:
                run.resp.close()
            return
        # The client left (or the stream broke) while the agent was still running: stop the
        # run too, not just the socket. The run id arrives in Letta's first ping; if it has
        # not come yet, read on a little for it, in the background (the app awaits it when
        # it closes).
        self.state.spawn(self._cancel(run, http), name=f"letta-cancel-{run.agent_id}")

    async def _cancel(self, run: _Run, http: aiohttp.ClientSession) -> None:
        task = asyncio.current_task()
        # A record of its own: the deadlines of the cancel call interrupt this task only.
        exchange = Exchange(0.0, "letta-cancel", task)
        try:
            if run.translator.run_id is None:
                await self._read_run_id(run)
            run_id = run.translator.run_id
            run.resp.close()
            if run_id is None:
                log.warning("could not cancel a Letta run of agent %s: no run id", run.agent_id)
                return
            async with asyncio.timeout(CANCEL_TIMEOUT):
                await self.call_api(
                    http, exchange, "POST", f"/v1/agents/{run.agent_id}/messages/cancel",
                    body={"run_ids": [run_id]},
                )
            log.info("cancelled Letta run %s after the client left", run_id)
        except (ProxyError, TimeoutError, RuntimeError) as exc:
            log.warning(
                "cancelling a Letta run of agent %s failed: %s", run.agent_id,
                self.scrub(str(exc)),
            )
        finally:
            run.resp.close()

    async def _read_run_id(self, run: _Run) -> None:
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
        chunks: list[ChatChunk] = []
        batches = self._batches(run)
        try:
            async for batch in batches:
                chunks.extend(out for out in batch if not isinstance(out, Comment))
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


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _timestamp(value: Any) -> int | None:
    if not isinstance(value, str):
        return None
    try:
        return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return None
