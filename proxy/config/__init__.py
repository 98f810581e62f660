"""routes.yaml -> frozen dataclasses; every problem named as `file:line path: message`.

The package, one responsibility a module:
- problems.py       Problem, ConfigError
- nodes.py          YAML nodes: composing them, line, path, type names, did-you-mean text,
                    Block, locate
- reader.py         the generic YAML reader: every problem at once, mappings and lists,
                    `${VAR}` interpolation, typed scalars, the secrets rule
- specs.py          the frozen dataclasses the rest of the proxy reads
- schema.py         the top level: upstreams, models (parse_config)
- upstream_keys.py  upstream keys several kinds share (url, api_key, headers, timeouts...)
- route_keys.py     route keys several kinds share (client_system, show, session)
- auth_keys.py      the auth section
- kind.py           what an upstream kind declares (the kinds: proxy/upstreams/kinds.py)
- source.py         reading the file, bounded in size and time (load_config)
"""

from proxy.config.kind import KindDeclaration
from proxy.config.problems import FILE, ConfigError, Problem
from proxy.config.reader import Block, Reader
from proxy.config.route_keys import SHOW_OPTIONS
from proxy.config.schema import parse_config
from proxy.config.source import MAX_BYTES, READ_TIMEOUT, TooLarge, load_config, read_source
from proxy.config.specs import (
    AuthSpec,
    Circuit,
    Config,
    KeySpec,
    ModelSpec,
    RouteFields,
    SessionSpec,
    Timeouts,
    UpstreamKind,
    UpstreamSpec,
)

__all__ = [
    "FILE",
    "MAX_BYTES",
    "READ_TIMEOUT",
    "SHOW_OPTIONS",
    "AuthSpec",
    "Block",
    "Circuit",
    "Config",
    "ConfigError",
    "KeySpec",
    "KindDeclaration",
    "ModelSpec",
    "Problem",
    "Reader",
    "RouteFields",
    "SessionSpec",
    "Timeouts",
    "TooLarge",
    "UpstreamKind",
    "UpstreamSpec",
    "load_config",
    "parse_config",
    "read_source",
]
