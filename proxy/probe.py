"""`agentproxy check --probe`: ask each upstream what the route table assumes of it.

What to ask is each kind's own business (`Upstream.probe`, `Upstream.probe_route`).
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

from proxy.config import Config, Problem
from proxy.errors import ProxyError
from proxy.exchange import Exchange
from proxy.routing import RouteTable


async def probe(config: Config) -> list[Problem]:
    """Problems found by contacting the upstreams: unreachable ones, agents that don't resolve."""
    table = RouteTable(config)
    problems: list[Problem] = []
    async with aiohttp.ClientSession(trust_env=False) as http:

        def record() -> Exchange:
            return Exchange(time.perf_counter(), "probe", asyncio.current_task())

        async def check_upstream(name: str) -> None:
            try:
                await table.upstreams[name].probe(http, record())
            except ProxyError as exc:
                spec = config.upstreams[name]
                problems.append(Problem(config.source, spec.line, f"upstreams.{name}", exc.message))

        async def check_route(route_index: int) -> None:
            route = table.routes[route_index]
            spec = route.spec
            for key, message in await route.upstreams[0].probe_route(spec, http, record()):
                path = f"models.{spec.name}.{key}"
                problems.append(Problem(config.source, spec.line, path, message))

        try:
            await asyncio.gather(
                *(check_upstream(name) for name in table.upstreams),
                *(check_route(i) for i in range(len(table.routes))),
            )
        finally:
            await table.state.close()
    return sorted(problems, key=lambda p: p.line)
