"""The route table: which upstream serves which model, and the model cards clients list."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from proxy.auth import Authenticator, Grant, make_grant
from proxy.config import Config, ModelSpec
from proxy.errors import ModelNotFound, ProxyError
from proxy.exchange import Exchange
from proxy.failover import Failover
from proxy.state import AppState
from proxy.upstreams.base import Upstream
from proxy.upstreams.kinds import build_upstream, declaration

log = logging.getLogger(__name__)

LISTING_TTL = 30.0


class Listing:
    """The model list of one sequence of upstreams, cached, so listing stays cheap and new
    models still appear within LISTING_TTL seconds. The wildcard routes of a table that name
    the same upstreams share one: each `prefix/*` of one server does not ask it again."""

    __slots__ = ("_listed_at", "_listing", "_pending", "upstreams")

    def __init__(self, upstreams: tuple[Upstream, ...]) -> None:
        self.upstreams = upstreams
        self._listing: list[dict[str, Any]] = []
        self._listed_at = -LISTING_TTL
        # The listing under way: requests that find the cache stale meanwhile wait for it
        # rather than each send their own (a Letta server with many agents answers in up to
        # 100 pages).
        self._pending: asyncio.Future[list[dict[str, Any]]] | None = None

    async def cards(
        self, http: aiohttp.ClientSession, exchange: Exchange
    ) -> list[dict[str, Any]]:
        """The upstream's model list, by the same failover and circuit rules as a request."""
        while True:
            if time.monotonic() - self._listed_at < LISTING_TTL:
                return self._listing
            pending = self._pending
            if pending is None:
                break
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                # Cancelled itself (maybe with the lister, its client gone too): it ends.
                if not pending.cancelled() or (task is not None and task.cancelling()):
                    raise
                # The request that was listing went away: this one lists instead.
        pending = self._pending = asyncio.get_running_loop().create_future()
        # Retrieved here, so an error nobody else waited for is not logged as unretrieved.
        pending.add_done_callback(lambda done: done.cancelled() or done.exception())
        try:
            listing = await self._list(http, exchange)
        except Exception as exc:
            # The waiters share the failure: the same upstream, asked at the same moment.
            pending.set_exception(exc)
            raise
        except BaseException:
            pending.cancel()
            raise
        finally:
            self._pending = None
        pending.set_result(listing)
        return listing

    async def _list(
        self, http: aiohttp.ClientSession, exchange: Exchange
    ) -> list[dict[str, Any]]:
        now = time.monotonic()
        failover = Failover(self.upstreams, _ignore_error, _ignore)
        while True:
            lease = failover.next() or await failover.queue()
            try:
                listing = await lease.upstream.list_models(http, exchange)
            except BaseException as exc:
                if failover.retry(lease, exc):
                    continue
                raise
            lease.succeeded()
            lease.release()
            break
        self._listing, self._listed_at = listing, now
        return listing


@dataclass(slots=True)
class Route:
    spec: ModelSpec
    upstreams: tuple[Upstream, ...]
    # Its upstream keeps conversations, so requests carry a session hint.
    stateful: bool = False
    # A wildcard route's model list: given by the table, shared with the table's other
    # wildcard routes to the same upstreams.
    listing: Listing | None = None
    # The upstream's listing last seen, and the route's cards made of it (shared: read only).
    expanded: tuple[list[dict[str, Any]], list[dict[str, Any]]] | None = None
    # Every upstream continues a `previous_response_id` itself; one relays `/v1/responses` as
    # it is. Fixed with the route, so a request does not ask each upstream.
    chains: bool = field(init=False, default=False)
    native_responses: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.chains = all(upstream.chains for upstream in self.upstreams)
        self.native_responses = any(upstream.native_responses for upstream in self.upstreams)

    @property
    def name(self) -> str:
        return self.spec.name

    def owned_by(self) -> str:
        return self.spec.owned_by or self.upstreams[0].name

    async def upstream_cards(
        self, http: aiohttp.ClientSession, exchange: Exchange
    ) -> list[dict[str, Any]]:
        """The upstream's model list (cached: see Listing)."""
        if self.listing is None:
            self.listing = Listing(self.upstreams)
        return await self.listing.cards(http, exchange)


def _ignore_error(upstream: Upstream, exc: ProxyError) -> None:
    pass


def _ignore(upstream: Upstream) -> None:
    pass


def build_upstreams(config: Config, state: AppState) -> dict[str, Upstream]:
    """The adapters of a table's upstreams: they take their health from `state`, so this runs
    on the event loop; the rest of a table can be built on any thread."""
    return {name: build_upstream(spec, state) for name, spec in config.upstreams.items()}


