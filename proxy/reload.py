"""The holder of the current route table.

A request reads `holder.current` once and keeps that table to its end, so swapping the
reference is the whole of a reload as far as requests are concerned.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from proxy.config import ConfigError, load_config
from proxy.routing import RouteTable


class TableHolder:
    def __init__(self, path: str | Path, extra_keys: Sequence[str] = ()) -> None:
        self.path = Path(path)
        self.extra_keys = tuple(extra_keys)
        self.current = RouteTable(load_config(self.path), self.extra_keys)
        self.last_error: str | None = None
        self.last_attempt = time.time()
        self.draining = False

    def reload(self) -> bool:
        """Build the whole new table first; on any problem keep the last good one."""
        self.last_attempt = time.time()
        try:
            table = RouteTable(load_config(self.path), self.extra_keys)
        except (ConfigError, OSError) as exc:
            self.last_error = str(exc)
            return False
        self.current = table
        self.last_error = None
        return True
