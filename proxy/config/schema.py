"""The route table's schema: `upstreams`, `models` and `auth`, from YAML text to Config.

What differs between upstream kinds is not here: each kind's declaration (proxy/config/kind.py,
registered in proxy/upstreams/kinds.py) says which keys it takes and reads its own.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from typing import cast

from yaml.nodes import MappingNode, Node, ScalarNode

from proxy.config.auth_keys import read_auth
from proxy.config.kind import KindDeclaration
from proxy.config.problems import FILE, ConfigError
from proxy.config.reader import Block, Reader, alternatives, describe, join, line_of, unknown
from proxy.config.specs import (
    AuthSpec,
    Config,
    ModelSpec,
    RouteFields,
    Timeouts,
    UpstreamKind,
    UpstreamSpec,
)
from proxy.config.upstream_keys import (
    URL,
    read_api_key,
    read_forward_headers,
    read_headers,
    read_resilience,
    read_timeouts,
    read_url,
)

TOP_KEYS: tuple[str, ...] = ("upstreams", "models", "auth")
ROUTE_KEYS: tuple[str, ...] = ("upstream", "owned_by")
_UPSTREAM_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def declarations() -> tuple[Mapping[str, KindDeclaration], tuple[str, ...]]:
    """The registered kinds and the reserved names; imported here, when first needed, because
    the kinds' modules import this package."""
    from proxy.upstreams.kinds import KINDS, RESERVED

    return KINDS, RESERVED


def parse_config(
    text: str, filename: str = "routes.yaml", environ: Mapping[str, str] | None = None
) -> Config:
    """Validates a route table given as text; raises ConfigError listing every problem found."""
    reader = Reader(filename, os.environ if environ is None else environ)
    built = _Schema(reader).read(text)
    if reader.problems or built is None:
        # Models are checked after upstreams wherever they sit in the file; report in file order.
        raise ConfigError(sorted(reader.problems, key=lambda p: p.line))
    upstreams, models, auth = built
    return Config(
        source=filename,
        version=hashlib.sha256(text.encode("utf-8")).hexdigest()[:12],
        upstreams=upstreams,
        models=tuple(models),
        auth=auth,
        warnings=tuple(sorted(reader.warnings, key=lambda p: p.line)),
    )


def _model_name_problem(name: str) -> str | None:
    if not name:
        return "a model name cannot be empty"
    if "*" not in name:
        return None
    prefix = name[:-2]
    if not name.endswith("/*") or not prefix or "*" in prefix:
        return "a wildcard model must have the form 'prefix/*'"
    return None


Built = tuple[dict[str, UpstreamSpec], list[ModelSpec], AuthSpec]


