"""routes.yaml -> frozen dataclasses. All validation lives here; errors name file:line and path."""

from __future__ import annotations

import difflib
import hashlib
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.reader import ReaderError

UpstreamKind = Literal["openai", "echo", "letta", "custom"]
SUPPORTED_KINDS: tuple[str, ...] = ("openai", "echo", "letta")
RESERVED_KINDS: tuple[str, ...] = ("custom",)
SHOW_OPTIONS: tuple[str, ...] = ("reasoning", "tools")


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line} {self.path}: {self.message}"


class ConfigError(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds. `None` means no limit."""

    connect: float = 10.0
    first_event: float = 300.0
    idle: float = 300.0
    total: float | None = None


@dataclass(frozen=True, slots=True)
class Circuit:
    """When to stop preferring an upstream that keeps failing, and for how long."""

    failures: int = 3
    cooldown: float = 30.0


@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    name: str
    kind: UpstreamKind
    line: int
    url: str | None = None
    api_key: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    forward_headers: tuple[str, ...] = ()
    timeouts: Timeouts = field(default_factory=Timeouts)
    # Seconds of silence towards a streaming client before the proxy writes `: keep-alive`.
    keepalive: float = 15.0
    # Requests sent to the upstream at once (None: no limit), and how long one more waits.
    max_concurrency: int | None = None
    queue_timeout: float = 10.0
    circuit: Circuit = field(default_factory=Circuit)
    # openai kind: "native" relays `/v1/responses` to the upstream's own `/responses`;
    # "translate" turns it into a chat turn like every other kind.
    responses: Literal["translate", "native"] = "translate"


@dataclass(frozen=True, slots=True)
class SessionSpec:
    """How a letta route maps callers to Letta conversations."""

    # Without a session hint: "agent" uses the agent's default thread, "per_key" gives each
    # API key a conversation of its own.
    without_hint: Literal["agent", "per_key"] = "agent"
    # The body's `user` field is a session hint only where the route opts in.
    from_user: bool = False
    # How long a request waits for another request on the same conversation before a 409.
    busy_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    upstreams: tuple[str, ...]
    line: int
    model: str | None = None
    owned_by: str | None = None
    # letta routes only:
    agent: str | None = None
    client_system: Literal["drop", "prepend"] = "drop"
    show: tuple[str, ...] = ()
    session: SessionSpec = field(default_factory=SessionSpec)

    @property
    def wildcard_prefix(self) -> str | None:
        """`local/` for the model `local/*`; None for a plain name."""
        return self.name[:-1] if self.name.endswith("/*") else None


@dataclass(frozen=True, slots=True)
class KeySpec:
    key: str
    line: int
    models: tuple[str, ...] = ("*",)
    name: str | None = None


@dataclass(frozen=True, slots=True)
class AuthSpec:
    keys: tuple[KeySpec, ...] = ()
    allow_unauthenticated: bool = False


@dataclass(frozen=True, slots=True)
class Config:
    source: str
    version: str
    upstreams: Mapping[str, UpstreamSpec]
    models: tuple[ModelSpec, ...]
    auth: AuthSpec
    warnings: tuple[Problem, ...] = ()


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    """Reads and validates a route table. Raises OSError if unreadable, ConfigError if invalid."""
    filename = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise ConfigError([Problem(filename, line, _FILE, "the file is not UTF-8 text")]) from None
    return parse_config(text, filename, environ)


def parse_config(
    text: str, filename: str = "routes.yaml", environ: Mapping[str, str] | None = None
) -> Config:
    """Validates a route table given as text; raises ConfigError listing every problem found."""
    reader = _Reader(filename, os.environ if environ is None else environ)
    built = reader.read(text)
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


_FILE = "(file)"
_TOP_KEYS = ("upstreams", "models", "auth")
_RESILIENCE_KEYS = ("keepalive", "max_concurrency", "queue_timeout", "circuit")
_OPENAI_KEYS = ("kind", "url", "api_key", "headers", "forward_headers", "timeouts",
                "responses", *_RESILIENCE_KEYS)
RESPONSES_MODES: tuple[str, ...] = ("translate", "native")
_TIMEOUT_KEYS = ("connect", "first_event", "idle", "total")
_CIRCUIT_KEYS = ("failures", "cooldown")
_LETTA_KEYS = ("kind", "url", "api_key", "headers", "timeouts", *_RESILIENCE_KEYS)
_LETTA_ROUTE_KEYS = ("agent", "client_system", "show", "session")
_SESSION_KEYS = ("without_hint", "from_user", "busy_timeout")
_MODEL_KEYS = ("upstream", "model", "owned_by", *_LETTA_ROUTE_KEYS)
_AUTH_KEYS = ("keys", "allow_unauthenticated")
_KEY_KEYS = ("key", "models", "name")
_INLINE_SECRET = "secret written inline; use ${VAR} so it comes from the environment"

_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_BOOL = "tag:yaml.org,2002:bool"
_NULL = "tag:yaml.org,2002:null"
_TYPE_NAMES = {_STR: "a string", _INT: "a number", _FLOAT: "a number", _BOOL: "a boolean",
               _NULL: "null"}

# `$${` escapes; a `${` that fails the NAME / NAME:-default form is reported, not kept silently.
_REFERENCE = re.compile(
    r"\$\$\{|\$\{(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\})?"
)
_UPSTREAM_NAME = re.compile(r"[A-Za-z0-9_.-]+")
# RFC 9110 §5.6.2 token: what a header field name may be.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Headers whose client value must never reach an upstream: the proxy's own key, or what the
# proxy itself sets for the upstream connection.
_NOT_FORWARDABLE = frozenset(
    {
        "authorization", "x-api-key", "proxy-authorization", "host", "content-length",
        "content-type", "content-encoding", "accept-encoding", "transfer-encoding", "connection",
        "keep-alive", "te", "trailer", "upgrade", "proxy-connection",
    }
)
_SCALARS = SafeConstructor()

Entries = dict[str, tuple[ScalarNode, Node]]
Built = tuple[dict[str, UpstreamSpec], list[ModelSpec], AuthSpec]


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _describe(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return _TYPE_NAMES.get(node.tag, f"a value tagged {node.tag}")


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _NULL


def _unknown(what: str, name: str, choices: Iterable[str]) -> str:
    options = list(choices)
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    if close:
        return f"unknown {what} '{name}'; did you mean '{close[0]}'?"
    return f"unknown {what} '{name}'; expected one of: {', '.join(options)}"


def _has_reference(raw: str) -> bool:
    return any(m.group("name") for m in _REFERENCE.finditer(raw))


def _url_problem(url: str) -> str | None:
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - the property is what validates the port
    except ValueError:
        return "the port is not a number from 0 to 65535"
    if parts.scheme not in ("http", "https") or not parts.hostname or any(
        c.isspace() for c in url
    ):
        return "expected an absolute http:// or https:// URL, e.g. http://127.0.0.1:8000/v1"
    if parts.query or parts.fragment:
        return "the base URL cannot have a query or fragment"
    return None


def _model_name_problem(name: str) -> str | None:
    if not name:
        return "a model name cannot be empty"
    if "*" not in name:
        return None
    prefix = name[:-2]
    if not name.endswith("/*") or not prefix or "*" in prefix:
        return "a wildcard model must have the form 'prefix/*'"
    return None


class _Reader:
    """Builds the dataclasses from YAML nodes, recording every problem instead of stopping."""

    def __init__(self, filename: str, environ: Mapping[str, str]) -> None:
        self.file = filename
        self.environ = environ
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []

    def error(self, node: Node, path: str, message: str) -> None:
        self.problems.append(Problem(self.file, _line(node), path or _FILE, message))

    def warn(self, node: Node, path: str, message: str) -> None:
        self.warnings.append(Problem(self.file, _line(node), path, message))

    # -- the file ------------------------------------------------------------------------

    def read(self, text: str) -> Built | None:
        root = self.compose(text)
        if root is None:
            return None
        if not isinstance(root, MappingNode):
            self.error(root, _FILE, "expected a mapping with upstreams, models and auth, "
                       f"got {_describe(root)}")
            return None
        entries = self.mapping(root, "")
        self.known_keys(entries, _TOP_KEYS, "")
        for required in ("upstreams", "models"):
            if required not in entries:
                self.error(root, _FILE, f"missing required key '{required}'")
        kinds: dict[str, str | None] = {}
        upstreams: dict[str, UpstreamSpec] = {}
        if "upstreams" in entries:
            upstreams = self.upstreams(*entries["upstreams"], kinds)
        models = self.models(*entries["models"], kinds) if "models" in entries else []
        auth = self.auth(entries["auth"][1]) if "auth" in entries else AuthSpec()
        return upstreams, models, auth

    def compose(self, text: str) -> Node | None:
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark is not None else 1
            problem = exc.problem or exc.context or "cannot be parsed"
            self.problems.append(Problem(self.file, line, _FILE, f"invalid YAML: {problem}"))
            return None
        except ReaderError as exc:
            line = text[: exc.position].count("\n") + 1
            message = f"invalid YAML: character {exc.character!r} is not allowed"
            self.problems.append(Problem(self.file, line, _FILE, message))
            return None
        if root is None:
            self.problems.append(Problem(self.file, 1, _FILE, "the file is empty"))
        return root

    # -- generic node readers --------------------------------------------------------------

    def mapping(self, node: MappingNode, path: str, duplicate: str = "duplicate key") -> Entries:
        entries: Entries = {}
        for key, value in node.value:
            if not isinstance(key, ScalarNode):
                self.error(key, path, f"a key must be a plain name, got {_describe(key)}")
            elif key.value in entries:
                first = _line(entries[key.value][0])
                self.error(key, _join(path, key.value),
                           f"{duplicate} '{key.value}' (first on line {first})")
            else:
                entries[key.value] = (key, value)
        return entries

    def mapping_of(self, node: Node, path: str, duplicate: str = "duplicate key") -> Entries | None:
        """The entries of `node`, or None (reported) when it is not a mapping."""
        if isinstance(node, MappingNode):
            return self.mapping(node, path, duplicate)
        self.error(node, path, f"expected a mapping, got {_describe(node)}")
        return None

    def optional_mapping(
        self, node: Node, path: str, duplicate: str = "duplicate key"
    ) -> Entries | None:
        """Like mapping_of, but `key:` with nothing after it counts as an empty mapping."""
        return {} if _is_null(node) else self.mapping_of(node, path, duplicate)

    def known_keys(self, entries: Entries, allowed: tuple[str, ...], path: str) -> None:
        for name, (key, _) in entries.items():
            if name not in allowed:
                self.error(key, _join(path, name), _unknown("key", name, allowed))

    def sequence(self, node: Node, path: str, what: str) -> list[Node] | None:
        if isinstance(node, SequenceNode):
            return list(node.value)
        self.error(node, path, f"expected a list of {what}, got {_describe(node)}")
        return None

    def optional_sequence(self, node: Node, path: str, what: str) -> list[Node]:
        """The items of a list; nothing for `key:` left empty or a value reported as wrong."""
        return [] if _is_null(node) else self.sequence(node, path, what) or []

    def string(self, node: Node, path: str) -> str | None:
        if isinstance(node, ScalarNode) and node.tag == _STR:
            return self.interpolate(node, path)
        self.error(node, path, f"expected a string, got {_describe(node)}")
        return None

    def nonempty_string(self, node: Node, path: str) -> str | None:
        value = self.string(node, path)
        if value == "":
            self.error(node, path, "must not be empty")
            return None
        return value

    def interpolate(self, node: ScalarNode, path: str) -> str | None:
        ok = True

        def substitute(match: re.Match[str]) -> str:
            nonlocal ok
            name, default = match.group("name"), match.group("default")
            if match.group(0) == "$${":
                return "${"
            if name is None:
                self.error(node, path, "malformed ${...}: expected ${VAR} or ${VAR:-default} "
                           "(write $${ for a literal ${)")
                ok = False
                return ""
            value = self.environ.get(name)
            # As in the shell, `:-` also replaces a variable that is set but empty.
            if default is not None and not value:
                return default
            if value is None:
                self.error(node, path, f"environment variable {name} is not set")
                ok = False
                return ""
            return value

        result = _REFERENCE.sub(substitute, str(node.value))
        return result if ok else None

    def number(self, node: Node, path: str) -> float | None:
        if isinstance(node, ScalarNode) and node.tag in (_INT, _FLOAT):
            if node.tag == _INT:
                return float(_SCALARS.construct_yaml_int(node))
            return _SCALARS.construct_yaml_float(node)
        self.error(node, path, f"expected a number of seconds, got {_describe(node)}")
        return None

    def boolean(self, node: Node, path: str) -> bool | None:
        if isinstance(node, ScalarNode) and node.tag == _BOOL:
            return _SCALARS.construct_yaml_bool(node)
        self.error(node, path, f"expected true or false, got {_describe(node)}")
        return None

    def secret(self, node: Node, path: str) -> str | None:
        value = self.string(node, path)
        if value and isinstance(node, ScalarNode) and not _has_reference(str(node.value)):
            self.warn(node, path, _INLINE_SECRET)
        return value

    # -- upstreams -------------------------------------------------------------------------

    def upstreams(
        self, key: ScalarNode, node: Node, kinds: dict[str, str | None]
    ) -> dict[str, UpstreamSpec]:
        """Fills `kinds` with every upstream name, even broken ones, so models can refer to it."""
        entries = self.optional_mapping(node, "upstreams")
        if entries is None:
            return {}
        if not entries:
            self.error(key, "upstreams",
                       "no upstreams defined; at least one is required")
        specs: dict[str, UpstreamSpec] = {}
        for name, (name_node, body) in entries.items():
            path = _join("upstreams", name)
            if not _UPSTREAM_NAME.fullmatch(name):
                self.error(name_node, path, "an upstream name may only contain letters, digits, "
                           "'_', '.' and '-'")
            kind, spec = self.upstream(name, name_node, body, path)
            kinds[name] = kind
            if spec is not None:
                specs[name] = spec
        return specs

    def upstream(
        self, name: str, name_node: ScalarNode, node: Node, path: str
    ) -> tuple[str | None, UpstreamSpec | None]:
        entries = self.optional_mapping(node, path)
        if entries is None:
            return None, None
        kind = self.kind(entries, name_node, path)
        if kind in RESERVED_KINDS:
            return kind, None
        if kind == "echo":
            self.echo_keys(entries, path)
            return kind, UpstreamSpec(name=name, kind="echo", line=_line(name_node))
        if kind == "letta":
            return kind, self.http_upstream(name, name_node, entries, path, "letta")
        spec = self.http_upstream(name, name_node, entries, path, "openai",
                                  url_required=kind == "openai")
        return kind, spec if kind == "openai" else None

    def kind(self, entries: Entries, name_node: ScalarNode, path: str) -> str | None:
        if "kind" not in entries:
            self.error(name_node, path, "missing required key 'kind' (openai, letta or echo)")
            return None
        node = entries["kind"][1]
        kind = self.string(node, _join(path, "kind"))
        if kind is None:
            return None
        if kind in RESERVED_KINDS:
            self.error(node, _join(path, "kind"), f"upstream kind '{kind}' is not yet supported")
        elif kind not in SUPPORTED_KINDS:
            self.error(node, _join(path, "kind"), _unknown("kind", kind, SUPPORTED_KINDS))
            return None
        return kind

    def echo_keys(self, entries: Entries, path: str) -> None:
        for name, (key, _) in entries.items():
            if name in _OPENAI_KEYS and name != "kind":
                self.error(key, _join(path, name), "not used by kind echo")
            elif name != "kind":
                self.error(key, _join(path, name), _unknown("key", name, ("kind",)))

    def http_upstream(
        self, name: str, name_node: ScalarNode, entries: Entries, path: str,
        kind: UpstreamKind, url_required: bool = True,
    ) -> UpstreamSpec | None:
        letta = kind == "letta"
        if letta and "responses" in entries:
            self.error(entries["responses"][0], _join(path, "responses"),
                       "not used by kind letta: Letta routes translate the Responses API "
                       "themselves, and chain it through Letta conversations")
            entries = {k: v for k, v in entries.items() if k != "responses"}
        self.known_keys(entries, _LETTA_KEYS if letta else _OPENAI_KEYS, path)
        url = None
        if "url" in entries:
            url = self.url(entries["url"][1], _join(path, "url"))
            if letta and url is not None and url.endswith("/v1"):
                # Letta's routes all start with /v1; accept the root with or without it.
                url = url[: -len("/v1")]
        elif url_required:
            example = "http://127.0.0.1:8283" if letta else "http://127.0.0.1:8000/v1"
            self.error(name_node, path, "missing required key 'url' (the server's base URL, "
                       f"e.g. {example})")
        api_key = None
        if "api_key" in entries:
            api_key = self.secret(entries["api_key"][1], _join(path, "api_key")) or None
        headers: dict[str, str] = {}
        if "headers" in entries:
            headers = self.headers(entries["headers"][1], _join(path, "headers"))
        forward: tuple[str, ...] = ()
        if "forward_headers" in entries:
            forward = self.forward_headers(entries["forward_headers"][1],
                                           _join(path, "forward_headers"))
        timeouts = Timeouts()
        if "timeouts" in entries:
            timeouts = self.timeouts(entries["timeouts"][1], _join(path, "timeouts"))
        resilience = self.resilience(entries, path)
        if "responses" in entries and not letta:
            node = entries["responses"][1]
            mode = self.string(node, _join(path, "responses"))
            if mode is not None and mode not in RESPONSES_MODES:
                self.error(node, _join(path, "responses"),
                           f"expected 'native' (relay /v1/responses to the upstream's own "
                           f"/responses) or 'translate' (the default), got '{mode}'")
            elif mode is not None:
                resilience["responses"] = mode
        if url is None:
            return None
        return UpstreamSpec(
            name=name, kind=kind, line=_line(name_node), url=url, api_key=api_key,
            headers=headers, forward_headers=forward, timeouts=timeouts, **resilience,
        )

    def resilience(self, entries: Entries, path: str) -> dict[str, Any]:
        """keepalive, max_concurrency, queue_timeout and circuit: UpstreamSpec keywords."""
        options: dict[str, Any] = {}
        if "keepalive" in entries:
            value = self.seconds(entries["keepalive"][1], _join(path, "keepalive"), False)
            if value is not None:
                options["keepalive"] = value
        if "max_concurrency" in entries:
            item = _join(path, "max_concurrency")
            node = entries["max_concurrency"][1]
            if not _is_null(node):
                count = self.integer(node, item, "no limit")
                # 0, like null, means no limit.
                options["max_concurrency"] = count or None
        if "queue_timeout" in entries:
            node = entries["queue_timeout"][1]
            wait = self.number(node, _join(path, "queue_timeout"))
            if wait is not None and (not math.isfinite(wait) or wait < 0):
                self.error(node, _join(path, "queue_timeout"),
                           "must be a finite number of seconds, 0 or more (0: do not wait)")
            elif wait is not None:
                options["queue_timeout"] = wait
        if "circuit" in entries:
            options["circuit"] = self.circuit(entries["circuit"][1], _join(path, "circuit"))
        return options

    def circuit(self, node: Node, path: str) -> Circuit:
        entries = self.optional_mapping(node, path)
        if not entries:
            return Circuit()
        self.known_keys(entries, _CIRCUIT_KEYS, path)
        defaults = Circuit()
        failures = defaults.failures
        if "failures" in entries:
            failures = self.integer(entries["failures"][1], _join(path, "failures")) or failures
        cooldown = defaults.cooldown
        if "cooldown" in entries:
            cooldown = self.seconds(entries["cooldown"][1], _join(path, "cooldown"),
                                    False) or cooldown
        return Circuit(failures=failures, cooldown=cooldown)

    def integer(self, node: Node, path: str, zero: str | None = None) -> int | None:
        """A positive whole number; 0 too when `zero` says what it means."""
        if not (isinstance(node, ScalarNode) and node.tag == _INT):
            self.error(node, path, f"expected a whole number, got {_describe(node)}")
            return None
        value = int(_SCALARS.construct_yaml_int(node))
        if value < 0 or (value == 0 and zero is None):
            hint = f", or 0 for {zero}" if zero else ""
            self.error(node, path, f"must be a positive whole number{hint}")
            return None
        return value

    def url(self, node: Node, path: str) -> str | None:
        url = self.string(node, path)
        if url is None:
            return None
        # The message never repeats the URL: it may carry credentials.
        problem = _url_problem(url)
        if problem is not None:
            self.error(node, path, problem)
            return None
        return url.rstrip("/")

    def headers(self, node: Node, path: str) -> dict[str, str]:
        headers: dict[str, str] = {}
        seen: dict[str, str] = {}
        for name, (key, value_node) in (self.optional_mapping(node, path) or {}).items():
            item = _join(path, name)
            if not _TOKEN.fullmatch(name):
                self.error(key, item, "not a valid header name")
            elif name.lower() in seen:
                self.error(key, item, f"same header as '{seen[name.lower()]}' "
                           "(header names are case-insensitive)")
            seen.setdefault(name.lower(), name)
            value = self.string(value_node, item)
            if value is not None and any(c in value for c in "\r\n\0"):
                self.error(value_node, item, "a header value cannot contain line breaks")
            elif value is not None:
                headers[name] = value
        return headers

    def forward_headers(self, node: Node, path: str) -> tuple[str, ...]:
        names: list[str] = []
        for i, item in enumerate(self.optional_sequence(node, path, "header names")):
            item_path = f"{path}[{i}]"
            name = self.string(item, item_path)
            if name is None:
                continue
            if not _TOKEN.fullmatch(name):
                self.error(item, item_path, "not a valid header name")
            elif name.lower() in _NOT_FORWARDABLE:
                self.error(item, item_path, f"'{name}' cannot be forwarded: the proxy sets it "
                           "or it carries the client's key for this proxy")
            elif name.lower() not in names:
                names.append(name.lower())
        return tuple(names)

    def timeouts(self, node: Node, path: str) -> Timeouts:
        entries = self.optional_mapping(node, path)
        if not entries:
            return Timeouts()
        self.known_keys(entries, _TIMEOUT_KEYS, path)
        values: dict[str, float | None] = {}
        for name in _TIMEOUT_KEYS:
            if name in entries:
                value_node = entries[name][1]
                values[name] = self.seconds(value_node, _join(path, name), name == "total")
        defaults = Timeouts()
        return Timeouts(
            connect=values.get("connect") or defaults.connect,
            first_event=values.get("first_event") or defaults.first_event,
            idle=values.get("idle") or defaults.idle,
            total=values.get("total"),
        )

    def seconds(self, node: Node, path: str, unlimited_ok: bool) -> float | None:
        if unlimited_ok and _is_null(node):
            return None
        value = self.number(node, path)
        if value is None:
            return None
        if unlimited_ok and value == 0:
            return None
        if not math.isfinite(value):
            self.error(node, path, "must be a finite number of seconds")
            return None
        if value <= 0:
            hint = ", or 0 or null for no limit" if unlimited_ok else ""
            self.error(node, path, f"must be a positive number of seconds{hint}")
            return None
        return value

    # -- models ----------------------------------------------------------------------------

    def models(
        self, key: ScalarNode, node: Node, kinds: Mapping[str, str | None]
    ) -> list[ModelSpec]:
        entries = self.optional_mapping(node, "models", "duplicate model name")
        if entries is None:
            return []
        if not entries:
            self.error(key, "models", "no models defined; at least one is required")
        specs = []
        for name, (name_node, body) in entries.items():
            spec = self.model(name, name_node, body, kinds)
            if spec is not None:
                specs.append(spec)
        return specs

    def model(
        self, name: str, name_node: ScalarNode, node: Node, kinds: Mapping[str, str | None]
    ) -> ModelSpec | None:
        path = _join("models", name)
        problem = _model_name_problem(name)
        if problem is not None:
            self.error(name_node, path, problem)
        wildcard = problem is None and name.endswith("/*")
        entries = self.optional_mapping(node, path)
        if entries is None:
            return None
        self.known_keys(entries, _MODEL_KEYS, path)
        upstreams: tuple[str, ...] = ()
        if "upstream" in entries:
            upstreams = self.upstream_refs(entries["upstream"][1], _join(path, "upstream"),
                                           kinds, wildcard)
        else:
            self.error(name_node, path, "missing required key 'upstream'")
        route_kinds = {kinds.get(u) for u in upstreams}
        letta = "letta" in route_kinds
        if letta and len(route_kinds) > 1:
            self.error(entries["upstream"][1], _join(path, "upstream"), "a route to letta "
                       "upstreams cannot also list upstreams of another kind")
        options = self.letta_route(entries, path, name_node, letta=letta, wildcard=wildcard)
        rewrite = None
        if "model" in entries:
            model_key, model_node = entries["model"]
            if letta:
                self.error(model_key, _join(path, "model"), "a letta route names its agent "
                           "with 'agent', not 'model'")
            elif wildcard:
                self.error(model_key, _join(path, "model"), "a wildcard forwards the upstream's "
                           "own model ids; 'model' cannot be set")
            else:
                rewrite = self.nonempty_string(model_node, _join(path, "model"))
        owned_by = None
        if "owned_by" in entries:
            owned_by = self.nonempty_string(entries["owned_by"][1], _join(path, "owned_by"))
        if not upstreams:
            return None
        return ModelSpec(name=name, upstreams=upstreams, line=_line(name_node), model=rewrite,
                         owned_by=owned_by, **options)

    def letta_route(
        self, entries: Entries, path: str, name_node: ScalarNode, *, letta: bool, wildcard: bool
    ) -> dict[str, Any]:
        """The letta-only route options, checked; keyword arguments for ModelSpec."""
        if not letta:
            for name in _LETTA_ROUTE_KEYS:
                if name in entries:
                    self.error(entries[name][0], _join(path, name),
                               f"'{name}' is only for routes to letta upstreams")
            return {}
        options: dict[str, Any] = {}
        if "agent" in entries:
            key, node = entries["agent"]
            if wildcard:
                self.error(key, _join(path, "agent"), "a wildcard serves every agent of the "
                           "server; 'agent' cannot be set")
            else:
                options["agent"] = self.nonempty_string(node, _join(path, "agent"))
        elif not wildcard:
            self.error(name_node, path, "missing required key 'agent' (the Letta agent's id "
                       "or name)")
        if "client_system" in entries:
            node = entries["client_system"][1]
            value = self.string(node, _join(path, "client_system"))
            if value in ("drop", "prepend"):
                options["client_system"] = value
            elif value is not None:
                self.error(node, _join(path, "client_system"),
                           f"expected drop or prepend, got '{value}'")
        if "show" in entries:
            options["show"] = self.show(entries["show"][1], _join(path, "show"))
        if "session" in entries:
            options["session"] = self.session(entries["session"][1], _join(path, "session"))
        return options

    def show(self, node: Node, path: str) -> tuple[str, ...]:
        shown: list[str] = []
        for i, item in enumerate(self.optional_sequence(node, path, "a list")):
            value = self.string(item, f"{path}[{i}]")
            if value is None:
                continue
            if value not in SHOW_OPTIONS:
                self.error(item, f"{path}[{i}]", _unknown("value", value, SHOW_OPTIONS))
            elif value not in shown:
                shown.append(value)
        return tuple(shown)

    def session(self, node: Node, path: str) -> SessionSpec:
        entries = self.mapping_of(node, path)
        if entries is None:
            return SessionSpec()
        self.known_keys(entries, _SESSION_KEYS, path)
        without_hint: Literal["agent", "per_key"] = "agent"
        if "without_hint" in entries:
            item = entries["without_hint"][1]
            value = self.string(item, _join(path, "without_hint"))
            if value == "per_key":
                without_hint = "per_key"
            elif value is not None and value != "agent":
                self.error(item, _join(path, "without_hint"),
                           f"expected agent or per_key, got '{value}'")
        from_user = False
        if "from_user" in entries:
            from_user = bool(self.boolean(entries["from_user"][1], _join(path, "from_user")))
        busy = 30.0
        if "busy_timeout" in entries:
            busy = self.seconds(entries["busy_timeout"][1], _join(path, "busy_timeout"),
                                False) or busy
        return SessionSpec(without_hint=without_hint, from_user=from_user, busy_timeout=busy)

    def upstream_refs(
        self, node: Node, path: str, kinds: Mapping[str, str | None], wildcard: bool
    ) -> tuple[str, ...]:
        if isinstance(node, SequenceNode):
            if not node.value:
                self.error(node, path, "the list is empty; name at least one upstream")
            items = [(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        elif isinstance(node, ScalarNode) and node.tag == _STR:
            items = [(node, path)]
        else:
            self.error(node, path, "expected an upstream name or a list of names, "
                       f"got {_describe(node)}")
            return ()
        names: list[str] = []
        for item, item_path in items:
            name = self.string(item, item_path)
            if name is None:
                continue
            if name not in kinds:
                self.error(item, item_path, _unknown("upstream", name, kinds))
            elif name in names:
                self.error(item, item_path, f"upstream '{name}' is listed twice")
            elif wildcard and kinds[name] == "echo":
                self.error(item, item_path, f"'{name}' is kind echo, which has no model list "
                           "for a wildcard to expand")
            names.append(name)
        return tuple(dict.fromkeys(names))

    # -- auth ------------------------------------------------------------------------------

    def auth(self, node: Node) -> AuthSpec:
        entries = self.optional_mapping(node, "auth")
        if not entries:
            return AuthSpec()
        self.known_keys(entries, _AUTH_KEYS, "auth")
        keys: list[KeySpec] = []
        if "keys" in entries:
            keys = self.keys(entries["keys"][1], "auth.keys")
        allow = False
        if "allow_unauthenticated" in entries:
            path = "auth.allow_unauthenticated"
            allow = bool(self.boolean(entries["allow_unauthenticated"][1], path))
        return AuthSpec(keys=tuple(keys), allow_unauthenticated=allow)

    def keys(self, node: Node, path: str) -> list[KeySpec]:
        specs: list[KeySpec] = []
        first_path: dict[str, str] = {}
        for i, item in enumerate(self.optional_sequence(node, path, "keys")):
            key_path = f"{path}[{i}].key"
            found = self.key(item, f"{path}[{i}]")
            if found is None:
                continue
            spec, key_node = found
            if spec.key in first_path:
                # Names the earlier entry, never the key itself: messages end up in logs.
                self.error(key_node, key_path, f"same key as {first_path[spec.key]}")
                continue
            first_path[spec.key] = key_path
            specs.append(spec)
        return specs

    def key(self, node: Node, path: str) -> tuple[KeySpec, Node] | None:
        entries = self.optional_mapping(node, path)
        if entries is None:
            return None
        self.known_keys(entries, _KEY_KEYS, path)
        models: tuple[str, ...] = ("*",)
        if "models" in entries:
            models = self.patterns(entries["models"][1], _join(path, "models"))
        name = None
        if "name" in entries:
            name = self.string(entries["name"][1], _join(path, "name"))
        if "key" not in entries:
            self.error(node, path, "missing required key 'key'")
            return None
        key_node = entries["key"][1]
        key = self.secret(key_node, _join(path, "key"))
        if key == "":
            self.error(key_node, _join(path, "key"), "empty API key")
        elif key is not None and any(c.isspace() for c in key):
            # Clients send the key as `Bearer <key>`, which cannot carry whitespace.
            self.error(key_node, _join(path, "key"), "an API key cannot contain whitespace")
            return None
        if not key:
            return None
        return KeySpec(key=key, line=_line(node), models=models, name=name), key_node

    def patterns(self, node: Node, path: str) -> tuple[str, ...]:
        items = self.sequence(node, path, "model patterns")
        if items is None:
            return ()
        if not items:
            self.error(node, path, "the list is empty, so this key would grant no model")
        patterns = []
        for i, item in enumerate(items):
            pattern = self.nonempty_string(item, f"{path}[{i}]")
            if pattern is not None:
                patterns.append(pattern)
        return tuple(patterns)
