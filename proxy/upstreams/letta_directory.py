"""The agents and conversations of one Letta server: lookups (cached), creation, forks, and
the agent listing of wildcard routes.

Ids that Letta returns are checked against its documented shapes before they go into a URL
path: a hostile or broken server must not be able to point the proxy's requests, which carry
the Letta key, at another path.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from datetime import datetime
from typing import Any

import aiohttp

from proxy.errors import ModelNotFound, PreviousResponseNotFound, ProxyError, UpstreamFailed
from proxy.exchange import Exchange
from proxy.upstreams.http import HttpUpstream
from proxy.upstreams.letta_request import pick_conversation

_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
AGENT_ID = re.compile(
    r"agent-[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
)
CONVERSATION_ID = re.compile(f"conv-{_UUID}")
AGENT_TTL = 30.0
# The summary of a conversation made for one Responses turn: readable in Letta's own UI, and
# never a session token (those are `SESSION_PREFIX` + a digest), so no hint ever selects it.
NEW_CONVERSATION_SUMMARY = "agentproxy: Responses API"
MAX_CACHED_CONVERSATIONS = 10_000
# The longest agent name a model listing offers: a client sends it back as `model`, the proxy
# looks it up in a query string, and errors and logs cut a model name at 256 characters.
MAX_LISTED_NAME = 256


class LettaDirectory:
    """Lookups on behalf of one Letta upstream, through its `call_api`."""

    def __init__(self, upstream: HttpUpstream) -> None:
        self._up = upstream
        self.name = upstream.name
        self._agents: dict[str, tuple[float, str]] = {}
        self._conversations: dict[tuple[str, str], str] = {}

    def forget(self, ref: str, conversation: str | None) -> None:
        """The agent or the conversation is gone: look both up again next time."""
        self._agents.pop(ref, None)
        self._conversations = {
            k: v for k, v in self._conversations.items() if v != conversation
        }

    def missing(
        self, route: str, ref: str, agent: str, conversation: str | None, *, wildcard: bool
    ) -> ProxyError:
        """What Letta's 404 for the agent (or its conversation) is to the client.

        On a wildcard route the agent is the client's choice of model: an unknown one is the
        client's 404 `model_not_found`, as an unknown name is, never an upstream failure that
        counts against the circuit. A route's own agent, or a conversation the proxy looked
        up, that is gone is the upstream's fault: its data changed under the proxy.
        """
        self.forget(ref, conversation)
        if wildcard and conversation is None:
            return ModelNotFound(route)
        what = f"conversation {conversation} of agent" if conversation else "agent"
        return UpstreamFailed(
            f"Route '{route}': Letta {what} '{ref}' ({agent}) was not found on upstream "
            f"'{self.name}'."
        )

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
        found = await self._up.call_api(http, exchange, "GET", "/v1/agents/", params={"name": ref})
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
        agent = self._checked(agents[0], AGENT_ID, "agent id")
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
        listing = await self._up.call_api(
            http, exchange, "GET", "/v1/conversations/", params=search
        )
        conversation = pick_conversation(_as_list(listing), token)
        if conversation is None:
            created = await self._up.call_api(
                http, exchange, "POST", "/v1/conversations/", params={"agent_id": agent_id},
                body={"summary": token},
            )
            # Two first requests may each have created one: all callers settle on the oldest.
            listing = await self._up.call_api(
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
            forked = await self._up.call_api(
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
        created = await self._up.call_api(
            http, exchange, "POST", "/v1/conversations/", params={"agent_id": agent_id},
            body={"summary": NEW_CONVERSATION_SUMMARY},
        )
        conversation = created.get("id") if isinstance(created, dict) else None
        return self._checked(conversation, CONVERSATION_ID, "conversation id")

    async def agent_cards(
        self, http: aiohttp.ClientSession, exchange: Exchange
    ) -> list[dict[str, Any]]:
        """Every agent, as its name, or as its id where several agents share the name."""
        # Only what a card needs is kept of each agent: Letta's agent objects carry the system
        # prompt, memory blocks and tools, and a server lists up to 10,000 of them.
        agents: dict[str, tuple[str | None, int | None]] = {}
        params = {"limit": "100", "order": "asc"}
        for _ in range(100):
            page = _as_list(
                await self._up.call_api(http, exchange, "GET", "/v1/agents/", params=params)
            )
            before = len(agents)
            for a in page:
                if (
                    isinstance(a, dict) and isinstance(a.get("id"), str)
                    and AGENT_ID.fullmatch(a["id"]) and a["id"] not in agents
                ):
                    name = a.get("name")
                    agents[a["id"]] = (
                        name if isinstance(name, str) else None, _timestamp(a.get("created_at"))
                    )
            # A server that ignores `after` repeats its page: the agents it lists twice would
            # count as namesakes of themselves, and the listing would take 100 requests.
            if len(page) < 100 or len(agents) == before:
                break
            params["after"] = next(reversed(agents))
        names = Counter(name for name, _ in agents.values())
        cards = []
        for agent_id, (name, created) in agents.items():
            # A name that looks like an agent id would be taken for one when sent back.
            unique = (
                isinstance(name, str) and 0 < len(name) <= MAX_LISTED_NAME
                and names[name] == 1 and AGENT_ID.fullmatch(name) is None
            )
            card: dict[str, Any] = {"id": name if unique else agent_id}
            if created:
                card["created"] = created
            cards.append(card)
        return cards


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _timestamp(value: Any) -> int | None:
    """Unix seconds; None (the listing's own time) for what is not a date after 1970."""
    if not isinstance(value, str):
        return None
    try:
        seconds = int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
    except (ValueError, OverflowError, OSError):  # not a date, or naive and out of range
        return None
    return seconds if seconds > 0 else None
