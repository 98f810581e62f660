"""The route table: which upstream serves which model, and the model cards clients list."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from proxy.auth import Authenticator, Grant, make_grant
from proxy.config import Config, ModelSpec
from proxy.errors import ModelNotFound, ProxyError, UpstreamUnavailable
from proxy.upstreams import build_upstream
from proxy.upstreams.base import Upstream

log = logging.getLogger(__name__)

LISTING_TTL = 30.0


@dataclass(slots=True)
class Route:
    spec: ModelSpec
    upstreams: tuple[Upstream, ...]
    # Wildcard routes cache the upstream's model list, so listing stays cheap and new models
    # still appear within LISTING_TTL seconds.
    _listing: list[dict[str, Any]] = field(default_factory=list)
    _listed_at: float = -LISTING_TTL

    @property
    def stateful(self) -> bool:
        """Its upstream keeps conversations, so requests carry a session hint."""
        return self.upstreams[0].kind == "letta"

    @property
    def name(self) -> str:
        return self.spec.name

    def owned_by(self) -> str:
        return self.spec.owned_by or self.upstreams[0].name

    async def upstream_cards(self, http: aiohttp.ClientSession) -> list[dict[str, Any]]:
        now = time.monotonic()
        if now - self._listed_at < LISTING_TTL:
            return self._listing
        last: ProxyError | None = None
        for upstream in self.upstreams:
            try:
                self._listing = await upstream.list_models(http)
            except UpstreamUnavailable as exc:
                last = exc
                continue
            self._listed_at = now
            return self._listing
        assert last is not None
        raise last


class RouteTable:
    """Immutable once built: a request reads it once and keeps it to the end."""

    def __init__(self, config: Config, extra_keys: Iterable[str] = ()) -> None:
        self.config = config
        self.version = config.version
        self.loaded_at = time.time()
        self.created = int(self.loaded_at)
        upstreams = {name: build_upstream(spec) for name, spec in config.upstreams.items()}
        self.upstreams = upstreams
        self.routes: list[Route] = [
            Route(m, tuple(upstreams[u] for u in m.upstreams)) for m in config.models
        ]
        self._exact = {r.name: r for r in self.routes if r.spec.wildcard_prefix is None}
        self._wildcards = [
            (r.spec.wildcard_prefix, r) for r in self.routes if r.spec.wildcard_prefix
        ]
        first = self.routes[0] if self.routes else None
        self.default_model = first.name if first and first.spec.wildcard_prefix is None else None
        grants = {k.key: make_grant(k.key, k.models) for k in config.auth.keys}
        for key in extra_keys:
            grants.setdefault(key, make_grant(key, ("*",)))
        self.auth = Authenticator(grants, open=config.auth.allow_unauthenticated)
        self.has_keys = bool(grants)

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
        self, route: Route, prefix: str, http: aiohttp.ClientSession
    ) -> list[dict[str, Any]]:
        cards = []
        for card in await route.upstream_cards(http):
            created = card.get("created")
            owner = card.get("owned_by")
            cards.append(
                self._card(
                    prefix + card["id"],
                    owner if isinstance(owner, str) else route.owned_by(),
                    created if isinstance(created, int) else None,
                )
            )
        return cards

    async def model_cards(self, http: aiohttp.ClientSession, grant: Grant) -> list[dict[str, Any]]:
        cards: list[dict[str, Any]] = []
        seen: set[str] = set()
        for route in self.routes:
            prefix = route.spec.wildcard_prefix
            if prefix is None:
                new = [self._card(route.name, route.owned_by())]
            else:
                try:
                    new = await self._wildcard_cards(route, prefix, http)
                except ProxyError as exc:
                    # One unreachable upstream must not hide every other model.
                    log.warning("listing models of %s failed: %s", route.name, exc.message)
                    continue
            for card in new:
                if card["id"] not in seen and grant.allows(card["id"]):
                    seen.add(card["id"])
                    cards.append(card)
        return cards

    async def model_card(
        self, model_id: str, http: aiohttp.ClientSession, grant: Grant
    ) -> dict[str, Any]:
        route, _ = self.resolve(model_id, grant)
        prefix = route.spec.wildcard_prefix
        if prefix is None:
            return self._card(route.name, route.owned_by())
        for card in await self._wildcard_cards(route, prefix, http):
            if card["id"] == model_id:
                return card
        raise ModelNotFound(model_id)
