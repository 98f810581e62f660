"""The route table as frozen dataclasses: what the reader builds and the rest of the proxy reads."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from proxy.config.problems import Problem

UpstreamKind = Literal["openai", "echo", "letta", "custom"]

T = TypeVar("T")


def _options_as(options: object, cls: type[T], owner: str) -> T:
    if not isinstance(options, cls):
        raise TypeError(f"{owner} has options {type(options).__name__}, not {cls.__name__}")
    return options


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
    # The kind's own settings, as its declaration read them (proxy/upstreams/<kind>_options.py):
    # a frozen dataclass of that module, or None for a kind that has none.
    options: object = None

    def options_as(self, cls: type[T]) -> T:
        """`options`, typed; TypeError if this upstream's kind keeps another class there."""
        return _options_as(self.options, cls, f"upstream {self.name!r}")


@dataclass(frozen=True, slots=True)
class SessionSpec:
    """How a route to a kind that keeps conversations maps callers to them."""

    # Without a session hint: "agent" uses the agent's default thread, "per_key" gives each
    # API key a conversation of its own.
    without_hint: Literal["agent", "per_key"] = "agent"
    # The body's `user` field is a session hint only where the route opts in.
    from_user: bool = False
    # How long a request waits for another request on the same conversation before a 409.
    busy_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class RouteFields:
    """What a kind's route reader gives back: the ModelSpec fields that depend on the kind."""

    agent: str | None = None
    client_system: Literal["drop", "prepend"] = "drop"
    show: tuple[str, ...] = ()
    session: SessionSpec = field(default_factory=SessionSpec)
    options: object = None


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    upstreams: tuple[str, ...]
    line: int
    model: str | None = None
    owned_by: str | None = None
    # Routes to kinds that declare these keys (letta):
    agent: str | None = None
    client_system: Literal["drop", "prepend"] = "drop"
    show: tuple[str, ...] = ()
    session: SessionSpec = field(default_factory=SessionSpec)
    # The route options of its kind that have no field above, or None.
    options: object = None

    @property
    def wildcard_prefix(self) -> str | None:
        """`local/` for the model `local/*`; None for a plain name."""
        return self.name[:-1] if self.name.endswith("/*") else None

    def options_as(self, cls: type[T]) -> T:
        """`options`, typed; TypeError if this route's kind keeps another class there."""
        return _options_as(self.options, cls, f"model {self.name!r}")


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
