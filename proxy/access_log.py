"""The access log: one line per request, and the writer that keeps it cheap.

Through `logging` a line costs about 19 µs (a LogRecord of a dozen attributes, a Formatter
pass over them, a lock, a flush and a write system call each): an eighth of a sync request's
CPU. So `agentproxy serve` installs an `AccessWriter` (`install`, from `setup_logging`): it
formats the line itself, in the configured format, and writes the lines of the last few
milliseconds to the stream in one go. Without one (the app embedded elsewhere, the tests)
each line is an ordinary record of the `agentproxy.access` logger, with the same fields as
`extra`.

Either way the logger's level decides: the caller asks `access_log.isEnabledFor(level)`
first, so at `--log-level warning` nothing is built at all.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

import orjson

if TYPE_CHECKING:
    from proxy.exchange import Exchange

access_log = logging.getLogger("agentproxy.access")

# How long a line may wait for others to share its write (seconds): a write system call per
# line would cost as much as the formatting, and at a few thousand requests a second one
# write carries dozens of lines. The most lines held at once, whatever the time.
_WINDOW = 0.01
_MAX_PENDING = 256
_now = time.time


def quote(text: str) -> str:
    """`text` as one token of a `key=value` text line: as it is when it cannot be misread,
    else as a JSON string. Some values (the path, the model) come from the client, and a
    control character in them could forge a line or colour a terminal."""
    if text.isprintable():
        if text and " " not in text and '"' not in text and "=" not in text:
            return text
        return orjson.dumps(text).decode()
    # Python counts line and paragraph separators (U+2028, U+0085...) as not printable, and
    # orjson would leave those raw: escape everything that is not ASCII.
    return json.dumps(text)


# A text line's fixed parts, per (level, method, path[, model, upstream, stream]): quoted and
# laid out once, so a request only formats its own numbers into them. Emptied when it fills, so
# a client sending endless paths or names cannot grow it.
_TEMPLATES: dict[tuple[Any, ...], str] = {}
_TEMPLATES_MAX = 1024


def _template(level: int, method: str, path: str, ex: Exchange) -> str:
    def fixed(text: str) -> str:
        return quote(text).replace("%", "%%")

    head = (
        f"%s,%03d {logging.getLevelName(level)} agentproxy.access: {fixed(method)} "
        f"{fixed(path)} request_id=%s status=%d duration_ms=%s bytes=%d"
    )
    if not ex.chat:
        return head
    return (
        f"{head} model={fixed(ex.model[:256])} upstream={fixed(ex.upstream)}"
        f" stream={'true' if ex.stream else 'false'} ttft_ms=%s"
    )


class AccessWriter:
    """Formats access lines in one f-string each (text) or one orjson call (json) and writes
    them to `stream` together, at most `_WINDOW` seconds after the first of them.

    `line(level, request_id, method, path, exchange, duration, sent)` takes one request's
    line: the method of the writer's format, chosen once, so a line is one call."""

    __slots__ = ("_lines", "_second", "_stamp", "_stream", "_timer", "line")

    def __init__(self, stream: TextIO, fmt: str = "text") -> None:
        self._stream = stream
        self._lines: list[str] = []
        # The timestamp's text down to the second, made again only when the second changes.
        self._second = -1
        self._stamp = ""
        self._timer: asyncio.TimerHandle | None = None
        self.line: Callable[[int, str, str, str, Exchange, float, int], None] = (
            self._json_line if fmt == "json" else self._text_line
        )

    def _restamp(self, second: int) -> None:
        self._second = second
        # The formats of JsonFormatter and TextFormatter (logging's asctime), so the access
        # lines read like every other line of the process.
        self._stamp = (
            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            if self.line == self._json_line
            else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        )

    def _held(self, text: str) -> None:
        lines = self._lines
        lines.append(text)
        if self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(_WINDOW, self.flush)
            except RuntimeError:  # no loop: nothing to wait for
                self.flush()
        elif len(lines) >= _MAX_PENDING:
            self.flush()

    def _text_line(
        self, level: int, request_id: str, method: str, path: str, ex: Exchange,
        duration: float, sent: int,
    ) -> None:
        now = _now()
        second = int(now)
        if second != self._second:
            self._restamp(second)
        chat = ex.chat
        key = (level, method, path, ex.model[:256], ex.upstream, ex.stream) if chat else (
            level, method, path)
        template = _TEMPLATES.get(key)
        if template is None:
            template = _template(level, method, path, ex)
            if len(_TEMPLATES) >= _TEMPLATES_MAX:
                _TEMPLATES.clear()
            _TEMPLATES[key] = template
        # Request ids are the proxy's own or passed its check (proxy/front.py): of what a
        # text line must quote they can only hold "=".
        rid = request_id if "=" not in request_id else quote(request_id)
        # round(), not a format with two decimals: the numbers read as the logging path
        # writes them (`fields`), 40.5 and not 40.50.
        if chat:
            ttft = ex.ttft
            line = template % (
                self._stamp, (now - second) * 1000, rid, ex.status, round(duration * 1000.0, 2),
                sent, "-" if ttft is None else round(ttft * 1000.0, 2),
            )
        else:
            line = template % (
                self._stamp, (now - second) * 1000, rid, ex.status, round(duration * 1000.0, 2),
                sent,
            )
        error = ex.error
        self._held(line + "\n" if error is None else f"{line} error={quote(error)}\n")

    def _json_line(
        self, level: int, request_id: str, method: str, path: str, ex: Exchange,
        duration: float, sent: int,
    ) -> None:
        now = _now()
        second = int(now)
        if second != self._second:
            self._restamp(second)
        # JSON escapes whatever the client sent: the path goes in as it is.
        entry: dict[str, Any] = {
            "ts": f"{self._stamp}.{int((now - second) * 1000):03d}Z",
            "level": logging.getLevelName(level).lower(),
            "logger": "agentproxy.access",
            "msg": f"{method} {path}",
            **fields(request_id, ex, duration, sent),
        }
        self._held(orjson.dumps(entry).decode() + "\n")

    def flush(self) -> None:
        """Writes the lines held so far; a stream that is gone loses them, as logging would.
        The CLI calls it when its loop ends, so a loop's pending timer never outlives it."""
        if self._timer is not None:
            self._timer.cancel()  # called early; harmless from the timer itself
            self._timer = None
        lines = self._lines
        if not lines:
            return
        text = "".join(lines)
        lines.clear()
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):  # a closed pipe or file: nobody reads the log now
            pass


