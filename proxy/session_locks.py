"""One request at a time per upstream thread, with a bounded wait: within a process, and
across the `--workers` processes of one host.

Letta leaves concurrent sends to one conversation undefined (and agent servers of the
`custom` kind interleave or refuse them), so the proxy serialises them. Within a process an
asyncio lock per session does it. Across workers, each also takes a byte-range lock in one
file that every worker of the host opens (`share`): byte N for the session whose hash is N,
taken without blocking and retried every few milliseconds until the wait runs out. The file
never grows and needs no cleaning up; the kernel drops a worker's locks when it dies.
Across replicas, affinity by session header at the ingress does the same (docs/deploy.md).

A request that has to wait for a session gives its upstream's `max_concurrency` slot back
meanwhile (`Slot`) and takes one again once it has the session: it is not talking to the
upstream, and N turns queued on one session must not refuse every other user of it.

The registry lives with the app (proxy/state.py), not the route table: a reload must not let
a second request into a thread that a request of the old table still holds.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import os
from typing import Protocol

from proxy.errors import Conflict

# Between two tries of a lock that another worker holds.
_POLL = 0.02


class SessionBusy(Conflict):
    code = "session_busy"


def busy(wait: float) -> SessionBusy:
    return SessionBusy(
        f"Another request is still running in this session; it was waited for "
        f"{wait:g} s. Retry when it has finished.",
        headers={"Retry-After": "1"},
    )


class Slot(Protocol):
    """The waiting request's concurrency slot on the upstream (proxy/failover.py)."""

    def give_back(self) -> None:
        """Frees the slot for other requests while this one waits."""

    def restore(self) -> None:
        """After a wait that failed: held again at once (over the limit if need be), so that
        the request's lease gives it back exactly once, as it does on every other path."""

    async def take_again(self) -> None:
        """Waits for a slot again; raises (the slot restored) when none came in time."""


class HostLocks:
    """Byte-range locks in one file shared by the workers of a host."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    @staticmethod
    def offset(key: str) -> int:
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big")

    def try_lock(self, offset: int) -> bool:
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset, os.SEEK_SET)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                return False
            raise
        return True

    def unlock(self, offset: int) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, offset, os.SEEK_SET)

    def close(self) -> None:
        os.close(self._fd)


class KeyedLocks:
    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._host: HostLocks | None = None

    def __len__(self) -> int:
        return len(self._locks)

    def share(self, path: str) -> None:
        """Also lock across the processes that share the file at `path`."""
        self._host = HostLocks(path)

    async def acquire(self, key: str, wait: float, slot: Slot | None = None) -> None:
        """The lock of `key`, waited for up to `wait` seconds, then SessionBusy.

        `slot`: the caller's concurrency slot. It is kept when the lock is free at once;
        otherwise it is given back for the wait and taken again once the lock is held
        (on a failure of that, the lock is let go again)."""
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        # The slot while it is given back: at once when another request of this process
        # holds the session or waits for it.
        lent = slot if users else None
        try:
            if lent is not None:
                lent.give_back()
            async with asyncio.timeout(wait):
                await lock.acquire()
        except BaseException as exc:
            self._forget(key)
            if lent is not None:
                lent.restore()
            if isinstance(exc, TimeoutError):
                raise busy(wait) from None
            raise
        host = self._host
        offset = 0 if host is None else host.offset(key)
        locked = False
        try:
            if host is not None:
                while not host.try_lock(offset):
                    if lent is None and slot is not None:
                        lent = slot
                        slot.give_back()
                    if loop.time() >= deadline:
                        raise busy(wait)
                    await asyncio.sleep(_POLL)
                locked = True
            if lent is not None:
                again, lent = lent, None
                await again.take_again()
        except BaseException:
            if lent is not None:
                lent.restore()
            if locked:
                assert host is not None
                host.unlock(offset)
            lock.release()
            self._forget(key)
            raise

    def release(self, key: str) -> None:
        entry = self._locks.get(key)
        if entry is None:
            return
        if self._host is not None:
            self._host.unlock(self._host.offset(key))
        entry[0].release()
        self._forget(key)

    def close(self) -> None:
        if self._host is not None:
            self._host.close()
            self._host = None

    def _forget(self, key: str) -> None:
        lock, users = self._locks[key]
        if users <= 1:
            del self._locks[key]
        else:
            self._locks[key] = (lock, users - 1)
