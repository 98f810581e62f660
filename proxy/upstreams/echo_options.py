"""The `echo` kind's declaration: built in, no network, so no keys but `kind`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.config.kind import KindDeclaration

if TYPE_CHECKING:
    from proxy.upstreams.base import Upstream

def adapter() -> type[Upstream]:
    from proxy.upstreams.echo import Echo

    return Echo


DECLARATION = KindDeclaration(name="echo", adapter=adapter)
