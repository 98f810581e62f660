"""The `echo` kind's declaration: built in, no network, so no keys but `kind`."""

from __future__ import annotations

from proxy.config.kind import KindDeclaration

DECLARATION = KindDeclaration(name="echo")
