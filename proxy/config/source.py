"""Reading the routes file itself: bounded in size and in time, whatever the path points at.

A routes file is a few kilobytes. The path may still name something that never ends
(`/dev/zero`), never answers (a FIFO nobody writes to) or answers slowly (a stalled network
volume); none of those may grow memory without bound or hold a reload, a drain or a shutdown
forever. The file is opened without blocking, refused past MAX_BYTES, and a read that has not
reached the end within `timeout` seconds gives up.
"""

from __future__ import annotations

import errno
import os
import select
import stat
import time
from collections.abc import Mapping
from pathlib import Path

from proxy.config.problems import FILE, ConfigError, Problem
from proxy.config.schema import parse_config
from proxy.config.specs import Config

MAX_BYTES = 4 << 20
READ_TIMEOUT = 5.0
_CHUNK = 1 << 16
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class TooLarge(OSError):
    def __init__(self, limit: int) -> None:
        super().__init__(errno.EFBIG, f"the file is larger than {limit >> 20} MiB, the limit "
                         "for a routes file")


def read_source(
    path: str | Path, *, limit: int = MAX_BYTES, timeout: float = READ_TIMEOUT
) -> bytes:
    """The file's bytes. Raises OSError: unreadable, TooLarge past `limit` bytes, or
    TimeoutError when a pipe or device has not reached its end within `timeout` seconds."""
    fd = os.open(path, os.O_RDONLY | _O_NONBLOCK | _O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        regular = stat.S_ISREG(info.st_mode)
        if regular and info.st_size > limit:
            raise TooLarge(limit)
        return _read_bounded(fd, limit, None if regular else timeout)
    finally:
        os.close(fd)


def _read_bounded(fd: int, limit: int, timeout: float | None) -> bytes:
    """Reads to the end, at most `limit` bytes. `timeout`: for what is not a regular file,
    the longest the whole read may take (a regular file is always ready to read)."""
    parts: list[bytes] = []
    size = 0
    poller = select.poll() if timeout is not None and hasattr(select, "poll") else None
    if poller is not None:
        poller.register(fd, select.POLLIN)
    # One deadline for the whole read: a writer that trickles a byte now and then must not
    # hold a reload (or the start) for longer than `timeout` either.
    deadline = time.monotonic() + (timeout or 0.0)
    while True:
        # A FIFO that no writer ever opened is never ready: this is where that ends.
        if poller is not None and not poller.poll(max(deadline - time.monotonic(), 0.0) * 1000):
            raise TimeoutError(errno.ETIMEDOUT, f"not read to its end within {timeout:g} s "
                               "(the path is a pipe or a device, not a file?)")
        try:
            chunk = os.read(fd, min(_CHUNK, limit + 1 - size))
        except BlockingIOError:
            continue
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            raise TooLarge(limit)


def decode_source(raw: bytes, filename: str) -> str:
    """The text of a routes file, newlines folded as text mode reads them (so the version, a
    hash of the text, is the same whichever way the file was read). ConfigError if the bytes
    are not UTF-8."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError([Problem(filename, line, FILE, "the file is not UTF-8 text")]) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def load_config(
    path: str | Path,
    environ: Mapping[str, str] | None = None,
    *,
    timeout: float = READ_TIMEOUT,
) -> Config:
    """Reads and validates a route table. Raises OSError if unreadable (TooLarge, TimeoutError
    included), ConfigError if invalid."""
    filename = str(path)
    return parse_config(decode_source(read_source(path, timeout=timeout), filename), filename,
                        environ)
