"""`agentproxy check --probe`: ask each upstream what the route table assumes of it."""

from __future__ import annotations

import asyncio

import aiohttp

from proxy.config import Config, Problem
from proxy.errors import ProxyError
from proxy.routing import RouteTable
from proxy.upstreams.letta import Letta


async def probe(config: Config) -> list[Problem]:
    """Problems found by contacting the upstreams: unreachable ones, agents that don't resolve."""
    table = RouteTable(config)
    problems: list[Problem] = []
    async with aiohttp.ClientSession(trust_env=False) as http:

        async def check_upstream(name: str) -> None:
            upstream = table.upstreams[name]
            if upstream.kind == "echo":
                return
            try:
                await upstream.list_models(http)
            except ProxyError as exc:
                spec = config.upstreams[name]
                problems.append(Problem(config.source, spec.line, f"upstreams.{name}", exc.message))

        async def check_agent(route_index: int) -> None:
            route = table.routes[route_index]
            spec = route.spec
            upstream = route.upstreams[0]
            if not isinstance(upstream, Letta) or spec.agent is None:
                return
            try:
                await upstream.agent_id(spec.agent, http, spec.name, wildcard=False)
            except ProxyError as exc:
                path = f"models.{spec.name}.agent"
                problems.append(Problem(config.source, spec.line, path, exc.message))

        await asyncio.gather(
            *(check_upstream(name) for name in table.upstreams),
            *(check_agent(i) for i in range(len(table.routes))),
        )
    return sorted(problems, key=lambda p: p.line)
