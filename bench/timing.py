"""Shared by the micro-benchmarks: the best per-call CPU time of a piece of work."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_of(rounds: int, repeat: int, work: Callable[[], object]) -> float:
    """Seconds of CPU per call of `work`: the best of `rounds` rounds of `repeat` calls (the
    least disturbed round on a shared machine)."""
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(repeat):
            work()
        best = min(best, time.process_time() - start)
    return best / repeat
