"""The `session:` block of a `custom` upstream, compiled: the id template, the lookup and
create calls, `from_response`, `without_hint` and the cache (custom-apis.md §5, §6.1)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from proxy.session_keys import WITHOUT_HINT, WithoutHint
from proxy.upstreams.custom_mappings import OVERRIDE_KEYS
from proxy.upstreams.custom_paths import Getter
from proxy.upstreams.custom_problems import Checker, Where
from proxy.upstreams.custom_requests import RequestSpec
from proxy.upstreams.custom_template import (
    BODY_PLACEHOLDERS,
    Template,
    TemplateError,
    compile_body,
)

__all__ = [
    "DEFAULT_CACHE",
    "SESSION_ID_PLACEHOLDERS",
    "CreateSpec",
    "CustomSession",
    "LookupSpec",
    "compile_session",
]

_SESSION_KEYS: Final = ("id", "lookup", "create", "carry", "from_response", "without_hint",
                        "stateless", "cache")
_LOOKUP_KEYS: Final = ("method", "path", "query", "body", "id")
_CREATE_KEYS: Final = ("method", "path", "query", "body", "ok")
_CARRY: Final = ("marker",)
DEFAULT_SESSION_ID: Final = "{{ session.key }}"
DEFAULT_CACHE: Final = 600.0

SESSION_ID_PLACEHOLDERS: Final = BODY_PLACEHOLDERS - {"session.id"}


@dataclass(frozen=True, slots=True)
class LookupSpec:
    request: RequestSpec
    id: Getter


@dataclass(frozen=True, slots=True)
class CreateSpec:
    request: RequestSpec
    # Statuses that count as success besides 2xx (409: the session exists already).
    ok: frozenset[int]


@dataclass(frozen=True, slots=True)
class CustomSession:
    id: Template = field(default_factory=lambda: compile_body(DEFAULT_SESSION_ID,
                                                              SESSION_ID_PLACEHOLDERS))
    lookup: LookupSpec | None = None
    create: CreateSpec | None = None
    from_response: Getter | None = None
    without_hint: WithoutHint = "new"
    cache: float = DEFAULT_CACHE


def compile_session(
    c: Checker, value: Any, captured: frozenset[str]
) -> tuple[CustomSession, Mapping[str, Any] | None]:
    """The compiled block, and its `stateless` overrides (merged by the caller over the
    chat call, which it compiles)."""
    where: Where = ("session",)
    entries = c.mapping(value, where)
    if not entries:
        return CustomSession(), None
    c.keys(entries, _SESSION_KEYS, where)
    options: dict[str, Any] = {}
    if "id" in entries:
        try:
            options["id"] = compile_body(entries["id"], SESSION_ID_PLACEHOLDERS, None)
        except TemplateError as exc:
            message = exc.message
            if "session.id" in message and "unknown" in message:
                message = "the session id cannot be made from `{{ session.id }}` itself"
            c.error((*where, "id", *exc.where), message)
    if entries.get("lookup") is not None:
        spot = (*where, "lookup")
        raw = c.mapping(entries["lookup"], spot)
        if raw is not None:
            c.keys(raw, _LOOKUP_KEYS, spot)
            request = c.request(raw, spot, c.method(raw, spot, "GET"),
                                SESSION_ID_PLACEHOLDERS, captured)
            if "id" not in raw:
                c.error(spot, "missing required key 'id' (the path of the session id in the "
                              "lookup's answer)")
            else:
                getter = c.paths(raw["id"], (*spot, "id"))
                if request is not None and getter is not None:
                    options["lookup"] = LookupSpec(request, getter)
    if entries.get("create") is not None:
        spot = (*where, "create")
        raw = c.mapping(entries["create"], spot)
        if raw is not None:
            c.keys(raw, _CREATE_KEYS, spot)
            request = c.request(raw, spot, c.method(raw, spot, "POST"), BODY_PLACEHOLDERS,
                                captured)
            ok: set[int] = set()
            raw_ok = raw.get("ok", [])
            items = raw_ok if isinstance(raw_ok, list) else [raw_ok]
            for item in items:
                if isinstance(item, bool) or not isinstance(item, int) or not (
                        100 <= item <= 599):
                    c.error((*spot, "ok"), f"expected HTTP statuses (100-599), got {item!r}")
                else:
                    ok.add(item)
            if request is not None:
                options["create"] = CreateSpec(request, frozenset(ok))
    if "carry" in entries and c.choice(entries["carry"], (*where, "carry"), _CARRY):
        # Refused rather than accepted and ignored: a chat would silently lose its session.
        c.error((*where, "carry"), "`carry: marker` is not supported yet; use `lookup` (the "
                                   "server finds the session by its owner) or "
                                   "`from_response` (remembered per worker for `cache` "
                                   "seconds)")
    if "from_response" in entries:
        getter = c.paths(entries["from_response"], (*where, "from_response"))
        if getter is not None:
            options["from_response"] = getter
    issued = [k for k in ("lookup", "from_response") if entries.get(k) is not None]
    for name in ("id", "create"):
        # Both would be accepted and then never used: the server's id wins.
        if issued and entries.get(name) is not None:
            c.error((*where, name), f"`{name}` is for ids the proxy derives; with "
                                    f"`{issued[0]}` the server issues them, so `{name}` "
                                    "would never be used")
    without_hint = c.choice(entries.get("without_hint", "new"), (*where, "without_hint"),
                            WITHOUT_HINT) or "new"
    options["without_hint"] = without_hint
    stateless: Mapping[str, Any] | None = None
    if "stateless" in entries:
        raw = c.mapping(entries["stateless"], (*where, "stateless"))
        if raw is not None:
            c.keys(raw, OVERRIDE_KEYS, (*where, "stateless"))
            stateless = {k: raw[k] for k in OVERRIDE_KEYS if k in raw}
            if without_hint != "stateless":
                c.error((*where, "stateless"), "used only with `without_hint: stateless`")
    if "cache" in entries:
        cache = entries["cache"]
        # NaN would never expire (every comparison with it is false); inf never does either.
        if (isinstance(cache, bool) or not isinstance(cache, int | float) or cache < 0
                or not math.isfinite(cache)):
            c.error((*where, "cache"), f"expected a finite number of seconds (0 turns the "
                                       f"cache off), got {cache!r}")
        else:
            options["cache"] = float(cache)
    return CustomSession(**options), stateless

