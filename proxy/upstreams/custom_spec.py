"""The compiled `custom` block: frozen dataclasses built once from plain YAML values.

`compile_custom(block)` validates the custom-specific keys of one upstream (custom-apis.md §6)
and compiles every template, path and rule, so a request renders and an event is read with
no parsing left to do. Every problem names its key path inside the block
(`stream.rules[2].text: ...`), so the config reader can add `routes.yaml:LINE` to it; all
problems are collected, not only the first. Warnings (§6.8) come back on the spec.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal, TypeAlias, cast

from proxy.session_keys import WITHOUT_HINT, WithoutHint
from proxy.upstreams.custom_framing import FRAMINGS, Framing
from proxy.upstreams.custom_paths import Getter, Path, PathError, compile_path, compile_paths
from proxy.upstreams.custom_template import (
    BODY_PLACEHOLDERS,
    PathTemplate,
    QueryTemplate,
    Template,
    TemplateError,
    compile_body,
    compile_path_template,
    compile_query,
    deep_merge,
)
from proxy.upstreams.custom_turn import DEFAULT_ROLES, MessageFormat

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
METHODS: Final[tuple[str, ...]] = ("GET", "POST", "PUT", "PATCH", "DELETE")

COMMON_KEYS: Final[tuple[str, ...]] = (
    "kind", "url", "api_key", "headers", "forward_headers", "timeouts", "keepalive",
    "max_concurrency", "queue_timeout", "circuit",
)
"""Upstream keys every HTTP kind shares: read by the config reader, skipped here."""

CUSTOM_KEYS: Final[tuple[str, ...]] = (
    "mode", "request", "sync", "stream", "session", "cancel", "models", "error_message",
)
_REQUEST_KEYS: Final = ("method", "path", "query", "body", "message_format")
_OVERRIDE_KEYS: Final = ("path", "query", "body")
_SYNC_KEYS: Final = (*_OVERRIDE_KEYS, "text", "join", "reasoning", "usage", "finish", "error",
                     "require_text")
_STREAM_KEYS: Final = (*_OVERRIDE_KEYS, "framing", "rules")
_RULE_KEYS: Final = ("when", "has", "text", "cumulative", "recap", "separator", "reasoning",
                     "usage", "usage_sum", "finish", "capture", "error", "end")
_USAGE_KEYS: Final = ("prompt_tokens", "completion_tokens", "total_tokens")
_FORMAT_KEYS: Final = ("role_key", "content_key", "roles")
_SESSION_KEYS: Final = ("id", "lookup", "create", "carry", "from_response", "without_hint",
                        "stateless", "cache")
_LOOKUP_KEYS: Final = ("method", "path", "query", "body", "id")
_CREATE_KEYS: Final = ("method", "path", "query", "body", "ok")
_CANCEL_KEYS: Final = ("method", "path", "query", "body")
_MODELS_KEYS: Final = ("method", "path", "query", "body", "items", "id", "name")
_CARRY: Final = ("marker",)

DEFAULT_ERROR_MESSAGE: Final = ("message", "error.message", "error", "detail")
DEFAULT_SESSION_ID: Final = "{{ session.key }}"
DEFAULT_CACHE: Final = 600.0

_SESSION_ID_PLACEHOLDERS: Final = BODY_PLACEHOLDERS - {"session.id"}
_MEMORY: Final = frozenset({"session.id", "session.key", "session.uuid", "history",
                            "messages", "transcript"})
_HISTORY: Final = frozenset({"history", "messages", "transcript"})
_CAPTURE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")

Where: TypeAlias = tuple[str | int, ...]


# -- what a problem looks like --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpecProblem:
    """One problem in a custom block. `where` is the key path inside the block."""

    where: Where
    message: str

    @property
    def path(self) -> str:
        return render_where(self.where)

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.where else self.message


def render_where(where: Where) -> str:
    out = ""
    for part in where:
        if isinstance(part, int):
            out += f"[{part}]"
        elif out:
            out += f".{part}"
        else:
            out = part
    return out


class CustomSpecError(ValueError):
    def __init__(self, problems: list[SpecProblem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


# -- the compiled spec --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One upstream HTTP call: method, path + query, body; every part compiled."""

    method: str
    path: PathTemplate
    query: QueryTemplate | None
    body: Template | None
    names: frozenset[str]

    def target(self, values: Mapping[str, Any]) -> str:
        """The encoded path and query to append to the upstream's `url`."""
        path = self.path.render(values)
        if self.query is None:
            return path
        query = self.query.render(values)
        if not query:
            return path
        return f"{path}{'&' if '?' in path else '?'}{query}"

    def render_body(self, values: Mapping[str, Any]) -> Any:
        """The JSON body to send; None when the call has none (GET)."""
        return None if self.body is None else self.body.render(values)


