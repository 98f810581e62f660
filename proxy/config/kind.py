"""What an upstream kind declares about itself, so the schema needs no rule per kind.

Each kind has a module proxy/upstreams/<kind>_options.py with one `DECLARATION`, listed in the
registry proxy/upstreams/kinds.py. The schema asks the declaration which keys the kind's
upstreams and routes take and lets it read its own; the rest of the proxy asks it whether the
kind keeps sessions, lists models, and which adapter serves it. Adding a kind is a new module
and one line in the registry; no `if kind == ...` anywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from proxy.config.reader import Block, Reader
from proxy.config.specs import RouteFields, UpstreamSpec

if TYPE_CHECKING:
    from proxy.upstreams.base import Upstream


class OptionsReader(Protocol):
    def __call__(self, reader: Reader, upstream: Block) -> object:
        """Reads the kind's own keys of one upstream (`upstream` holds all its keys; the
        declared `option_keys` are the ones to read) into a frozen dataclass."""


class RouteReader(Protocol):
    def __call__(
        self, reader: Reader, route: Block, *, wildcard: bool,
        upstreams: tuple[UpstreamSpec, ...],
    ) -> RouteFields:
        """Reads the kind's route keys of one route (`route` holds all its keys; `upstreams`
        are the specs of its upstreams that were read without a problem)."""


def _no_adapter() -> type[Upstream]:
    raise NotImplementedError("this kind declares no adapter")


def _same(url: str) -> str:
    return url


# eq=False: one declaration per kind, compared and hashed as itself.
@dataclass(frozen=True, slots=True, eq=False)
class KindDeclaration:
    # The `kind:` value.
    name: str
    # The shared upstream keys it takes (proxy/config/upstream_keys.SHARED_KEYS): url,
    # api_key, headers, forward_headers, timeouts, keepalive, max_concurrency, queue_timeout,
    # circuit. Another kind's key on this one is "not used by kind <name>".
    keys: tuple[str, ...] = ()
    # With `url` among `keys`: the url is required, and a missing one is reported with this
    # example. None: the url is optional.
    url_example: str | None = None
    # The url as the kind's adapter wants it (letta: its root, without `/v1`).
    normalise_url: Callable[[str], str] = _same
    # Its own upstream keys, read by `read_options` into UpstreamSpec.options.
    option_keys: tuple[str, ...] = ()
    read_options: OptionsReader | None = None
    # The route keys its routes take besides `upstream` and `owned_by`. `model` is read by the
    # schema (the name sent upstream); the others by `read_route`.
    route_keys: tuple[str, ...] = ("model",)
    # A message for a route key it refuses that another kind takes, when the generic one
    # ("'agent' is only for routes to letta upstreams") would not help.
    route_refusals: Mapping[str, str] = field(default_factory=dict)
    read_route: RouteReader | None = None
    # Keeps conversations: requests to it carry a session key, and one session runs one turn
    # at a time.
    stateful: bool = False
    # Its upstream lists models, so a wildcard route can publish them.
    lists_models: bool = False
    # A route may list its upstreams together with upstreams of another mixable kind (openai
    # and echo: a route reads the same keys for both). A kind that reads route keys of its own
    # is not mixable.
    mixable: bool = True
    # Loads the kind's adapter class (proxy/upstreams/<kind>.py) when a table is built: an
    # import inside a function, so reading a config never imports the request path.
    adapter: Callable[[], type[Upstream]] = _no_adapter
