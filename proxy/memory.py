"""Giving memory back after large upstream events.

An upstream event may be up to 4 MiB (proxy/sse.py's bound), and a burst of them in many
streams at once takes hundreds of MiB for a moment. glibc's allocator serves buffers that
large from fresh memory maps at first, but it raises its map threshold as it sees them freed,
so after the first burst it serves them from its heap, where anything allocated above them
keeps the memory from going back to the operating system: the process stays at its peak.
Fixing the threshold (what `MALLOC_MMAP_THRESHOLD_` does) keeps every large buffer in a map
of its own, returned the moment it is freed; small allocations, nearly all of the proxy's, are
not affected. Measured with bench/soak.py's burst episode: RSS went back to its base after
every burst, instead of staying 40-50 MiB above it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

# glibc's mallopt parameter number for the map threshold.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 1024
_TUNABLE = "glibc.malloc.mmap_threshold="


def return_large_buffers() -> bool:
    """Fixes glibc's map threshold, unless the environment already chose one; False where the
    C library is not glibc (musl, macOS) or refuses."""
    # Both spellings glibc reads at start; mallopt would override either.
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or _TUNABLE in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    if not done:
        log.debug("mallopt(M_MMAP_THRESHOLD) was refused")
    return done