@dataclass(frozen=True, slots=True)
class UsageMapping:
    prompt_tokens: Getter | None
    completion_tokens: Getter | None
    total_tokens: Getter | None
    # When the three paths share a parent (`metadata.usage.*`), it is read once and the
    # counts are its keys: an event without usage costs one lookup, not three.
    parent: Getter | None = None
    keys: tuple[str | None, str | None, str | None] = (None, None, None)


@dataclass(frozen=True, slots=True)
class SyncMapping:
    text: Getter
    join: str = ""
    reasoning: Getter | None = None
    usage: UsageMapping | None = None
    finish: Getter | None = None
    error: Getter | None = None
    require_text: bool = False


@dataclass(frozen=True, slots=True)
class Condition:
    """`when: {path: value | [values]}`: the value at `path` equals one of `values`.

    `strict` when a value is a number or a boolean: JSON `true` must not equal `1`.
    """

    path: Path
    values: tuple[Any, ...]
    strict: bool


@dataclass(frozen=True, slots=True)
class Rule:
    when: tuple[Condition, ...] = ()
    has: tuple[Path, ...] = ()
    text: Getter | None = None
    cumulative: bool = False
    recap: bool = False
    separator: str = ""
    reasoning: Getter | None = None
    usage: UsageMapping | None = None
    usage_sum: bool = False
    finish: Getter | None = None
    capture: tuple[tuple[str, Getter], ...] = ()
    # `is_error`: the event is a stream error; `error` finds its message (None: a generic one).
    is_error: bool = False
    error: Getter | None = None
    end: bool = False


Pick: TypeAlias = Callable[[Any, str], int]


@dataclass(frozen=True, slots=True)
class StreamMapping:
    framing: Framing
    rules: tuple[Rule, ...]
    # EOF before an `end` event is a truncated stream only when some rule can end it.
    has_end: bool
    captures: frozenset[str]
    # `pick(payload, event_name)`: the index of the first rule that matches, or -1.
    pick: Pick


def _same(value: Any, expected: tuple[Any, ...]) -> bool:
    """Equality that keeps JSON's booleans apart from its numbers (`true` is not `1`)."""
    is_bool = type(value) is bool
    return any(value == item and (type(item) is bool) == is_bool for item in expected)


