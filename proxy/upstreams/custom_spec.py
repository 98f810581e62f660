"""The compiled `custom` block: frozen dataclasses built once from plain YAML values.

`compile_custom(block)` validates the custom-specific keys of one upstream (custom-apis.md §6)
and compiles every template, path and rule, so a request renders and an event is read with
no parsing left to do. Every problem names its key path inside the block
(`stream.rules[2].text: ...`), so the config reader can add `routes.yaml:LINE` to it; all
problems are collected, not only the first. Warnings (§6.8) come back on the spec.

The parts live in modules of their own: problems and the generic readers
(custom_problems.py), the calls (custom_requests.py), the reading of answers
(custom_rules.py, compiled by custom_mappings.py), the session block
(custom_session_spec.py); this module puts them together and checks them across sections.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final, Literal, cast

from proxy.upstreams.custom_mappings import (
    OVERRIDE_KEYS,
    compile_message_format,
    compile_stream,
    compile_sync,
)
from proxy.upstreams.custom_paths import Getter
from proxy.upstreams.custom_problems import Checker, CustomSpecError, SpecProblem, Where, kind_of
from proxy.upstreams.custom_requests import RequestSpec, build_request
from proxy.upstreams.custom_rules import (
    Condition,
    Rule,
    StreamMapping,
    SyncMapping,
    UsageMapping,
)
from proxy.upstreams.custom_session_spec import (
    CreateSpec,
    CustomSession,
    LookupSpec,
    compile_session,
)
from proxy.upstreams.custom_template import BODY_PLACEHOLDERS, TemplateError, deep_merge
from proxy.upstreams.custom_turn import MessageFormat

__all__ = [
    "COMMON_KEYS",
    "CUSTOM_KEYS",
    "Condition",
    "CreateSpec",
    "CustomSession",
    "CustomSpec",
    "CustomSpecError",
    "LookupSpec",
    "Mode",
    "ModelsSpec",
    "RequestSpec",
    "Rule",
    "SpecProblem",
    "StreamMapping",
    "SyncMapping",
    "UsageMapping",
    "compile_custom",
]

Mode = Literal["client", "stream", "sync"]
MODES: Final[tuple[str, ...]] = ("client", "stream", "sync")

COMMON_KEYS: Final[tuple[str, ...]] = (
    "kind", "url", "api_key", "headers", "forward_headers", "timeouts", "keepalive",
    "max_concurrency", "queue_timeout", "circuit",
)
"""Upstream keys every HTTP kind shares: read by the config reader, skipped here."""

CUSTOM_KEYS: Final[tuple[str, ...]] = (
    "mode", "request", "sync", "stream", "session", "cancel", "models", "error_message",
)
_REQUEST_KEYS: Final = ("method", "path", "query", "body", "message_format")
_CANCEL_KEYS: Final = ("method", "path", "query", "body")
_MODELS_KEYS: Final = ("method", "path", "query", "body", "items", "id", "name")

DEFAULT_ERROR_MESSAGE: Final = ("message", "error.message", "error", "detail")

_MEMORY: Final = frozenset({"session.id", "session.key", "session.uuid", "history",
                            "messages", "transcript"})
_HISTORY: Final = frozenset({"history", "messages", "transcript"})


@dataclass(frozen=True, slots=True)
class ModelsSpec:
    request: RequestSpec
    items: Getter
    id: Getter
    name: Getter | None


@dataclass(frozen=True, slots=True)
class CustomSpec:
    mode: Mode
    message_format: MessageFormat
    # The chat call in its four variants: (sync | stream) x (with a session | stateless).
    sync_call: RequestSpec
    stream_call: RequestSpec
    sync_stateless_call: RequestSpec
    stream_stateless_call: RequestSpec
    sync: SyncMapping | None
    stream: StreamMapping | None
    session: CustomSession
    cancel: RequestSpec | None
    models: ModelsSpec | None
    error_message: Getter
    warnings: tuple[SpecProblem, ...] = ()
    used: frozenset[str] = frozenset()

    def call(self, *, stream: bool, stateless: bool = False) -> RequestSpec:
        if stateless:
            return self.stream_stateless_call if stream else self.sync_stateless_call
        return self.stream_call if stream else self.sync_call

    def upstream_streams(self, client_streams: bool) -> bool:
        """Whether the upstream call streams, by `mode` (§6.6)."""
        if self.mode == "client":
            return client_streams
        return self.mode == "stream"

    @property
    def placeholders(self) -> frozenset[str]:
        """Every placeholder the requests of one chat request can use: the chat call in all
        its variants, the session id, lookup and create, and cancel (`captured.*` too).
        Worked out once, when the block compiles."""
        return self.used

    def _used(self) -> frozenset[str]:
        names: set[str] = set(self.session.id.names)
        calls = [self.sync_call, self.stream_call, self.sync_stateless_call,
                 self.stream_stateless_call, self.cancel]
        if self.session.lookup is not None:
            calls.append(self.session.lookup.request)
        if self.session.create is not None:
            calls.append(self.session.create.request)
        for call in calls:
            if call is not None:
                names |= call.names
        return frozenset(names)


def compile_custom(
    block: Mapping[str, Any],
    *,
    skip: Collection[str] = COMMON_KEYS,
) -> CustomSpec:
    """Compiles the custom-specific keys of one `kind: custom` upstream.

    `skip` lists the keys the caller reads itself (url, headers, timeouts, ...). Raises
    CustomSpecError listing every problem; warnings are on the returned spec.
    """
    c = Checker()
    if not isinstance(block, Mapping):
        raise CustomSpecError([SpecProblem((), f"expected a mapping, got {kind_of(block)}")])
    c.keys(block, CUSTOM_KEYS, (), skip)

    mode = cast(Mode, c.choice(block.get("mode", "client"), ("mode",), MODES) or "client")

    sync = compile_sync(c, block["sync"], ("sync",)) if "sync" in block else None
    stream = compile_stream(c, block["stream"], ("stream",)) if "stream" in block else None
    # What the stream rules capture is what cancel and session requests may use.
    captured = _raw_captures(block.get("stream"))

    # -- request and its overrides -----------------------------------------------------------
    raw_request = c.mapping(block.get("request"), ("request",))
    if "request" not in block:
        c.error((), "missing required key 'request' (the path and body of the chat call)")
    request = raw_request or {}
    c.keys(request, _REQUEST_KEYS, ("request",))
    method = c.method(request, ("request",), "POST")
    message_format = compile_message_format(c, request.get("message_format"),
                                      ("request", "message_format"))
    pieces_ok = True
    overrides: dict[str, Mapping[str, Any]] = {}
    for section in ("sync", "stream"):
        raw = block.get(section)
        overrides[section] = {k: raw[k] for k in OVERRIDE_KEYS if k in raw} if isinstance(
            raw, Mapping) else {}
    base = {k: request[k] for k in OVERRIDE_KEYS if k in request}
    for where, piece in (("request",), base), (("sync",), overrides["sync"]), (
            ("stream",), overrides["stream"]):
        for kind, value in piece.items():
            if kind == "body" and value is None:
                continue
            pieces_ok = c.check_template(kind, value, where, BODY_PLACEHOLDERS, None) \
                and pieces_ok
    if method == "GET" and any(p.get("body") is not None for p in
                               (base, overrides["sync"], overrides["stream"])):
        c.error(("request", "method"), "a GET request sends no body; remove `body` or use "
                                       "POST")
        pieces_ok = False

    # -- session ---------------------------------------------------------------------------
    session, stateless_piece = compile_session(c, block.get("session"), captured)
    if stateless_piece:
        for kind, value in stateless_piece.items():
            pieces_ok = c.check_template(kind, value, ("session", "stateless"),
                                         BODY_PLACEHOLDERS, None) and pieces_ok

    # -- cancel and models --------------------------------------------------------------------
    cancel = None
    if block.get("cancel") is not None:
        raw_cancel = c.mapping(block["cancel"], ("cancel",))
        if raw_cancel is not None:
            c.keys(raw_cancel, _CANCEL_KEYS, ("cancel",))
            cancel = c.request(raw_cancel, ("cancel",), c.method(raw_cancel, ("cancel",),
                               "POST"), BODY_PLACEHOLDERS, captured)
    models = None
    if block.get("models") is not None:
        models = _models(c, block["models"])
    error_message = c.paths(block.get("error_message", list(DEFAULT_ERROR_MESSAGE)),
                            ("error_message",))

    # -- what the mode needs ------------------------------------------------------------------
    if mode in ("client", "sync") and "sync" not in block:
        why = ("`mode: client` calls the upstream without streaming when the client does not "
               "stream; or set `mode: stream`" if mode == "client"
               else "`mode: sync` always calls the upstream without streaming")
        c.error((), f"missing required key 'sync' ({why})")
    if mode in ("client", "stream") and "stream" not in block:
        why = ("`mode: client` streams from the upstream when the client streams; or set "
               "`mode: sync`" if mode == "client"
               else "`mode: stream` always streams from the upstream")
        c.error((), f"missing required key 'stream' ({why})")

    if c.problems or not pieces_ok or error_message is None:
        raise CustomSpecError(c.problems or [SpecProblem((), "invalid custom block")])

    calls: dict[tuple[bool, bool], RequestSpec] = {}
    try:
        for streaming in (False, True):
            section = "stream" if streaming else "sync"
            merged = deep_merge(base, overrides[section])
            calls[(streaming, False)] = build_request(method, merged, BODY_PLACEHOLDERS, None)
            calls[(streaming, True)] = build_request(
                method, deep_merge(merged, stateless_piece or {}), BODY_PLACEHOLDERS, None)
    except TemplateError as exc:
        raise CustomSpecError([SpecProblem(("request", *exc.where), exc.message)]) from None

    spec = CustomSpec(
        mode=mode,
        message_format=message_format,
        sync_call=calls[(False, False)],
        stream_call=calls[(True, False)],
        sync_stateless_call=calls[(False, True)],
        stream_stateless_call=calls[(True, True)],
        sync=sync,
        stream=stream,
        session=session,
        cancel=cancel,
        models=models,
        error_message=error_message,
    )
    _lint(c, spec)
    if c.problems:
        raise CustomSpecError(c.problems)
    return replace(spec, warnings=tuple(c.warnings), used=spec._used())


def _raw_captures(stream: Any) -> frozenset[str]:
    """The names the stream rules capture, read before the rules compile, so that a
    `captured.NAME` is checked against them even when a rule has a problem of its own."""
    rules = stream.get("rules") if isinstance(stream, Mapping) else None
    if not isinstance(rules, list):
        return frozenset()
    return frozenset(
        name
        for rule in rules
        if isinstance(rule, Mapping) and isinstance(rule.get("capture"), Mapping)
        for name in rule["capture"]
        if isinstance(name, str)
    )


def _models(c: Checker, value: Any) -> ModelsSpec | None:
    where: Where = ("models",)
    raw = c.mapping(value, where)
    if raw is None:
        return None
    c.keys(raw, _MODELS_KEYS, where)
    # The listing runs outside any chat request: there is nothing to fill a placeholder.
    request = c.request(raw, where, c.method(raw, where, "GET"), (), None)
    items = c.paths(raw.get("items", "$"), (*where, "items"))
    ident = c.paths(raw.get("id", "id"), (*where, "id"))
    name = c.paths(raw["name"], (*where, "name")) if "name" in raw else None
    if request is None or items is None or ident is None:
        return None
    return ModelsSpec(request, items, ident, name)


def _lint(c: Checker, spec: CustomSpec) -> None:
    """Checks across sections, and the warnings of §6.8."""
    session = spec.session
    stateless = session.without_hint == "stateless"
    if stateless:
        for call, section in ((spec.sync_stateless_call, "sync"),
                              (spec.stream_stateless_call, "stream")):
            if "session.id" in call.path.names:
                needed = spec.mode == "client" or spec.mode == section
                if needed:
                    c.error(("session", "stateless"),
                            "without a session hint `{{ session.id }}` is null, but the "
                            f"{section} call's path uses it: give `session.stateless` a "
                            "`path`")
                    break
    if (spec.mode != "sync" and spec.stream is not None
            and not any(rule.end or rule.is_error for rule in spec.stream.rules)):
        c.warn(("stream", "rules"), "no rule has `end` or `error`: a truncated or failed "
                                        "stream will look like a complete answer")
    if not (spec.sync_call.names | spec.stream_call.names) & _MEMORY:
        c.warn(("request",), "the request sends no session placeholder and no "
                             "`{{ history }}`/`{{ messages }}`: the agent sees each message "
                             "without the ones before it (no memory)")
    if stateless:
        stateless_used = spec.sync_stateless_call.names | spec.stream_stateless_call.names
        if not stateless_used & _HISTORY:
            c.warn(("session", "without_hint"), "`without_hint: stateless`, but the "
                                                "stateless request sends no `{{ history }}`, "
                                                "`{{ messages }}` or `{{ transcript }}`")
