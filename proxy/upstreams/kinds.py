"""The upstream kinds the route table knows: kind name -> its declaration.

Adding a kind: write proxy/upstreams/<kind>_options.py with a `DECLARATION`
(proxy.config.kind.KindDeclaration) and list it here; its adapter goes in build_upstream's
table (proxy/upstreams/__init__.py).
"""

from __future__ import annotations

from collections.abc import Mapping

from proxy.config.kind import KindDeclaration
from proxy.upstreams import custom_options, echo_options, letta_options, openai_options

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
