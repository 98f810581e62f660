"""The `letta` kind: Letta agents as OpenAI models, each caller's session a Letta conversation.

Every request, sync included, uses Letta's token stream, so a sync answer is exactly the
accumulated stream (Letta's own sync answer leaves out text written before a tool call).
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
from typing import Any

import aiohttp
import orjson

from proxy.chunks import KEEP_ALIVE, Comment, Out
from proxy.config import UpstreamSpec
from proxy.errors import ModelNotFound, ProxyError, UpstreamFailed, UpstreamTimeout
from proxy.openai_types import ChatChunk, ChunkFactory, accumulate
from proxy.session_locks import SESSION_LOCKS
from proxy.sse import SSEDecoder, SSEError, encode_comment
from proxy.upstreams.base import Call, EventStream, Upstream
from proxy.upstreams.http_errors import (
    connection_error,
    error_from_response,
    read_answer,
    read_error_body,
)
from proxy.upstreams.letta_request import (
    letta_body,
    new_turn_start,
    pick_conversation,
    session_summary,
    to_letta_messages,
)
from proxy.upstreams.letta_translator import LettaTranslator
from proxy.upstreams.watch import Watch

log = logging.getLogger(__name__)

AGENT_ID = re.compile(
    r"agent-[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
)
# Without it Letta takes the caller for a legacy client: it embeds every tool and memory
# block in agent listings and refuses `"streaming": true` with a 422.
STAINLESS = ("X-Stainless-Package-Version", "1.0.0")
AGENT_TTL = 30.0
CANCEL_TIMEOUT = 5.0
RUN_ID_WAIT = 2.0
PER_KEY_HINT = "\0per-key"
MAX_CACHED_CONVERSATIONS = 10_000
_KEEPALIVE = encode_comment()


@dataclass(slots=True)
class _Run:
    """One Letta run in flight: what closing it must release or cancel."""

    agent_id: str
    lock_key: str
    resp: aiohttp.ClientResponse
    translator: LettaTranslator
    # Loop time the message was sent: first_event counts from it, not from the lookups.
    sent_at: float
    decoder: SSEDecoder = field(default_factory=SSEDecoder)
    saw_done: bool = False
    closed: bool = False

    @property
    def finished_upstream(self) -> bool:
        """Letta ended the run itself: nothing left to cancel."""
        return self.saw_done or self.translator.stop_reason is not None


class Letta(Upstream):
    kind = "letta"

    def __init__(self, spec: UpstreamSpec) -> None:
        super().__init__(spec)
        assert spec.url is not None
        self._base: str = spec.url
        headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        headers[STAINLESS[0]] = STAINLESS[1]
        if spec.api_key:
            headers["Authorization"] = f"Bearer {spec.api_key}"
        headers.update(spec.headers)
        self._headers = headers
        t = spec.timeouts
        self._first_event: float = t.first_event
        self._timeout = aiohttp.ClientTimeout(total=t.total, sock_connect=t.connect)
        self._agents: dict[str, tuple[float, str]] = {}
        self._conversations: dict[tuple[str, str], str] = {}
        self._background: set[asyncio.Task[None]] = set()

    # -- Letta's JSON API ------------------------------------------------------------------

    async def _api(
        self,
        http: aiohttp.ClientSession,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: Any = None,
    ) -> Any:
        try:
            async with asyncio.timeout(self._first_event):
                async with http.request(
                    method,
                    self._base + path,
                    params=params,
                    data=None if body is None else orjson.dumps(body),
                    headers=self._headers,
                    timeout=self._timeout,
                ) as resp:
                    if resp.status >= 300:
                        raise error_from_response(
                            self.name, resp.status, await read_error_body(resp), resp.headers
                        )
                    data = await read_answer(resp, self.name)
        except TimeoutError:
            raise self._timed_out() from None
        except aiohttp.ClientError as exc:
            raise connection_error(self.name, exc) from None
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            raise UpstreamFailed(
                f"Upstream '{self.name}' answered {method} {path} with a body that is not JSON."
            ) from None

    def _timed_out(self) -> UpstreamTimeout:
        return UpstreamTimeout(
            f"Upstream '{self.name}' sent nothing within {self._first_event:g} s "
            "(timeouts.first_event)."
        )

    async def agent_id(
        self, ref: str, http: aiohttp.ClientSession, route: str, *, wildcard: bool
    ) -> str:
        """The id of the agent `ref` names: an id as it is, a name looked up and cached."""
        if AGENT_ID.fullmatch(ref):
            return ref
        now = time.monotonic()
        cached = self._agents.get(ref)
        if cached is not None and cached[0] > now:
            return cached[1]
        found = await self._api(http, "GET", "/v1/agents/", params={"name": ref})
        agents: list[str] = [
            a["id"]
            for a in (found if isinstance(found, list) else [])
            if isinstance(a, dict) and a.get("name") == ref and isinstance(a.get("id"), str)
        ]
        if not agents:
            if wildcard:
                raise ModelNotFound(route)
            raise UpstreamFailed(
                f"Route '{route}': no Letta agent named '{ref}' on upstream '{self.name}'."
            )
        if len(agents) > 1:
            raise UpstreamFailed(
                f"Route '{route}': {len(agents)} Letta agents are named '{ref}' on upstream "
                f"'{self.name}' ({', '.join(agents)}); name the agent by its id."
            )
        self._agents[ref] = (now + AGENT_TTL, agents[0])
        return agents[0]

    async def conversation(self, agent_id: str, token: str, http: aiohttp.ClientSession) -> str:
        """The conversation marked `token`, created on first use."""
        key = (agent_id, token)
        cached = self._conversations.get(key)
        if cached is not None:
            return cached
        search = {"agent_id": agent_id, "summary_search": token, "limit": "50"}
        listing = await self._api(http, "GET", "/v1/conversations/", params=search)
        conversation = pick_conversation(_as_list(listing), token)
        if conversation is None:
            created = await self._api(
                http, "POST", "/v1/conversations/", params={"agent_id": agent_id},
                body={"summary": token},
            )
            # Two first requests may each have created one: all callers settle on the oldest.
            listing = await self._api(http, "GET", "/v1/conversations/", params=search)
            conversation = pick_conversation(_as_list(listing), token)
            if conversation is None and isinstance(created, dict):
                conversation = created.get("id")
            if not isinstance(conversation, str):
                raise UpstreamFailed(
                    f"Upstream '{self.name}' did not return the conversation it created."
                )
        if len(self._conversations) >= MAX_CACHED_CONVERSATIONS:
            self._conversations.clear()
        self._conversations[key] = conversation
        return conversation

    async def list_models(self, http: aiohttp.ClientSession) -> list[dict[str, Any]]:
        """Every agent, as its name, or as its id where several agents share the name."""
        agents: list[dict[str, Any]] = []
        params = {"limit": "100", "order": "asc"}
        for _ in range(100):
            page = _as_list(await self._api(http, "GET", "/v1/agents/", params=params))
            agents.extend(a for a in page if isinstance(a, dict) and isinstance(a.get("id"), str))
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

    # -- a chat turn -----------------------------------------------------------------------

    async def _open(self, call: Call, http: aiohttp.ClientSession, include_usage: bool) -> _Run:
        route = call.route
        assert route is not None
        messages = call.body["messages"]
        start = new_turn_start(messages)
        letta_messages = to_letta_messages(
            messages[start:], client_system=route.client_system, index_base=start
        )
        wildcard = route.wildcard_prefix is not None
        ref = call.upstream_model if wildcard else route.agent
        assert ref is not None
        route_name = call.client_model if wildcard else route.name
        agent = await self.agent_id(ref, http, route_name, wildcard=wildcard)
        hint = call.session_hint
        if hint is None and route.session.without_hint == "per_key":
            hint = PER_KEY_HINT
        conversation = None
        if hint is not None:
            conversation = await self.conversation(
                agent, session_summary(call.key_id, hint), http
            )
        lock_key = f"{self._base}|{agent}|{conversation or 'default'}"
        await SESSION_LOCKS.acquire(lock_key, route.session.busy_timeout)
        try:
            path = (
                f"/v1/conversations/{conversation}/messages"
                if conversation
                else f"/v1/agents/{agent}/messages"
            )
            resp, sent_at = await self._post_turn(call, http, path, letta_messages)
            if resp.status >= 300:
                try:
                    body = await read_error_body(resp)
                finally:
                    resp.release()
                raise self._turn_error(resp, body, route_name, ref, agent, conversation)
        except BaseException:
            SESSION_LOCKS.release(lock_key)
            raise
        translator = LettaTranslator(
            ChunkFactory(call.client_model),
            show_reasoning="reasoning" in route.show,
            show_tools="tools" in route.show,
            include_usage=include_usage,
        )
        return _Run(agent, lock_key, resp, translator, sent_at)

    async def _post_turn(
        self,
        call: Call,
        http: aiohttp.ClientSession,
        path: str,
        letta_messages: list[dict[str, Any]],
    ) -> tuple[aiohttp.ClientResponse, float]:
        started = time.perf_counter()
        sent_at = asyncio.get_running_loop().time()
        # From here on Letta may have stored the message and started a run, even if no
        # answer comes back: a failure is reported and the message never sent elsewhere.
        call.delivered = True
        try:
            async with asyncio.timeout(self._first_event):
                resp = await http.post(
                    self._base + path,
                    data=orjson.dumps(letta_body(letta_messages)),
                    headers=self._headers,
                    timeout=self._timeout,
                )
        except aiohttp.ClientConnectorError as exc:
            # Refused or unreachable: nothing was sent, so another upstream may take it.
            call.delivered = False
            raise connection_error(self.name, exc) from None
        except aiohttp.ConnectionTimeoutError:
            call.delivered = False
            raise UpstreamTimeout(
                f"Upstream '{self.name}' did not accept a connection within "
                f"{self.spec.timeouts.connect:g} s (timeouts.connect)."
            ) from None
        except TimeoutError:
            raise self._timed_out() from None
        except aiohttp.ClientError as exc:
            raise connection_error(self.name, exc) from None
        call.mark_answered(started)
        return resp, sent_at

    def _turn_error(
        self,
        resp: aiohttp.ClientResponse,
        body: bytes,
        route: str,
        ref: str,
        agent: str,
        conversation: str | None,
    ) -> ProxyError:
        if resp.status == 404:
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
        return error_from_response(self.name, resp.status, body, resp.headers)

    def _watch(self, run: _Run, keepalive: float | None) -> Watch:
        watch = Watch(self.name, self.spec.timeouts, keepalive, run.sent_at)
        watch.arm()
        return watch

    async def _batches(self, run: _Run, watch: Watch) -> AsyncGenerator[list[Out], None]:
        """What each upstream read translates to; raises the stream's terminal error.

        Letta's pings count as the upstream's activity (they say the run is alive), so a run
        that thinks for minutes before its first token trips neither first_event nor idle.
        """
        translator, decoder = run.translator, run.decoder
        content = run.resp.content
        read = watch.read
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
                    watch.sent()
                    yield out
        except SSEError as exc:
            raise UpstreamFailed(f"Upstream '{self.name}' sent a malformed stream: {exc}") from None
        except TimeoutError:
            total = self.spec.timeouts.total
            limit = f"within {total:g} s " if total is not None else ""
            raise UpstreamTimeout(
                f"Upstream '{self.name}' did not finish {limit}(timeouts.total)."
            ) from None
        except aiohttp.ClientError:
            raise UpstreamFailed(
                f"Upstream '{self.name}' closed the connection in the middle of the stream."
            ) from None
        final = translator.finish()
        if final:
            yield list(final)
        if translator.error is not None:
            if translator.error_detail:
                log.warning("Letta run %s failed: %s", translator.run_id, translator.error_detail)
            raise translator.error

    async def _close(self, run: _Run, http: aiohttp.ClientSession) -> None:
        if run.closed:
            return
        run.closed = True
        SESSION_LOCKS.release(run.lock_key)
        if run.finished_upstream:
            if run.saw_done:
                run.resp.release()
            else:
                run.resp.close()
            return
        # The client left (or the stream broke) while the agent was still running: stop the
        # run too, not just the socket. The run id arrives in Letta's first ping; if it has
        # not come yet, read on a little for it in the background.
        task = asyncio.get_running_loop().create_task(self._cancel(run, http))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _cancel(self, run: _Run, http: aiohttp.ClientSession) -> None:
        try:
            if run.translator.run_id is None:
                await self._read_run_id(run)
            run_id = run.translator.run_id
            run.resp.close()
            if run_id is None:
                log.warning("could not cancel a Letta run of agent %s: no run id", run.agent_id)
                return
            async with asyncio.timeout(CANCEL_TIMEOUT):
                await self._api(
                    http, "POST", f"/v1/agents/{run.agent_id}/messages/cancel",
                    body={"run_ids": [run_id]},
                )
            log.info("cancelled Letta run %s after the client left", run_id)
        except (ProxyError, TimeoutError, RuntimeError) as exc:
            log.warning("cancelling a Letta run of agent %s failed: %s", run.agent_id, exc)
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

    async def complete(self, call: Call, http: aiohttp.ClientSession) -> bytes:
        run = await self._open(call, http, include_usage=True)
        chunks: list[ChatChunk] = []
        watch = self._watch(run, None)
        batches = self._batches(run, watch)
        try:
            async for batch in batches:
                chunks.extend(out for out in batch if not isinstance(out, Comment))
        finally:
            watch.disarm()
            await batches.aclose()
            await self._close(run, http)
        return orjson.dumps(accumulate(chunks))

    async def open_stream(self, call: Call, http: aiohttp.ClientSession) -> EventStream:
        run = await self._open(call, http, include_usage=call.include_usage)
        watch = self._watch(run, self.spec.keepalive)
        batches = self._batches(run, watch)

        async def close() -> None:
            try:
                await batches.aclose()
            finally:
                await self._close(run, http)

        return EventStream(_encode(batches), close, watch)


async def _encode(batches: AsyncGenerator[list[Out], None]) -> AsyncGenerator[bytes, None]:
    async for batch in batches:
        yield b"".join(
            _KEEPALIVE if isinstance(out, Comment) else b"data: " + orjson.dumps(out) + b"\n\n"
            for out in batch
        )


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _timestamp(value: Any) -> int | None:
    if not isinstance(value, str):
        return None
    try:
        return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return None
