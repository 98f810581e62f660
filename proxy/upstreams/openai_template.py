"""A token chunk's bytes learned once per stream, sans-IO: the decode path's shortcut.

A model server writes nearly every event of a stream as the same bytes around a different
piece of text: `data: {"id":…,"choices":[{"index":0,"delta":{"content":"<text>"},…}]}`. Once
one such event was decoded, its bytes before and after the text are the template. An event
that is those bytes around a string body with no quote, backslash or control byte in it is
the same chunk with that text: a run of such events becomes one TextRun (proxy/chunks.py)
from a few C-level splits and joins, with no decode and no dict per event. Anything else (an
escape, another field, a finish) is decoded as before.

The template is only learned where that is provably exact: the chunk has text alone, no
finish_reason and no usage (what a TextRun holds); its other values are scalars (so nothing
is shared between chunks that a consumer could change); and putting another text where the
text's JSON is in the event decodes to the same chunk with that text (so those bytes are the
delta's text and nothing else). An event of the template then decodes to exactly the
template's chunk with its text: nothing for the relay to check in it, since the event it was
learned from had the same bytes around its text and was checked.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from itertools import accumulate, repeat
from operator import itemgetter
from typing import Any

import orjson

from proxy.chunks import TextRun

__all__ = ["TextTemplate"]

# What a JSON string body must not hold raw to be taken as its text unchanged: the quote
# that would end it, the backslash of an escape, and the control bytes JSON forbids.
_UNSAFE = re.compile(rb'["\\\x00-\x1f]')
_DATA = len(b"data: ")
_SCALARS = (str, int, float, bool, type(None))


class TextTemplate:
    """The bytes of one stream's text-only chunk around its text, and the chunk's values."""

    __slots__ = ("_choice", "_end", "_event", "_outer", "prefix", "suffix")

    def __init__(
        self, prefix: bytes, suffix: bytes, outer: dict[str, Any], choice: dict[str, Any]
    ) -> None:
        self.prefix = prefix
        self.suffix = suffix
        self._outer = outer
        self._choice = choice
        # An event's bytes after its text, its blank line included; all its bytes but its text.
        self._end = suffix + b"\n\n"
        self._event = len(prefix) + len(suffix) + 2

    @classmethod
    def candidate(cls, chunk: Any) -> str | None:
        """The text of a chunk the template could be learned from: one choice, whose delta
        is text alone, no finish_reason and no usage (what a TextRun holds)."""
        choices = chunk.get("choices")
        if type(choices) is not list or len(choices) != 1 or chunk.get("usage"):
            return None
        choice = choices[0]
        if type(choice) is not dict or choice.get("finish_reason") is not None:
            return None
        delta = choice.get("delta")
        if type(delta) is not dict or len(delta) != 1:
            return None
        text = delta.get("content")
        return text if type(text) is str and text else None

    @classmethod
    def learn(cls, event: bytes, chunk: dict[str, Any], text: str) -> TextTemplate | None:
        """The template of `event` (one `data: {…}` line, decoded as `chunk`, whose text is
        `text`), or None where it could not be exact."""
        choice = chunk["choices"][0]
        if not all(isinstance(v, _SCALARS) for k, v in chunk.items() if k != "choices"):
            return None
        if not all(isinstance(v, _SCALARS) for k, v in choice.items() if k != "delta"):
            return None
        # Where the server wrote the text as orjson would; should that be some other value's
        # bytes, or the server escape differently, the probe below fails.
        raw = orjson.dumps(text)
        at = event.find(raw)
        if at < 0:
            return None
        template = cls(event[: at + 1], event[at + len(raw) - 1 :], dict(chunk), dict(choice))
        try:
            probe = orjson.loads(template.prefix[_DATA:] + b"?" + template.suffix)
        except orjson.JSONDecodeError:
            return None
        return template if [probe] == template.texts(["?"]).chunks() else None

    def run(self, read: bytes, pos: int) -> tuple[TextRun | None, int]:
        """The chunks of the events of `read` from `pos` on that match the template, one
        after another, and where they end (None and `pos` where the first does not).

        A constant number of C-level splits, maps and joins for the whole run, however long
        it is: the read is split where an event's bytes after its text end, and each piece
        from `pos` on is one event's bytes before its text, then the text, up to the first
        that is not.
        """
        pieces = read[pos:].split(self._end)
        # After the last end: no whole event of the template (or nothing).
        pieces.pop()
        starts = list(map(bytes.startswith, pieces, repeat(self.prefix)))
        if False in starts:
            del pieces[starts.index(False) :]
        texts = list(map(itemgetter(slice(len(self.prefix), None)), pieces))
        joined = b"".join(texts)
        unsafe = _UNSAFE.search(joined)
        if unsafe is not None:
            del texts[bisect_right(list(accumulate(map(len, texts))), unsafe.start()) :]
            joined = b"".join(texts)
        try:
            # No text holds a NUL (that was checked), so it tells them apart.
            decoded = b"\0".join(texts).decode().split("\0")
        except UnicodeDecodeError:
            decoded = []
            for text in texts:
                try:
                    decoded.append(text.decode())
                except UnicodeDecodeError:
                    break
            del texts[len(decoded) :]
            joined = b"".join(texts)
        if not texts:
            return None, pos
        return self.texts(decoded), pos + len(joined) + len(texts) * self._event

    def texts(self, texts: list[str]) -> TextRun:
        """The chunks of this template's events with `texts`."""
        return TextRun(self._outer, self._choice, texts)