_writer: AccessWriter | None = None


def install(writer: AccessWriter | None) -> None:
    """Access lines go to `writer` from now on; None: back to `logging` records. Lines the
    previous writer still held are written first, and what a writer holds at exit too."""
    global _writer
    if _writer is not None:
        _writer.flush()
    _writer = writer
    atexit.unregister(flush)
    if writer is not None:
        atexit.register(flush)


def flush() -> None:
    """Writes what the installed writer holds (at the end of a worker's loop, and at exit)."""
    if _writer is not None:
        _writer.flush()


def fields(request_id: str, ex: Exchange, duration: float, sent: int) -> dict[str, Any]:
    """The line's fields, in their order."""
    out: dict[str, Any] = {
        "request_id": request_id,
        "status": ex.status,
        "duration_ms": round(duration * 1000.0, 2),
        "bytes": sent,
    }
    if ex.chat:
        out["model"] = ex.model[:256]
        out["upstream"] = ex.upstream
        out["stream"] = ex.stream
        out["ttft_ms"] = None if ex.ttft is None else round(ex.ttft * 1000.0, 2)
    if ex.error is not None:
        out["error"] = ex.error
    return out


def log_exchange(
    request_id: str, method: str, path: str, ex: Exchange, duration: float, sent: int,
    level: int = logging.INFO,
) -> None:
    """One line per request. The caller checks `access_log.isEnabledFor(level)` first."""
    writer = _writer
    if writer is not None:
        writer.line(level, request_id, method, path, ex, duration, sent)
        return
    # The message is the same for every handler a user may attach, JSON ones included: the
    # path goes in quoted when it holds anything that could forge or break a text line.
    access_log.log(
        level, "%s %s", method, quote(path), extra=fields(request_id, ex, duration, sent)
    )
