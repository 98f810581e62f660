"""The `custom` kind's declaration: any agent HTTP API, described in routes.yaml alone.

The upstream's own keys (mode, request, sync, stream, session, cancel, models, error_message)
are read as plain data and compiled by custom_spec.compile_custom; each problem it finds comes
back with its key path inside the block and is reported on that key's line. The compiled
CustomSpec is the upstream's `options`. Routes take the letta route keys, except that
`without_hint` belongs to the upstream (it depends on the API), plus `client_system: keep`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, cast

from proxy.config.kind import KindDeclaration
from proxy.config.reader import Block, Reader
from proxy.config.route_keys import read_session, read_show
from proxy.config.specs import RouteFields, SessionSpec, UpstreamSpec
from proxy.config.upstream_keys import SHARED_KEYS
from proxy.upstreams.custom_spec import CUSTOM_KEYS, CustomSpec, CustomSpecError, SpecProblem
from proxy.upstreams.custom_spec import compile_custom as compile_spec
from proxy.upstreams.custom_turn import CLIENT_SYSTEM, ClientSystem

if TYPE_CHECKING:
    from proxy.upstreams.base import Upstream

ROUTE_KEYS: Final[tuple[str, ...]] = ("model", "client_system", "show", "session")
ROUTE_SESSION_KEYS: Final[tuple[str, ...]] = ("from_user", "busy_timeout")


@dataclass(frozen=True, slots=True)
class CustomRoute:
    """What a route to a custom upstream adds: the full `client_system` choice (ModelSpec's
    own field only holds drop/prepend, so `keep` shows there as `drop`)."""

    client_system: ClientSystem = "drop"


def _path(upstream: Block, problem: SpecProblem) -> str:
    return f"{upstream.path}.{problem.path}" if problem.where else upstream.path


def read_options(reader: Reader, upstream: Block) -> CustomSpec | None:
    raw = {key: reader.plain(upstream.node(key), upstream.at(key))
           for key in CUSTOM_KEYS if key in upstream}
    try:
        spec = compile_spec(raw, skip=())
    except CustomSpecError as exc:
        for problem in exc.problems:
            reader.error(upstream.locate(problem.where), _path(upstream, problem),
                         problem.message)
        return None
    for warning in spec.warnings:
        reader.warn(upstream.locate(warning.where), _path(upstream, warning), warning.message)
    return spec


def read_route(
    reader: Reader, route: Block, *, wildcard: bool, upstreams: tuple[UpstreamSpec, ...]
) -> RouteFields:
    client_system: ClientSystem = "drop"
    if "client_system" in route:
        value = reader.choice(route.node("client_system"), route.at("client_system"),
                              CLIENT_SYSTEM)
        client_system = cast(ClientSystem, value or "drop")
    show = read_show(reader, route.node("show"), route.at("show")) if "show" in route else ()
    if "tools" in show:
        reader.warn(route.node("show"), route.at("show"), "`tools` has no effect on a route to "
                    "a custom upstream (its mapping reads no tool calls); `reasoning` does")
    session = SessionSpec()
    if "session" in route:
        session = read_session(reader, route.node("session"), route.at("session"),
                               keys=ROUTE_SESSION_KEYS)
    specs = [(u.name, u.options) for u in upstreams if isinstance(u.options, CustomSpec)]
    if wildcard:
        for name, spec in specs:
            if spec.models is None:
                reader.error(route.anchor, route.path, f"a wildcard route publishes the "
                             f"upstream's models, but upstream '{name}' has no `models` "
                             "request to list them")
    elif "model" not in route and any("model" in spec.placeholders for _, spec in specs):
        reader.require(route, "model", " (the upstream's requests use {{ model }}: the id of "
                                       "the flow, app, assistant or webhook to call)")
    return RouteFields(
        client_system="prepend" if client_system == "prepend" else "drop",
        show=show,
        session=session,
        options=CustomRoute(client_system),
    )


def adapter() -> type[Upstream]:
    from proxy.upstreams.custom import Custom

    return Custom


DECLARATION = KindDeclaration(
    name="custom",
    adapter=adapter,
    keys=SHARED_KEYS,
    url_example="http://127.0.0.1:5001/v1",
    option_keys=CUSTOM_KEYS,
    read_options=read_options,
    route_keys=ROUTE_KEYS,
    read_route=read_route,
    stateful=True,
    lists_models=True,
    mixable=False,
)
