"""`agentproxy check --probe`: ask each upstream what the route table assumes of it."""

from __future__ import annotations

import asyncio

import aiohttp

from proxy.config import Config, Problem
from proxy.errors import ProxyError
from proxy.routing import RouteTable
from proxy.upstreams.kinds import declaration


async def probe(config: Config) -> list[Problem]:
    """Problems found by contacting the upstreams: unreachable ones, and routes their kind
    finds wrong (a Letta agent that does not resolve)."""
    table = RouteTable(config)
    problems: list[Problem] = []
    async with aiohttp.ClientSession(trust_env=False) as http:

        async def check_upstream(name: str) -> None:
            spec = config.upstreams[name]
            if spec.url is None:  # nothing to contact (echo)
                return
            try:
                await table.upstreams[name].list_models(http)
            except ProxyError as exc:
                problems.append(Problem(config.source, spec.line, f"upstreams.{name}", exc.message))

        async def check_route(route_index: int) -> None:
            route = table.routes[route_index]
            spec = route.spec
            kind = declaration(config.upstreams[spec.upstreams[0]].kind)
            if kind.probe_route is None:
                return
            for key, message in await kind.probe_route(route.upstreams[0], spec, http):
                path = f"models.{spec.name}.{key}"
                problems.append(Problem(config.source, spec.line, path, message))

        await asyncio.gather(
            *(check_upstream(name) for name in table.upstreams),
            *(check_route(i) for i in range(len(table.routes))),
        )
    return sorted(problems, key=lambda p: p.line)
