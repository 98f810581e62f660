"""Logging set-up: plain text for people, JSON lines for log collectors."""

from __future__ import annotations

import logging
import sys
import time

import orjson

from proxy.access_log import AccessWriter, install, quote

_STD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        # Structured fields passed with `extra=` become top-level keys.
        entry.update({k: v for k, v in vars(record).items() if k not in _STD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    """One line per record: structured fields passed with `extra=` follow as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = [(k, v) for k, v in vars(record).items() if k not in _STD]
        if not extra:
            return line
        return line + " " + " ".join(f"{k}={_text_value(v)}" for k, v in extra)


def _text_value(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    return quote(str(value))


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Every record to stderr in `fmt`; the access lines too, through a writer of their own
    that skips the logging machinery (proxy/access_log.py says why)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    install(AccessWriter(sys.stderr, fmt))
