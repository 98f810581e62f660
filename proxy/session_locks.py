"""One request at a time per upstream thread, with a bounded wait.

Letta leaves concurrent sends to one conversation undefined, so the proxy serialises them.
The registry lives with the app (proxy/state.py), not the route table: a reload must not let
a second request into a thread that a request of the old table still holds.
"""

from __future__ import annotations

import asyncio

from proxy.errors import Conflict


class SessionBusy(Conflict):
    code = "session_busy"


class KeyedLocks:
    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    async def acquire(self, key: str, wait: float) -> None:
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with asyncio.timeout(wait):
                await lock.acquire()
        except BaseException as exc:
            self._forget(key)
            if isinstance(exc, TimeoutError):
                raise SessionBusy(
                    f"Another request is still running in this session; it was waited for "
                    f"{wait:g} s. Retry when it has finished.",
                    headers={"Retry-After": "1"},
                ) from None
            raise

    def release(self, key: str) -> None:
        entry = self._locks.get(key)
        if entry is None:
            return
        entry[0].release()
        self._forget(key)

    def _forget(self, key: str) -> None:
        lock, users = self._locks[key]
        if users <= 1:
            del self._locks[key]
        else:
            self._locks[key] = (lock, users - 1)

