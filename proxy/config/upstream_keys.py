"""The upstream keys that several kinds share: where the server is, its credentials, headers,
timeouts and resilience settings. A kind's declaration lists which of them it accepts; its own
keys it reads itself (proxy/upstreams/<kind>_options.py)."""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from typing import Any
from urllib.parse import urlsplit

from yaml.nodes import Node, ScalarNode

from proxy.config.reader import Block, Reader, is_null
from proxy.config.specs import Circuit, Timeouts

URL = "url"
RESILIENCE_KEYS: tuple[str, ...] = ("keepalive", "max_concurrency", "queue_timeout", "circuit")
# Every shared key, in the order documented and listed in messages.
SHARED_KEYS: tuple[str, ...] = (
    URL, "api_key", "headers", "forward_headers", "timeouts", *RESILIENCE_KEYS,
)
TIMEOUT_KEYS: tuple[str, ...] = ("connect", "first_event", "idle", "total")
CIRCUIT_KEYS: tuple[str, ...] = ("failures", "cooldown")

# RFC 9110 §5.6.2 token: what a header field name may be.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Headers whose client value must never reach an upstream: the proxy's own key, or what the
# proxy itself sets for the upstream connection.
NOT_FORWARDABLE = frozenset(
    {
        "authorization", "x-api-key", "proxy-authorization", "host", "content-length",
        "content-type", "content-encoding", "accept-encoding", "transfer-encoding", "connection",
        "keep-alive", "te", "trailer", "upgrade", "proxy-connection",
    }
)


def url_problem(url: str) -> str | None:
    try:
        parts = urlsplit(url)
    except ValueError:
        # urlsplit refuses an unclosed or invalid `[...]` host, and a host that NFKC would
        # turn into another URL (its message repeats the host, which may hold credentials).
        if "[" in url:
            return "the host in [brackets] is not a valid IPv6 address"
        return ("the host has characters that Unicode normalization (NFKC) turns into URL "
                "syntax ('/', '?', '#', '@' or ':')")
    try:
        parts.port  # noqa: B018 - the property is what validates the port
    except ValueError:
        return "the port is not a number from 0 to 65535"
    # Whitespace and control characters (a newline from an environment variable) would break
    # the request line.
    if parts.scheme not in ("http", "https") or not parts.hostname or any(
        c.isspace() or not c.isprintable() for c in url
    ):
        return "expected an absolute http:// or https:// URL, e.g. http://127.0.0.1:8000/v1"
    if parts.query or parts.fragment:
        return "the base URL cannot have a query or fragment"
    return None


def read_url(reader: Reader, node: Node, path: str) -> str | None:
    url = reader.string(node, path)
    if url is None:
        return None
    # The message never repeats the URL: it may carry credentials.
    problem = url_problem(url)
    if problem is not None:
        reader.error(node, path, problem)
        return None
    return url.rstrip("/")


def is_header_name(name: str) -> bool:
    return _TOKEN.fullmatch(name) is not None


def header_name(reader: Reader, node: Node, path: str) -> str | None:
    """A string that is a valid HTTP header name, as written."""
    name = reader.string(node, path)
    if name is not None and not is_header_name(name):
        reader.error(node, path, "not a valid header name")
        return None
    return name


def read_api_key(reader: Reader, node: Node, path: str) -> str | None:
    # An empty key (`${VAR:-}` with VAR unset) means none is sent.
    return reader.secret(node, path) or None


def read_headers(reader: Reader, node: Node, path: str) -> dict[str, str]:
    headers: dict[str, str] = {}
    seen: dict[str, str] = {}
    block = reader.block(node, path)
    if block is None:
        return headers
    for name, (key, value_node) in block.entries.items():
        item = block.at(name)
        if not is_header_name(name):
            reader.error(key, item, "not a valid header name")
        elif name.lower() in seen:
            reader.error(key, item, f"same header as '{seen[name.lower()]}' "
                         "(header names are case-insensitive)")
        seen.setdefault(name.lower(), name)
        value = reader.string(value_node, item)
        # Header values often carry a credential (`api-key: ${KEY}`): the same rule. A tab is
        # legal in a header value (RFC 9110 §5.5); nothing else below 0x20 is.
        if (value is not None and isinstance(value_node, ScalarNode)
                and reader.no_control(value_node, item, value, "a header value", tab_ok=True)):
            headers[name] = value
    return headers


def read_forward_headers(reader: Reader, node: Node, path: str) -> tuple[str, ...]:
    names: list[str] = []
    for item, item_path in reader.items(node, path, "header names"):
        name = header_name(reader, item, item_path)
        if name is None:
            continue
        if name.lower() in NOT_FORWARDABLE:
            reader.error(item, item_path, f"'{name}' cannot be forwarded: the proxy sets it "
                         "or it carries the client's key for this proxy")
        elif name.lower() not in names:
            names.append(name.lower())
    return tuple(names)


def read_timeouts(reader: Reader, node: Node, path: str) -> Timeouts:
    block = reader.block(node, path, keys=TIMEOUT_KEYS)
    if not block:
        return Timeouts()
    values: dict[str, float | None] = {}
    for name in TIMEOUT_KEYS:
        if name in block:
            values[name] = reader.seconds(block.node(name), block.at(name), name == "total")
    defaults = Timeouts()
    return Timeouts(
        connect=values.get("connect") or defaults.connect,
        first_event=values.get("first_event") or defaults.first_event,
        idle=values.get("idle") or defaults.idle,
        total=values.get("total"),
    )


def read_circuit(reader: Reader, node: Node, path: str) -> Circuit:
    block = reader.block(node, path, keys=CIRCUIT_KEYS)
    if not block:
        return Circuit()
    defaults = Circuit()
    failures = defaults.failures
    if "failures" in block:
        failures = reader.integer(block.node("failures"), block.at("failures")) or failures
    cooldown = defaults.cooldown
    if "cooldown" in block:
        cooldown = reader.seconds(block.node("cooldown"), block.at("cooldown")) or cooldown
    return Circuit(failures=failures, cooldown=cooldown)


def read_resilience(reader: Reader, block: Block, accepted: Collection[str]) -> dict[str, Any]:
    """keepalive, max_concurrency, queue_timeout and circuit, those of them in `accepted`:
    UpstreamSpec keywords."""
    options: dict[str, Any] = {}
    block = Block({k: v for k, v in block.entries.items() if k in accepted}, block.path,
                  block.anchor)
    if "keepalive" in block:
        value = reader.seconds(block.node("keepalive"), block.at("keepalive"))
        if value is not None:
            options["keepalive"] = value
    if "max_concurrency" in block:
        node = block.node("max_concurrency")
        if not is_null(node):
            count = reader.integer(node, block.at("max_concurrency"), "no limit")
            # 0, like null, means no limit.
            options["max_concurrency"] = count or None
    if "queue_timeout" in block:
        node, path = block.node("queue_timeout"), block.at("queue_timeout")
        wait = reader.number(node, path, "a number of seconds")
        if wait is not None and (not math.isfinite(wait) or wait < 0):
            reader.error(node, path,
                         "must be a finite number of seconds, 0 or more (0: do not wait)")
        elif wait is not None:
            options["queue_timeout"] = wait
    if "circuit" in block:
        options["circuit"] = read_circuit(reader, block.node("circuit"), block.at("circuit"))
    return options
