"""Upstream kinds: one module per kind, named as the kind, holding one class of that name."""

from __future__ import annotations

from proxy.config import UpstreamSpec
from proxy.upstreams.base import Upstream
from proxy.upstreams.echo import Echo
from proxy.upstreams.letta import Letta
from proxy.upstreams.openai import OpenAI

KINDS: dict[str, type[Upstream]] = {"openai": OpenAI, "echo": Echo, "letta": Letta}


def build_upstream(spec: UpstreamSpec) -> Upstream:
    return KINDS[spec.kind](spec)