def _pick_function(rules: Sequence[Rule]) -> Pick:
    """One function that tests every rule's `when` and `has` in order, generated at load.

    The source holds only generated names; every key, value and getter is bound through the
    namespace. A condition on `$event` compares the name, one on a plain key reads the dict
    inline; other paths call their compiled getter.
    """
    namespace: dict[str, Any] = {"_same": _same}
    lines = ["def pick(p, e):", "    d = p if type(p) is dict else _EMPTY"]
    namespace["_EMPTY"] = {}
    for index, rule in enumerate(rules):
        tests: list[str] = []
        for n, cond in enumerate(rule.when):
            values = f"V{index}_{n}"
            namespace[values] = cond.values
            if cond.path.reads_event:
                subject = "e"
            elif cond.path.key is not None:
                key = f"K{index}_{n}"
                namespace[key] = cond.path.key
                subject = f"d.get({key})"
            else:
                getter = f"G{index}_{n}"
                namespace[getter] = cond.path.get
                subject = f"{getter}(p, e)"
            if cond.strict:
                tests.append(f"_same({subject}, {values})")
            elif len(cond.values) == 1:
                namespace[values] = cond.values[0]
                tests.append(f"{subject} == {values}")
            else:
                tests.append(f"{subject} in {values}")
        for n, has in enumerate(rule.has):
            getter = f"H{index}_{n}"
            namespace[getter] = has.get
            tests.append(f"{getter}(p, e)")
        lines.append(f"    if {' and '.join(tests) or 'True'}: return {index}")
    lines.append("    return -1")
    exec(compile("\n".join(lines), "<custom rules>", "exec"), namespace)
    pick: Pick = namespace["pick"]
    return pick


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
                                                              _SESSION_ID_PLACEHOLDERS))
    lookup: LookupSpec | None = None
    create: CreateSpec | None = None
    carry: Literal["marker"] | None = None
    from_response: Getter | None = None
    without_hint: WithoutHint = "new"
    cache: float = DEFAULT_CACHE


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
        its variants, the session id, lookup and create, and cancel (`captured.*` too)."""
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


# -- compiling ------------------------------------------------------------------------------------


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__


def _unknown(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    if close:
        return f"unknown key '{name}'; did you mean '{close[0]}'?"
    return f"unknown key '{name}'; expected one of: {', '.join(choices)}"


class _Compiler:
    def __init__(self) -> None:
        self.problems: list[SpecProblem] = []
        self.warnings: list[SpecProblem] = []

    def error(self, where: Where, message: str) -> None:
        self.problems.append(SpecProblem(where, message))

    def warn(self, where: Where, message: str) -> None:
        self.warnings.append(SpecProblem(where, message))

    # -- generic readers -----------------------------------------------------------------

    def mapping(self, value: Any, where: Where) -> Mapping[str, Any] | None:
        """A mapping; `key:` left empty counts as an empty one; None (reported) otherwise."""
        if value is None:
            return {}
        if isinstance(value, Mapping):
            return value
        self.error(where, f"expected a mapping, got {_kind(value)}")
        return None

    def keys(self, entries: Mapping[str, Any], allowed: Sequence[str], where: Where,
             skip: Collection[str] = ()) -> None:
        for name in entries:
            if name in skip:
                continue
            if not isinstance(name, str):
                self.error(where, f"a key must be a plain name, got {name!r}")
            elif name not in allowed:
                self.error((*where, name), _unknown(name, [*allowed, *skip]))

    def string(self, value: Any, where: Where, *, empty: bool = True) -> str | None:
        if not isinstance(value, str):
            self.error(where, f"expected a string, got {_kind(value)}")
            return None
        if not empty and not value:
            self.error(where, "must not be empty")
            return None
        return value

    def choice(self, value: Any, where: Where, choices: Sequence[str]) -> str | None:
        if not isinstance(value, str):
            self.error(where, f"expected one of {', '.join(choices)}, got {_kind(value)}")
            return None
        if value not in choices:
            close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            self.error(where, f"'{value}' is not one of {', '.join(choices)}{hint}")
            return None
        return value

    def boolean(self, value: Any, where: Where) -> bool | None:
        if isinstance(value, bool):
            return value
        self.error(where, f"expected true or false, got {_kind(value)}")
        return None

    def paths(self, value: Any, where: Where) -> Getter | None:
        try:
            return compile_paths(value)
        except PathError as exc:
            self.error(where, str(exc))
            return None

    def method(self, entries: Mapping[str, Any], where: Where, default: str) -> str:
        if "method" not in entries:
            return default
        value = entries["method"]
        if isinstance(value, str) and value.upper() in METHODS:
            return value.upper()
        self.choice(value, (*where, "method"), METHODS)
        return default

    def check_template(self, kind: str, value: Any, where: Where,
                       allowed: Collection[str], captured: Collection[str] | None) -> bool:
        """Compiles one raw piece on its own so a problem names the key it sits under."""
        try:
            if kind == "path":
                compile_path_template(value, allowed, captured)
            elif kind == "query":
                compile_query(value, allowed, captured)
            else:
                compile_body(value, allowed, captured)
        except TemplateError as exc:
            self.error((*where, kind, *exc.where), exc.message)
            return False
        return True

    def request(self, entries: Mapping[str, Any], where: Where, method: str,
                allowed: Collection[str], captured: Collection[str] | None
                ) -> RequestSpec | None:
        """A standalone call (lookup, create, cancel, models) from its own keys."""
        ok = True
        for kind in ("path", "query", "body"):
            if kind in entries and not (kind == "body" and entries[kind] is None):
                ok = self.check_template(kind, entries[kind], where, allowed, captured) and ok
        if method == "GET" and entries.get("body") is not None:
            self.error((*where, "body"), "a GET request sends no body")
            ok = False
        if not ok:
            return None
        return _build_request(method, entries, allowed, captured)

    # -- sections --------------------------------------------------------------------------

    def usage(self, value: Any, where: Where) -> UsageMapping | None:
        entries = self.mapping(value, where)
        if entries is None:
            return None
        self.keys(entries, _USAGE_KEYS, where)
        if not any(k in entries for k in _USAGE_KEYS):
            self.error(where, "map at least one of " + ", ".join(_USAGE_KEYS))
            return None
        getters = {k: self.paths(entries[k], (*where, k)) if k in entries else None
                   for k in _USAGE_KEYS}
        parent: Getter | None = None
        keys: list[str | None] = [None, None, None]
        leaves = [_leaf(entries.get(k)) if k in entries else None for k in _USAGE_KEYS]
        found = [leaf for leaf in leaves if leaf is not None]
        if len(found) == sum(k in entries for k in _USAGE_KEYS) and len(
                {text for text, _, _ in found}) == 1:
            parent = found[0][1]
            keys = [leaf[2] if leaf is not None else None for leaf in leaves]
        return UsageMapping(getters["prompt_tokens"], getters["completion_tokens"],
                            getters["total_tokens"], parent, (keys[0], keys[1], keys[2]))

    def message_format(self, value: Any, where: Where) -> MessageFormat:
        entries = self.mapping(value, where)
        if not entries:
            return MessageFormat()
        self.keys(entries, _FORMAT_KEYS, where)
        role_key = self.string(entries.get("role_key", "role"), (*where, "role_key"),
                               empty=False) or "role"
        content_key = self.string(entries.get("content_key", "content"),
                                  (*where, "content_key"), empty=False) or "content"
        roles: dict[str, str | None] = dict(DEFAULT_ROLES)
        raw_roles = self.mapping(entries.get("roles"), (*where, "roles")) or {}
        for role, name in raw_roles.items():
            spot = (*where, "roles", role)
            if role not in DEFAULT_ROLES:
                self.error(spot, _unknown(str(role), list(DEFAULT_ROLES)).replace(
                    "unknown key", "unknown role"))
            elif name is not None and not isinstance(name, str):
                self.error(spot, f"expected the upstream's name for the role, or null to "
                                 f"leave it out; got {_kind(name)}")
            else:
                roles[role] = name
        return MessageFormat(role_key, content_key, roles)

    def sync(self, value: Any, where: Where) -> SyncMapping | None:
        entries = self.mapping(value, where)
        if entries is None:
            return None
        self.keys(entries, _SYNC_KEYS, where)
        if "text" not in entries:
            self.error(where, "missing required key 'text' (the path of the answer's text in "
                              "the JSON body)")
            return None
        text = self.paths(entries["text"], (*where, "text"))
        join = ""
        if "join" in entries:
            join = self.string(entries["join"], (*where, "join")) or ""
        reasoning = (self.paths(entries["reasoning"], (*where, "reasoning"))
                     if "reasoning" in entries else None)
        usage = self.usage(entries["usage"], (*where, "usage")) if "usage" in entries else None
        finish = (self.paths(entries["finish"], (*where, "finish"))
                  if "finish" in entries else None)
        error = self.paths(entries["error"], (*where, "error")) if "error" in entries else None
        require_text = False
        if "require_text" in entries:
            require_text = bool(self.boolean(entries["require_text"],
                                             (*where, "require_text")))
        if text is None:
            return None
        return SyncMapping(text, join, reasoning, usage, finish, error, require_text)

    def condition(self, key: Any, value: Any, where: Where) -> Condition | None:
        spot = (*where, str(key))
        if not isinstance(key, str):
            self.error(where, f"a `when` key is a path, got {_kind(key)}")
            return None
        try:
            path = compile_path(key)
        except PathError as exc:
            self.error(spot, str(exc))
            return None
        values = tuple(value) if isinstance(value, list | tuple) else (value,)
        if not values:
            self.error(spot, "an empty list matches nothing; give a value or a list of values")
            return None
        for item in values:
            if isinstance(item, Mapping | list | tuple):
                self.error(spot, f"compare with a string, number, boolean or null, not "
                                 f"{_kind(item)}")
                return None
        strict = any(isinstance(v, bool | int | float) for v in values)
        return Condition(path, values, strict)

    def rule(self, value: Any, where: Where) -> Rule | None:
        entries = self.mapping(value, where)
        if entries is None:
            return None
        before = len(self.problems)
        self.keys(entries, _RULE_KEYS, where)
        when: list[Condition] = []
        if "when" in entries:
            raw_when = self.mapping(entries["when"], (*where, "when"))
            for key, expected in (raw_when or {}).items():
                cond = self.condition(key, expected, (*where, "when"))
                if cond is not None:
                    when.append(cond)
        has: list[Path] = []
        if "has" in entries:
            raw_has = entries["has"]
            items = raw_has if isinstance(raw_has, list) else [raw_has]
            for i, item in enumerate(items):
                spot = (*where, "has", i) if isinstance(raw_has, list) else (*where, "has")
                try:
                    has.append(compile_path(item))
                except PathError as exc:
                    self.error(spot, str(exc))

        def opt_paths(key: str) -> Getter | None:
            return self.paths(entries[key], (*where, key)) if key in entries else None

        def opt_bool(key: str) -> bool:
            if key not in entries:
                return False
            return bool(self.boolean(entries[key], (*where, key)))

        text = opt_paths("text")
        reasoning = opt_paths("reasoning")
        finish = opt_paths("finish")
        cumulative, recap, usage_sum, end = (opt_bool("cumulative"), opt_bool("recap"),
                                             opt_bool("usage_sum"), opt_bool("end"))
        separator = ""
        if "separator" in entries:
            separator = self.string(entries["separator"], (*where, "separator")) or ""
        usage = self.usage(entries["usage"], (*where, "usage")) if "usage" in entries else None
        capture: list[tuple[str, Getter]] = []
        if "capture" in entries:
            raw_capture = self.mapping(entries["capture"], (*where, "capture")) or {}
            for name, path in raw_capture.items():
                spot = (*where, "capture", str(name))
                if not isinstance(name, str) or not _CAPTURE_NAME.fullmatch(name):
                    self.error(spot, "a capture name is letters, digits, `_` and `-`, "
                                     "starting with a letter or `_`")
                    continue
                getter = self.paths(path, spot)
                if getter is not None:
                    capture.append((name, getter))
        is_error = "error" in entries
        error: Getter | None = None
        if is_error:
            raw_error = entries["error"]
            if raw_error is True:
                error = None
            elif raw_error is False or raw_error is None:
                self.error((*where, "error"), "give the path of the error's message (or "
                                              "`true` for a generic one)")
            else:
                error = self.paths(raw_error, (*where, "error"))
        # Combinations that cannot mean anything.
        if cumulative and recap:
            self.error((*where, "recap"), "`cumulative` and `recap` exclude each other: "
                                          "`recap` repeats the deltas, `cumulative` is the "
                                          "text so far")
        for key in ("cumulative", "recap", "separator"):
            if key in entries and "text" not in entries:
                self.error((*where, key), f"`{key}` qualifies `text`, which this rule lacks")
        if "usage_sum" in entries and "usage" not in entries:
            self.error((*where, "usage_sum"), "`usage_sum` qualifies `usage`, which this rule "
                                              "lacks")
        if is_error:
            clash = [k for k in ("text", "reasoning", "usage", "finish", "end") if k in entries]
            if clash:
                self.error((*where, "error"), "an `error` rule ends the stream with that "
                           f"error; move {', '.join(f'`{k}`' for k in clash)} to a rule of "
                           "its own")
        if len(self.problems) > before:
            return None
        return Rule(tuple(when), tuple(has), text, cumulative, recap, separator, reasoning,
                    usage, usage_sum, finish, tuple(capture), is_error, error, end)

    def stream(self, value: Any, where: Where) -> StreamMapping | None:
        entries = self.mapping(value, where)
        if entries is None:
            return None
        self.keys(entries, _STREAM_KEYS, where)
        if "framing" not in entries:
            self.error(where, "missing required key 'framing' (sse, ndjson or text: it is "
                              "declared, never guessed from Content-Type)")
            framing = None
        else:
            framing = self.choice(entries["framing"], (*where, "framing"), FRAMINGS)
        rules: list[Rule] = []
        ok = True
        if "rules" in entries:
            raw_rules = entries["rules"]
            if not isinstance(raw_rules, list):
                self.error((*where, "rules"), f"expected a list of rules, got "
                                              f"{_kind(raw_rules)}")
                ok = False
            else:
                for i, raw in enumerate(raw_rules):
                    rule = self.rule(raw, (*where, "rules", i))
                    if rule is None:
                        ok = False
                    else:
                        rules.append(rule)
        if framing is None or not ok:
            return None
        if not rules and framing == "text":
            # Plain text: every chunk is a delta.
            rules.append(Rule(text=compile_path("$").get))
        if not any(rule.text is not None for rule in rules):
            spot = (*where, "rules") if "rules" in entries else where
            self.error(spot, "no rule has `text`: the stream would never carry the answer")
            return None
        captures = frozenset(name for rule in rules for name, _ in rule.capture)
        return StreamMapping(cast(Framing, framing), tuple(rules),
                             any(rule.end for rule in rules), captures, _pick_function(rules))


def _leaf(value: Any) -> tuple[str, Getter, str] | None:
    if not isinstance(value, str):
        return None
    try:
        return compile_path(value).split_leaf()
    except PathError:
        return None


def _build_request(method: str, entries: Mapping[str, Any], allowed: Collection[str],
                   captured: Collection[str] | None) -> RequestSpec:
    path = compile_path_template(entries.get("path") or "", allowed, captured)
    query = (compile_query(entries["query"], allowed, captured)
             if entries.get("query") else None)
    body = None
    if method != "GET" and entries.get("body") is not None:
        body = compile_body(entries["body"], allowed, captured)
    names = path.names | (query.names if query else frozenset()) | (
        body.names if body else frozenset())
    return RequestSpec(method, path, query, body, names)


def compile_custom(
    block: Mapping[str, Any],
    *,
    skip: Collection[str] = COMMON_KEYS,
    session_secret: bool = False,
) -> CustomSpec:
    """Compiles the custom-specific keys of one `kind: custom` upstream.

    `skip` lists the keys the caller reads itself (url, headers, timeouts, ...).
    `session_secret`: whether a secret for `carry: marker` is configured. Raises
    CustomSpecError listing every problem; warnings are on the returned spec.
    """
    c = _Compiler()
    if not isinstance(block, Mapping):
        raise CustomSpecError([SpecProblem((), f"expected a mapping, got {_kind(block)}")])
    c.keys(block, CUSTOM_KEYS, (), skip)

    mode = cast(Mode, c.choice(block.get("mode", "client"), ("mode",), MODES) or "client")

    sync = c.sync(block["sync"], ("sync",)) if "sync" in block else None
    stream = c.stream(block["stream"], ("stream",)) if "stream" in block else None
    # What the stream rules capture is what cancel and session requests may use.
    captured = _raw_captures(block.get("stream"))

    # -- request and its overrides -----------------------------------------------------------
    raw_request = c.mapping(block.get("request"), ("request",))
    if "request" not in block:
        c.error((), "missing required key 'request' (the path and body of the chat call)")
    request = raw_request or {}
    c.keys(request, _REQUEST_KEYS, ("request",))
    method = c.method(request, ("request",), "POST")
    message_format = c.message_format(request.get("message_format"),
                                      ("request", "message_format"))
    pieces_ok = True
    overrides: dict[str, Mapping[str, Any]] = {}
    for section in ("sync", "stream"):
        raw = block.get(section)
        overrides[section] = {k: raw[k] for k in _OVERRIDE_KEYS if k in raw} if isinstance(
            raw, Mapping) else {}
    base = {k: request[k] for k in _OVERRIDE_KEYS if k in request}
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
    session, stateless_piece = _session(c, block.get("session"), captured, session_secret)
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
            calls[(streaming, False)] = _build_request(method, merged, BODY_PLACEHOLDERS, None)
            calls[(streaming, True)] = _build_request(
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
    return replace(spec, warnings=tuple(c.warnings))


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


def _session(c: _Compiler, value: Any, captured: frozenset[str], session_secret: bool
             ) -> tuple[CustomSession, Mapping[str, Any] | None]:
    where: Where = ("session",)
    entries = c.mapping(value, where)
    if not entries:
        return CustomSession(), None
    c.keys(entries, _SESSION_KEYS, where)
    options: dict[str, Any] = {}
    if "id" in entries:
        try:
            options["id"] = compile_body(entries["id"], _SESSION_ID_PLACEHOLDERS, None)
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
                                _SESSION_ID_PLACEHOLDERS, captured)
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
    if "carry" in entries:
        carry = c.choice(entries["carry"], (*where, "carry"), _CARRY)
        if carry is not None:
            options["carry"] = carry
            if not session_secret:
                c.warn((*where, "carry"), "`carry: marker` without a session secret "
                                          "(AGENTPROXY_SESSION_SECRET): markers are signed "
                                          "with a per-process key and stop working after a "
                                          "restart")
    if "from_response" in entries:
        getter = c.paths(entries["from_response"], (*where, "from_response"))
        if getter is not None:
            options["from_response"] = getter
    without_hint = c.choice(entries.get("without_hint", "new"), (*where, "without_hint"),
                            WITHOUT_HINT) or "new"
    options["without_hint"] = without_hint
    stateless: Mapping[str, Any] | None = None
    if "stateless" in entries:
        raw = c.mapping(entries["stateless"], (*where, "stateless"))
        if raw is not None:
            c.keys(raw, _OVERRIDE_KEYS, (*where, "stateless"))
            stateless = {k: raw[k] for k in _OVERRIDE_KEYS if k in raw}
            if without_hint != "stateless":
                c.error((*where, "stateless"), "used only with `without_hint: stateless`")
    if "cache" in entries:
        cache = entries["cache"]
        if isinstance(cache, bool) or not isinstance(cache, int | float) or cache < 0:
            c.error((*where, "cache"), f"expected seconds (0 turns the cache off), got "
                                       f"{cache!r}")
        else:
            options["cache"] = float(cache)
    return CustomSession(**options), stateless


def _models(c: _Compiler, value: Any) -> ModelsSpec | None:
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


def _lint(c: _Compiler, spec: CustomSpec) -> None:
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
