"""Per-worker memory of a custom upstream's sessions: server-issued ids and created sessions.

A `session.lookup` answer or a `from_response` id is remembered under the request's session
key for `session.cache` seconds, so the next turn of that chat needs no lookup; a session
made with `session.create` is remembered the same way, so it is created once. The memory is
never the source of truth (custom-apis.md §5, strategy F): a restart, another worker or
another replica simply looks up or creates again, and a 404 on a remembered id drops it.

Bounded: at `limit` entries, expired ones go first, then the oldest. Lives on the adapter,
so a reload that builds a new adapter starts empty (a lookup refills it).
"""

from __future__ import annotations

import time
from typing import Final

__all__ = ["MAX_SESSIONS", "SessionCache"]

MAX_SESSIONS: Final = 10_000


class SessionCache:
    __slots__ = ("_entries", "limit", "ttl")

    def __init__(self, ttl: float, limit: int = MAX_SESSIONS) -> None:
        self.ttl = ttl
        self.limit = limit
        self._entries: dict[str, tuple[float, str]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> str | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            del self._entries[key]
            return None
        return entry[1]

    def put(self, key: str, value: str) -> None:
        """Remembers `value` for `ttl` seconds (nothing at all when the cache is off)."""
        if self.ttl <= 0:
            return
        entries = self._entries
        now = time.monotonic()
        entries.pop(key, None)
        if len(entries) >= self.limit:
            for old in [k for k, (expires, _) in entries.items() if expires <= now]:
                del entries[old]
            while len(entries) >= self.limit:
                del entries[next(iter(entries))]
        entries[key] = (now + self.ttl, value)

    def drop(self, key: str) -> None:
        self._entries.pop(key, None)
