"""The `letta` kind's declaration: a Letta server whose agents are the models, and its routes'
keys (which agent, the client's system prompt, what to show, sessions)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from proxy.config.kind import KindDeclaration
from proxy.config.reader import Block, Reader
from proxy.config.route_keys import read_client_system, read_session, read_show
from proxy.config.specs import RouteFields, SessionSpec, UpstreamSpec
from proxy.config.upstream_keys import SHARED_KEYS

if TYPE_CHECKING:
    from proxy.upstreams.base import Upstream

ROUTE_KEYS: tuple[str, ...] = ("agent", "client_system", "show", "session")


def root_url(url: str) -> str:
    # Letta's routes all start with /v1; accept the root with or without it.
    return url[: -len("/v1")] if url.endswith("/v1") else url


def read_route(
    reader: Reader, route: Block, *, wildcard: bool, upstreams: tuple[UpstreamSpec, ...]
) -> RouteFields:
    agent = None
    if "agent" in route:
        if wildcard:
            reader.error(route.key_node("agent"), route.at("agent"), "a wildcard serves every "
                         "agent of the server; 'agent' cannot be set")
        else:
            agent = reader.nonempty_string(route.node("agent"), route.at("agent"))
    elif not wildcard:
        reader.require(route, "agent", " (the Letta agent's id or name)")
    client_system: Literal["drop", "prepend"] = "drop"
    if "client_system" in route:
        client_system = read_client_system(reader, route.node("client_system"),
                                           route.at("client_system"))
    show = read_show(reader, route.node("show"), route.at("show")) if "show" in route else ()
    session = SessionSpec()
    if "session" in route:
        session = read_session(reader, route.node("session"), route.at("session"))
    return RouteFields(agent=agent, client_system=client_system, show=show, session=session)


def adapter() -> type[Upstream]:
    from proxy.upstreams.letta import Letta

    return Letta


DECLARATION = KindDeclaration(
    name="letta",
    keys=tuple(key for key in SHARED_KEYS if key != "forward_headers"),
    url_example="http://127.0.0.1:8283",
    normalise_url=root_url,
    route_keys=ROUTE_KEYS,
    route_refusals={"model": "a letta route names its agent with 'agent', not 'model'"},
    read_route=read_route,
    stateful=True,
    lists_models=True,
    mixable=False,
    adapter=adapter,
)
