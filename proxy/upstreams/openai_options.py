"""The `openai` kind's declaration: any server that speaks the OpenAI API, and its options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from proxy.config.kind import KindDeclaration
from proxy.config.reader import Block, Reader
from proxy.config.upstream_keys import NOT_FORWARDABLE, SHARED_KEYS, header_name

if TYPE_CHECKING:
    from proxy.upstreams.base import Upstream

SESSION_HEADER = "session_header"
RESPONSES = "responses"
RESPONSES_MODES: tuple[str, ...] = ("translate", "native")


@dataclass(frozen=True, slots=True)
class OpenAIOptions:
    # The header that carries the proxy's session key to an upstream that keeps its own
    # sessions (an agent server behind the OpenAI API), as written; None: no session is sent.
    session_header: str | None = None
    # "native" relays `/v1/responses` to the upstream's own `/responses`; "translate" turns it
    # into a chat turn like every other kind.
    responses: Literal["translate", "native"] = "translate"


def read_options(reader: Reader, upstream: Block) -> OpenAIOptions:
    return OpenAIOptions(
        session_header=_session_header(reader, upstream),
        responses=_responses(reader, upstream),
    )


def _responses(reader: Reader, upstream: Block) -> Literal["translate", "native"]:
    if RESPONSES not in upstream:
        return "translate"
    node, path = upstream.node(RESPONSES), upstream.at(RESPONSES)
    mode = reader.string(node, path)
    if mode == "native":
        return "native"
    if mode is not None and mode != "translate":
        reader.error(node, path, f"expected 'native' (relay /v1/responses to the upstream's "
                     f"own /responses) or 'translate' (the default), got '{mode}'")
    return "translate"


def _session_header(reader: Reader, upstream: Block) -> str | None:
    if SESSION_HEADER not in upstream:
        return None
    node, path = upstream.node(SESSION_HEADER), upstream.at(SESSION_HEADER)
    name = header_name(reader, node, path)
    if name is None:
        return None
    lower = name.lower()
    if lower in NOT_FORWARDABLE:
        reader.error(node, path, f"'{name}' cannot carry the session: the proxy sets it or it "
                     "carries a key")
        return None
    # The proxy's session key replaces what the client sent, and a fixed value would be
    # overwritten: one header, one source.
    for other in ("headers", "forward_headers"):
        if other in upstream and _names(upstream, other, lower):
            reader.error(node, path, f"'{name}' is also in {other}; the session header is "
                         "set by the proxy, so list it in one place only")
            return None
    return name


def _names(upstream: Block, key: str, lower: str) -> bool:
    """Whether the `key` mapping or list of header names names `lower` (read as written: the
    shared readers report what is wrong with it)."""
    node = upstream.node(key)
    values = node.value if isinstance(node.value, list) else []
    for item in values:
        name = item[0] if isinstance(item, tuple) else item
        if isinstance(name.value, str) and name.value.lower() == lower:
            return True
    return False


def adapter() -> type[Upstream]:
    from proxy.upstreams.openai import OpenAI

    return OpenAI


DECLARATION = KindDeclaration(
    name="openai",
    adapter=adapter,
    keys=SHARED_KEYS,
    url_example="http://127.0.0.1:8000/v1",
    option_keys=(SESSION_HEADER, RESPONSES),
    read_options=read_options,
    lists_models=True,
)