class RouteTable:
    """Immutable once built: a request reads it once and keeps it to the end."""

    def __init__(
        self, config: Config, extra_keys: Iterable[str] = (), state: AppState | None = None,
        upstreams: Mapping[str, Upstream] | None = None,
    ) -> None:
        """`upstreams`: from build_upstreams, when built already; then nothing shared is
        touched before `commit`."""
        self.state = state = state if state is not None else AppState()
        self.version = config.version
        self.loaded_at = time.time()
        self.created = int(self.loaded_at)
        if upstreams is None:
            upstreams = build_upstreams(config, state)
        self.upstreams = upstreams
        listings: dict[tuple[str, ...], Listing] = {}
        self.routes: list[Route] = [
            Route(
                m,
                chosen := tuple(upstreams[u] for u in m.upstreams),
                stateful=declaration(config.upstreams[m.upstreams[0]].kind).stateful
                or any(upstreams[u].wants_session for u in m.upstreams),
                listing=None if m.wildcard_prefix is None
                else listings.setdefault(tuple(m.upstreams), Listing(chosen)),
            )
            for m in config.models
        ]
        self._exact = {r.name: r for r in self.routes if r.spec.wildcard_prefix is None}
        self._wildcards = [
            (r.spec.wildcard_prefix, r) for r in self.routes if r.spec.wildcard_prefix
        ]
        # Made on first use: the model list of a table of 100,000 models takes a fifth of a
        # second to build, which every `GET /v1/models` would otherwise spend on the loop.
        self._cards: list[dict[str, Any] | None] | None = None
        # Per grant (one per key of the table), for a table without wildcard routes.
        self._granted: dict[Grant, list[dict[str, Any]]] = {}
        first = self.routes[0] if self.routes else None
        self.default_model = first.name if first and first.spec.wildcard_prefix is None else None
        grants = {k.key: make_grant(k.key, k.models) for k in config.auth.keys}
        for key in extra_keys:
            grants.setdefault(key, make_grant(key, ("*",)))
        self.auth = Authenticator(grants, open=config.auth.allow_unauthenticated)

    def commit(self) -> None:
        """Applies this table's upstream settings to the shared health state; called just
        before the table is served, so a build that fails later changes nothing."""
        for upstream in self.upstreams.values():
            upstream.health.configure(upstream.spec)

    def resolve(self, model: str, grant: Grant) -> tuple[Route, str]:
        """The route for `model` and the name to send upstream; unknown and forbidden alike 404."""
        route = self._exact.get(model)
        if route is not None:
            if grant.allows(model):
                return route, route.spec.model or model
            raise ModelNotFound(model)
        for prefix, route in self._wildcards:
            if model.startswith(prefix) and len(model) > len(prefix) and grant.allows(model):
                return route, model[len(prefix) :]
        raise ModelNotFound(model)

    def _card(self, model_id: str, owned_by: str, created: int | None = None) -> dict[str, Any]:
        return {
            "id": model_id,
            "object": "model",
            "created": created or self.created,
            "owned_by": owned_by,
        }

    async def _wildcard_cards(
        self, route: Route, prefix: str, http: aiohttp.ClientSession, exchange: Exchange
    ) -> list[dict[str, Any]]:
        """The route's cards, made again only when its upstream was listed again: a Letta
        server's 10,000 agents are 10,000 cards, which every `GET /v1/models` would build."""
        listing = await route.upstream_cards(http, exchange)
        if route.expanded is not None and route.expanded[0] is listing:
            return route.expanded[1]
        cards = []
        for card in listing:
            created = card.get("created")
            owner = card.get("owned_by")
            cards.append(
                self._card(
                    prefix + card["id"],
                    owner if isinstance(owner, str) else route.owned_by(),
                    created if isinstance(created, int) else None,
                )
            )
        route.expanded = (listing, cards)
        return cards

    async def model_cards(
        self, http: aiohttp.ClientSession, exchange: Exchange, grant: Grant
    ) -> list[dict[str, Any]]:
        """The cards `grant` may see, in route order. Shared and cached: not to be modified."""
        if not self._wildcards:
            granted = self._granted.get(grant)
            if granted is None:
                granted = self._granted[grant] = [
                    card for card in self._static_cards()
                    if card is not None and grant.allows(card["id"])
                ]
            return granted
        # Every wildcard route's upstream is asked at once: a slow one costs its own wait,
        # not the sum of all of them.
        listings = iter(await asyncio.gather(*(
            self._listed(route, prefix, http, exchange) for prefix, route in self._wildcards
        )))
        cards: list[dict[str, Any]] = []
        seen: set[str] = set()
        for static in self._static_cards():
            for card in (static,) if static is not None else next(listings):
                if card["id"] not in seen and grant.allows(card["id"]):
                    seen.add(card["id"])
                    cards.append(card)
        return cards

    def _static_cards(self) -> list[dict[str, Any] | None]:
        """Per route, its card; None for a wildcard route, whose cards its upstream lists."""
        if self._cards is None:
            self._cards = [
                None if route.spec.wildcard_prefix is not None
                else self._card(route.name, route.owned_by())
                for route in self.routes
            ]
        return self._cards

    async def _listed(
        self, route: Route, prefix: str, http: aiohttp.ClientSession, exchange: Exchange
    ) -> list[dict[str, Any]]:
        try:
            return await self._wildcard_cards(route, prefix, http, exchange)
        except ProxyError as exc:
            # One unreachable upstream must not hide every other model.
            log.warning("listing models of %s failed: %s", route.name, exc.message)
            return []

    async def model_card(
        self, model_id: str, http: aiohttp.ClientSession, exchange: Exchange, grant: Grant
    ) -> dict[str, Any]:
        route, _ = self.resolve(model_id, grant)
        prefix = route.spec.wildcard_prefix
        if prefix is None:
            return self._card(route.name, route.owned_by())
        for card in await self._wildcard_cards(route, prefix, http, exchange):
            if card["id"] == model_id:
                return card
        raise ModelNotFound(model_id)
