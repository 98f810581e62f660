"""The upstream kinds, by the name routes.yaml gives them."""

from __future__ import annotations

from proxy.config import UpstreamSpec
from proxy.state import AppState
from proxy.upstreams.base import Upstream
from proxy.upstreams.echo import Echo
from proxy.upstreams.letta import Letta
from proxy.upstreams.openai import OpenAI

KINDS: dict[str, type[Upstream]] = {"openai": OpenAI, "echo": Echo, "letta": Letta}


def build_upstream(spec: UpstreamSpec, state: AppState) -> Upstream:
    return KINDS[spec.kind](spec, state)
