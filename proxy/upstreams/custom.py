"""The `custom` kind: any agent HTTP API, described in routes.yaml alone (docs/custom.md)."""

from __future__ import annotations

from typing import ClassVar

import aiohttp

from proxy.errors import UpstreamFailed
from proxy.upstreams.base import Answer, ByteStream, Call, ChunkStream
from proxy.upstreams.http import HttpUpstream


class Custom(HttpUpstream):
    kind: ClassVar[str] = "custom"

    async def complete(self, call: Call, http: aiohttp.ClientSession) -> Answer:
        raise UpstreamFailed("not built yet")

    async def open_stream(
        self, call: Call, http: aiohttp.ClientSession
    ) -> ChunkStream | ByteStream:
        raise UpstreamFailed("not built yet")