class _Schema:
    def __init__(self, reader: Reader) -> None:
        self.r = reader
        self.kinds, self.reserved = declarations()
        # Every upstream name, even a broken one, with its kind if that much was readable and
        # is supported: routes refer to them by name.
        self.upstream_kinds: dict[str, KindDeclaration | None] = {}
        self.specs: dict[str, UpstreamSpec] = {}
        self.all_upstream_keys = {key for d in self.kinds.values()
                                  for key in (*d.keys, *d.option_keys)}
        self.all_route_keys = tuple(dict.fromkeys(
            [*ROUTE_KEYS, *(key for d in self.kinds.values() for key in d.route_keys)]))

    def read(self, text: str) -> Built | None:
        root = self.r.compose(text)
        if root is None:
            return None
        if not isinstance(root, MappingNode):
            self.r.error(root, FILE, "expected a mapping with upstreams, models and auth, "
                         f"got {describe(root)}")
            return None
        top = self.r.block(root, "", keys=TOP_KEYS)
        assert top is not None
        for required in ("upstreams", "models"):
            if required not in top:
                self.r.error(root, FILE, f"missing required key '{required}'")
        upstreams: dict[str, UpstreamSpec] = {}
        if "upstreams" in top:
            upstreams = self.upstreams(top.key_node("upstreams"), top.node("upstreams"))
        models = self.models(top.key_node("models"), top.node("models")) if "models" in top else []
        auth = read_auth(self.r, top.node("auth")) if "auth" in top else AuthSpec()
        return upstreams, models, auth

    # -- upstreams -------------------------------------------------------------------------

    def upstreams(self, key: ScalarNode, node: Node) -> dict[str, UpstreamSpec]:
        block = self.r.block(node, "upstreams")
        if block is None:
            return {}
        if not block:
            self.r.error(key, "upstreams", "no upstreams defined; at least one is required")
        specs: dict[str, UpstreamSpec] = {}
        for name, (name_node, body) in block.entries.items():
            path = block.at(name)
            if not _UPSTREAM_NAME.fullmatch(name):
                self.r.error(name_node, path, "an upstream name may only contain letters, "
                             "digits, '_', '.' and '-'")
            upstream = self.r.block(body, path, anchor=name_node)
            if upstream is None:
                self.upstream_kinds[name] = None
                continue
            kind = self.kind(upstream)
            self.upstream_kinds[name] = kind
            if kind is not None:
                spec = self.upstream(name, upstream, kind)
                if spec is not None:
                    specs[name] = spec
        self.specs = specs
        return specs

    def kind(self, upstream: Block) -> KindDeclaration | None:
        if not self.r.require(upstream, "kind", f" ({alternatives(list(self.kinds))})"):
            return None
        node, path = upstream.node("kind"), upstream.at("kind")
        kind = self.r.string(node, path)
        if kind is None:
            return None
        if kind in self.reserved:
            self.r.error(node, path, f"upstream kind '{kind}' is not yet supported")
        elif kind not in self.kinds:
            self.r.error(node, path, unknown("kind", kind, self.kinds))
        return self.kinds.get(kind)

    def upstream(self, name: str, block: Block, kind: KindDeclaration) -> UpstreamSpec | None:
        self.upstream_keys(block, kind)

        def given(key: str) -> bool:
            return key in block and key in kind.keys

        url = None
        if given(URL):
            url = read_url(self.r, block.node(URL), block.at(URL))
            url = kind.normalise_url(url) if url is not None else None
        elif URL in kind.keys and kind.url_example is not None:
            self.r.require(block, URL, f" (the server's base URL, e.g. {kind.url_example})")
        api_key = None
        if given("api_key"):
            api_key = read_api_key(self.r, block.node("api_key"), block.at("api_key"))
        headers: dict[str, str] = {}
        if given("headers"):
            headers = read_headers(self.r, block.node("headers"), block.at("headers"))
        forward: tuple[str, ...] = ()
        if given("forward_headers"):
            forward = read_forward_headers(self.r, block.node("forward_headers"),
                                           block.at("forward_headers"))
        timeouts = Timeouts()
        if given("timeouts"):
            timeouts = read_timeouts(self.r, block.node("timeouts"), block.at("timeouts"))
        resilience = read_resilience(self.r, block, kind.keys)
        options = kind.read_options(self.r, block) if kind.read_options is not None else None
        if url is None and kind.url_example is not None:
            return None
        return UpstreamSpec(
            name=name, kind=cast(UpstreamKind, kind.name), line=line_of(block.anchor), url=url,
            api_key=api_key, headers=headers, forward_headers=forward, timeouts=timeouts,
            options=options, **resilience,
        )

    def upstream_keys(self, block: Block, kind: KindDeclaration) -> None:
        """Reports the keys `kind` does not take: another kind's, or unknown ones."""
        accepted = ("kind", *kind.keys, *kind.option_keys)
        for key in block:
            if key in accepted:
                continue
            if key in self.all_upstream_keys:
                self.r.error(block.key_node(key), block.at(key), f"not used by kind {kind.name}")
            else:
                self.r.error(block.key_node(key), block.at(key), unknown("key", key, accepted))

    # -- models ----------------------------------------------------------------------------

    def models(self, key: ScalarNode, node: Node) -> list[ModelSpec]:
        block = self.r.block(node, "models", duplicate="duplicate model name")
        if block is None:
            return []
        if not block:
            self.r.error(key, "models", "no models defined; at least one is required")
        specs = []
        for name, (name_node, body) in block.entries.items():
            spec = self.model(name, name_node, body)
            if spec is not None:
                specs.append(spec)
        return specs

    def model(self, name: str, name_node: ScalarNode, node: Node) -> ModelSpec | None:
        path = join("models", name)
        problem = _model_name_problem(name)
        if problem is not None:
            self.r.error(name_node, path, problem)
        wildcard = problem is None and name.endswith("/*")
        block = self.r.block(node, path, keys=self.all_route_keys, anchor=name_node)
        if block is None:
            return None
        upstreams: tuple[str, ...] = ()
        if self.r.require(block, "upstream"):
            upstreams = self.upstream_refs(block.node("upstream"), block.at("upstream"), wildcard)
        kind = self.route_kind(block, upstreams)
        fields = RouteFields()
        if kind is not None:
            self.refuse_route_keys(block, kind)
            if kind.read_route is not None:
                specs = tuple(self.specs[u] for u in upstreams if u in self.specs)
                fields = kind.read_route(self.r, block, wildcard=wildcard, upstreams=specs)
        rewrite = None
        if "model" in block and (kind is None or "model" in kind.route_keys):
            if wildcard:
                self.r.error(block.key_node("model"), block.at("model"), "a wildcard forwards "
                             "the upstream's own model ids; 'model' cannot be set")
            else:
                rewrite = self.r.nonempty_string(block.node("model"), block.at("model"))
        owned_by = None
        if "owned_by" in block:
            owned_by = self.r.nonempty_string(block.node("owned_by"), block.at("owned_by"))
        if not upstreams:
            return None
        return ModelSpec(
            name=name, upstreams=upstreams, line=line_of(name_node), model=rewrite,
            owned_by=owned_by, agent=fields.agent, client_system=fields.client_system,
            show=fields.show, session=fields.session, options=fields.options,
        )

    def route_kind(self, block: Block, upstreams: tuple[str, ...]) -> KindDeclaration | None:
        """The kind whose declaration reads this route: the one of its upstreams, or of the
        first that is not mixable. None when no upstream's kind is known."""
        kinds = [k for k in dict.fromkeys(self.upstream_kinds.get(u) for u in upstreams) if k]
        if not kinds:
            return None
        fixed = [k for k in kinds if not k.mixable]
        if fixed and len(kinds) > 1:
            self.r.error(block.node("upstream"), block.at("upstream"), f"a route to "
                         f"{fixed[0].name} upstreams cannot also list upstreams of another kind")
        return fixed[0] if fixed else kinds[0]

    def refuse_route_keys(self, block: Block, kind: KindDeclaration) -> None:
        for key in block:
            if key in ROUTE_KEYS or key in kind.route_keys or key not in self.all_route_keys:
                continue
            message = kind.route_refusals.get(key)
            if message is None:
                takers = [k for k, d in self.kinds.items() if key in d.route_keys]
                message = f"'{key}' is only for routes to {alternatives(takers)} upstreams"
            self.r.error(block.key_node(key), block.at(key), message)

    def upstream_refs(self, node: Node, path: str, wildcard: bool) -> tuple[str, ...]:
        items = self.r.one_or_many(node, path, "an upstream name or a list of names")
        if items is None:
            return ()
        if not items:
            self.r.error(node, path, "the list is empty; name at least one upstream")
        names: list[str] = []
        for item, item_path in items:
            name = self.r.string(item, item_path)
            if name is None:
                continue
            kind = self.upstream_kinds.get(name)
            if name not in self.upstream_kinds:
                self.r.error(item, item_path, unknown("upstream", name, self.upstream_kinds))
            elif name in names:
                self.r.error(item, item_path, f"upstream '{name}' is listed twice")
            elif wildcard and kind is not None and not kind.lists_models:
                self.r.error(item, item_path, f"'{name}' is kind {kind.name}, which has no "
                             "model list for a wildcard to expand")
            names.append(name)
        return tuple(dict.fromkeys(names))
