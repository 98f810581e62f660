"""A token chunk's bytes learned from the stream, sans-IO: the decode path's shortcut.

A model server writes nearly every event of a stream as the same bytes around a different
piece of text: `data: {"id":…,"choices":[{"index":0,"delta":{"content":"<text>"},…}]}`. Once
one such event was decoded, its bytes before and after the text are the template. An event
that is those bytes around a string body with no quote, backslash or control byte in it is
the same chunk with that text: a run of such events becomes one TextRun (proxy/chunks.py)
from a few C-level splits and joins, with no decode and no dict per event. Anything else (an
escape, another field, a finish) is decoded as before; a token of another shape (the stream
turning from its reasoning to its answer) may teach the relay a new template.

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
# The delta fields a TextRun carries: text and reasoning.
_FIELDS = frozenset({"content", "reasoning_content"})


class TextTemplate:
    """The bytes of one stream's text-only chunk around its text, and the chunk's values."""

    __slots__ = ("_choice", "_end", "_event", "_outer", "_text", "field", "prefix", "suffix")

    def __init__(
        self,
        prefix: bytes,
        suffix: bytes,
        outer: dict[str, Any],
        choice: dict[str, Any],
        field: str,
    ) -> None:
        self.field = field
        self.prefix = prefix
        self.suffix = suffix
        self._outer = outer
        self._choice = choice
        # An event's bytes after its text, its blank line included; all its bytes but its text.
        self._end = suffix + b"\n\n"
        self._event = len(prefix) + len(suffix) + 2
        # An event's text from its bytes before its end, sliced in C when mapped over a run.
        self._text = itemgetter(slice(len(prefix), None))

    @classmethod
    def candidate(cls, chunk: Any) -> str | None:
        """The field of a chunk the template could be learned from: one choice, whose delta
        is text alone (content or reasoning), no finish_reason and no usage (what a TextRun
        holds)."""
        choices = chunk.get("choices")
        if type(choices) is not list or len(choices) != 1 or chunk.get("usage"):
            return None
        choice = choices[0]
        if type(choice) is not dict or choice.get("finish_reason") is not None:
            return None
        delta = choice.get("delta")
        if type(delta) is not dict or len(delta) != 1:
            return None
        fields: dict[str, Any] = delta
        [(field, text)] = fields.items()
        return field if field in _FIELDS and type(text) is str and text else None

    @classmethod
    def learn(cls, event: bytes, chunk: dict[str, Any], field: str) -> TextTemplate | None:
        """The template of `event` (one `data: {…}` line, decoded as `chunk`, whose text is
        in `field`), or None where it could not be exact."""
        choice = chunk["choices"][0]
        text = choice["delta"][field]
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
        template = cls(
            event[: at + 1], event[at + len(raw) - 1 :], dict(chunk), dict(choice), field
        )
        try:
            probe = orjson.loads(template.prefix[_DATA:] + b"?" + template.suffix)
        except orjson.JSONDecodeError:
            return None
        return template if [probe] == template.texts(["?"]).chunks() else None

    def run(
        self, read: bytes, pos: int, *, not_one: bool = False
    ) -> tuple[TextRun | None, int]:
        """The chunks of the events of `read` from `pos` on that match the template, one
        after another, and where they end (None and `pos` where the first does not).

        A few C-level splits, maps and joins per window of the read, however many events it
        holds: a window is split where an event's bytes after its text end, and each piece
        is one event's bytes before its text, then the text, up to the first that is not.
        The window starts at four events and grows fourfold while the run fills it, so a run
        costs about its own bytes and one that stops at once (a text that needs an escape)
        about four events' bytes: a read with many such stops stays linear. The rest of the
        read alone as one event is read by `text_at` first, unless the caller already found
        it is not (`not_one`).
        """
        size = len(read)
        one = None if not_one else self.text_at(read, pos)
        if one is not None:
            return TextRun(self._outer, self._choice, [one], self.field), size
        texts: list[bytes] = []
        start = pos
        window = 4 * self._event
        while start < size:
            pieces = read[start : start + window].split(self._end)
            # After the window's last end: a cut event, or nothing.
            pieces.pop()
            if not pieces:
                if start + window >= size:
                    break
                window *= 4  # a text longer than the window
                continue
            whole = len(pieces)
            starts = list(map(bytes.startswith, pieces, repeat(self.prefix)))
            if False in starts:
                del pieces[starts.index(False) :]
            found = list(map(self._text, pieces))
            joined = b"".join(found)
            unsafe = _UNSAFE.search(joined)
            if unsafe is not None:
                del found[bisect_right(list(accumulate(map(len, found))), unsafe.start()) :]
                joined = b"".join(found)
            texts += found
            start += len(joined) + len(found) * self._event
            if len(found) < whole:
                break
            window *= 4
        if not texts:
            return None, pos
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
            if not decoded:
                return None, pos
            del texts[len(decoded) :]
            start = pos + sum(map(len, texts)) + len(texts) * self._event
        return self.texts(decoded), start

    def text_at(self, read: bytes, pos: int = 0) -> str | None:
        """The text of the event that is all of `read` from `pos` on, its blank line included,
        when it is an event of the template; else None (it may still start a run).

        A token stream read as it comes gives one event a read: then its text, all between
        the prefix and the end, holds no quote, backslash or line end (and so no second
        event either), and the event decodes exactly to the template's chunk with that text.
        One slice and two scans instead of a run's splits, maps and joins; for the byte
        relay, instead of `pass_through`'s dozen checks."""
        end = self._end
        prefix = self.prefix
        size = len(read)
        # Slices compared, not endswith/startswith: their argument parsing costs more than
        # the copy (445 against 367 ns for this whole method).
        if not (size - pos >= self._event and read[size - len(end) :] == end
                and read[pos : pos + len(prefix)] == prefix):
            return None
        text = read[pos + len(prefix) : size - len(end)]
        if _UNSAFE.search(text) is not None:
            return None
        try:
            return text.decode()
        except UnicodeDecodeError:
            return None

    def texts(self, texts: list[str]) -> TextRun:
        """The chunks of this template's events with `texts`."""
        return TextRun(self._outer, self._choice, texts, self.field)
