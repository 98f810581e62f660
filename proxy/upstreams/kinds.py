"""The upstream kinds the route table knows: kind name -> its declaration.

Adding a kind: write proxy/upstreams/<kind>.py (the adapter, a class named after the kind)
and proxy/upstreams/<kind>_options.py with a `DECLARATION` (proxy.config.kind.KindDeclaration)
whose `adapter` loads that class, and list the declaration here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from proxy.config.kind import KindDeclaration
from proxy.config.specs import UpstreamSpec
from proxy.upstreams import custom_options, echo_options, letta_options, openai_options

if TYPE_CHECKING:
    from proxy.state import AppState
    from proxy.upstreams.base import Upstream

# In the order messages list them ("openai, letta, custom or echo").
KINDS: Mapping[str, KindDeclaration] = {
    d.name: d
    for d in (openai_options.DECLARATION, letta_options.DECLARATION,
              custom_options.DECLARATION, echo_options.DECLARATION)
}
# Kind names that are refused with "not yet supported" rather than "unknown".
RESERVED: tuple[str, ...] = ()


def declaration(kind: str) -> KindDeclaration:
    """The declaration of a kind the route table accepted (KeyError for any other)."""
    return KINDS[kind]


def build_upstream(spec: UpstreamSpec, state: AppState) -> Upstream:
    """The adapter of one configured upstream."""
    return declaration(spec.kind).adapter()(spec, state)
