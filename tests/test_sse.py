"""The SSE decoder reads what browsers read, whatever the chunking, and the encoders round-trip."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sse import DONE, Event, SSEDecoder, SSEError, encode_comment, encode_data


def decode(chunks: Iterable[bytes], decoder: SSEDecoder | None = None) -> list[Event]:
    dec = decoder if decoder is not None else SSEDecoder()
    events: list[Event] = []
    for chunk in chunks:
        events += dec.feed(chunk)
    return events + dec.flush()


def splits(stream: bytes) -> Iterable[tuple[int, list[bytes]]]:
    for i in range(len(stream) + 1):
        yield i, [stream[:i], stream[i:]]


# --- line endings ---------------------------------------------------------------------------

LINE_END_CASES = [
    pytest.param(b"data: a\ndata: b\n\n", id="lf"),
    pytest.param(b"data: a\r\ndata: b\r\n\r\n", id="crlf"),
    pytest.param(b"data: a\rdata: b\r\r", id="cr"),
    pytest.param(b"data: a\r\ndata: b\r\n", id="mixed-crlf-then-lf"),
    pytest.param(b"data: a\rdata: b\n\r\n", id="mixed-cr-lf-crlf"),
]


@pytest.mark.parametrize("stream", LINE_END_CASES)
def test_every_line_ending_style_gives_the_same_event(stream: bytes) -> None:
    assert decode([stream]) == [Event("a\nb")]


@pytest.mark.parametrize("stream", LINE_END_CASES)
def test_line_endings_survive_a_split_at_every_offset(stream: bytes) -> None:
    for i, chunks in splits(stream):
        assert decode(chunks) == [Event("a\nb")], f"split at {i}"


def test_cr_ending_one_chunk_and_lf_starting_the_next_count_as_one_line_end() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: a\r") == []
    # Were the LF a second line end, it would be a blank line and dispatch "a" right here.
    assert dec.feed(b"\ndata: b\r") == []
    assert dec.feed(b"\n") == []
    assert dec.feed(b"\r\n") == [Event("a\nb")]


def test_cr_then_empty_chunk_then_lf_still_counts_once() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: a\r") == []
    assert dec.feed(b"") == []
    assert dec.feed(b"\n") == []
    assert dec.feed(b"\n") == [Event("a")]


def test_cr_at_chunk_end_followed_by_a_non_lf_starts_a_new_line() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: a\r") == []
    assert dec.feed(b"\r") == [Event("a")]


# --- fields ---------------------------------------------------------------------------------

FIELD_CASES = [
    pytest.param(b"data: x\ndata: y\ndata: z\n\n", [Event("x\ny\nz")], id="multiline-data"),
    pytest.param(b"data: a\n\ndata: b\n\n", [Event("a"), Event("b")], id="two-events"),
    pytest.param(b"event: ping\ndata: x\n\n", [Event("x", "ping")], id="event-type"),
    pytest.param(
        b"event: ping\ndata: x\n\ndata: y\n\n",
        [Event("x", "ping"), Event("y")],
        id="event-type-resets-after-dispatch",
    ),
    pytest.param(b"event:\ndata: x\n\n", [Event("x")], id="empty-event-type-is-message"),
    pytest.param(
        b"id: 1\ndata: a\n\ndata: b\n\n",
        [Event("a", id="1"), Event("b", id="1")],
        id="id-persists-like-lastEventId",
    ),
    pytest.param(
        b"id: 1\ndata: a\n\nid\ndata: b\n\n",
        [Event("a", id="1"), Event("b", id="")],
        id="empty-id-resets",
    ),
    pytest.param(b"id: 1\0 2\ndata: a\n\n", [Event("a")], id="id-with-nul-ignored"),
    pytest.param(b"id: 7\n\ndata: a\n\n", [Event("a", id="7")], id="id-set-by-dataless-block"),
    pytest.param(b"retry: 1500\ndata: a\n\n", [Event("a", retry=1500)], id="retry"),
    pytest.param(b"retry: 15s\ndata: a\n\n", [Event("a")], id="retry-non-digit-ignored"),
    pytest.param(b"retry: -1\ndata: a\n\n", [Event("a")], id="retry-negative-ignored"),
    pytest.param(b"retry\ndata: a\n\n", [Event("a")], id="retry-empty-ignored"),
    pytest.param(
        b"retry: " + b"9" * 5000 + b"\ndata: a\n\n", [Event("a")], id="retry-too-long-ignored"
    ),
    pytest.param(b"data\n\n", [Event("")], id="field-without-colon-is-empty-value"),
    pytest.param(b"data\ndata\n\n", [Event("\n")], id="two-empty-data-lines"),
    pytest.param(b"data:a\n\n", [Event("a")], id="no-space-after-colon"),
    pytest.param(b"data:  a\n\n", [Event(" a")], id="only-one-space-removed"),
    pytest.param(b"data: a: b\n\n", [Event("a: b")], id="colon-inside-value"),
    pytest.param(b": hi\ndata: a\n:\n\n", [Event("a")], id="comments-ignored"),
    pytest.param(b"event: x\n\n\n\ndata: a\n\n", [Event("a")], id="blank-lines-without-data"),
    pytest.param(b"foo: bar\nData: no\ndata: a\n\n", [Event("a")], id="unknown-fields-ignored"),
    pytest.param(b"\xef\xbb\xbfdata: a\n\n", [Event("a")], id="bom-stripped"),
    pytest.param(b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\n", [], id="only-one-bom-stripped"),
    pytest.param(b"\xef\xbbdata: a\n\n", [], id="partial-bom-is-not-a-bom"),
    pytest.param(b"data: a\n\n\xef\xbb\xbfdata: b\n\n", [Event("a")], id="bom-midstream-kept"),
    pytest.param(b"data: \xff\xfe\n\n", [Event("\ufffd\ufffd")], id="invalid-utf8-replaced"),
]


@pytest.mark.parametrize(("stream", "expected"), FIELD_CASES)
def test_field_parsing(stream: bytes, expected: list[Event]) -> None:
    assert decode([stream]) == expected


@pytest.mark.parametrize(("stream", "expected"), FIELD_CASES)
def test_field_parsing_is_independent_of_chunking(stream: bytes, expected: list[Event]) -> None:
    for i, chunks in splits(stream):
        assert decode(chunks) == expected, f"split at {i}"
    assert decode(stream[i : i + 1] for i in range(len(stream))) == expected


def test_comments_are_counted_and_dispatch_nothing() -> None:
    dec = SSEDecoder()
    assert dec.feed(b": keep-alive\n\n:\n: x: y\n") == []
    assert dec.comments == 3
    assert dec.feed(b"data: a\n\n") == [Event("a")]


def test_bom_split_across_feeds_is_stripped() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"\xef") == []
    assert dec.feed(b"") == []
    assert dec.feed(b"\xbb") == []
    assert dec.feed(b"\xbfdata: a\n\n") == [Event("a")]


# --- UTF-8 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("char", ["é", "€", "中", "😀"], ids=["2-byte", "3-byte", "cjk", "4-byte"])
def test_multibyte_char_split_across_feeds_at_every_offset(char: str) -> None:
    stream = f"event: {char}\ndata: a{char}b\ndata: {char}\n\n".encode()
    for i, chunks in splits(stream):
        assert decode(chunks) == [Event(f"a{char}b\n{char}", char)], f"split at {i}"


# --- long lines -----------------------------------------------------------------------------


def test_one_mib_data_line_fed_in_1000_byte_chunks_decodes_exactly() -> None:
    payload = ("0123456789abcdé" * 70_000)[: 1 << 20]
    stream = b"data: " + payload.encode() + b"\n\n"
    events = decode(stream[i : i + 1000] for i in range(0, len(stream), 1000))
    assert events == [Event(payload)]


def test_line_of_exactly_max_line_bytes_is_accepted() -> None:
    assert decode([b"data: 1234\n\n"], SSEDecoder(max_line=10)) == [Event("1234")]


@pytest.mark.parametrize(
    "chunks",
    [
        pytest.param([b"data: 12345\n\n"], id="terminated-in-one-chunk"),
        pytest.param([b"data: 12345"], id="unterminated"),
        pytest.param([b"data: ", b"123", b"45"], id="grown-across-chunks"),
        pytest.param([b"data: 1\n", b"\ndata: 12345", b"\n\n"], id="after-valid-events"),
    ],
)
def test_line_over_max_line_raises(chunks: list[bytes]) -> None:
    dec = SSEDecoder(max_line=10)
    with pytest.raises(SSEError):
        for chunk in chunks:
            dec.feed(chunk)


def test_decoder_refuses_input_after_an_overlong_line() -> None:
    dec = SSEDecoder(max_line=10)
    with pytest.raises(SSEError):
        dec.feed(b"data: 0123456789")
    # Resuming would read the rest of the long line as a line of its own.
    with pytest.raises(SSEError):
        dec.feed(b"\nevent:x\ndata:x\n\n")
    with pytest.raises(SSEError):
        dec.flush()


def test_sse_error_is_a_value_error() -> None:
    assert issubclass(SSEError, ValueError)


# --- flush ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        pytest.param(b"data: [DONE]", [Event("[DONE]")], id="done-without-newline"),
        pytest.param(b"data: [DONE]\n", [Event("[DONE]")], id="done-with-one-newline"),
        pytest.param(b"data: [DONE]\r", [Event("[DONE]")], id="done-with-one-cr"),
        pytest.param(b"data: a\ndata: b", [Event("a\nb")], id="unterminated-multiline-event"),
        pytest.param(b"event: x\nid: 3\ndata: a\n", [Event("a", "x", "3")], id="with-fields"),
        pytest.param(b"event: x\n", [], id="pending-event-without-data"),
        pytest.param(b": comment", [], id="pending-comment"),
        pytest.param(b"", [], id="empty-stream"),
    ],
)
def test_flush_dispatches_a_pending_event_with_data(stream: bytes, expected: list[Event]) -> None:
    dec = SSEDecoder()
    assert dec.feed(stream) == []
    assert dec.flush() == expected


def test_flush_after_a_complete_stream_returns_nothing_and_is_idempotent() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: a\n\n" + DONE) == [Event("a"), Event("[DONE]")]
    assert dec.flush() == []
    assert dec.flush() == []


def test_flush_of_spec_example_keeps_the_unterminated_last_event() -> None:
    # The spec's own example: browsers dispatch "" and "\n" and drop the final "data:".
    assert decode([b"data\n\ndata\ndata\n\ndata:"]) == [Event(""), Event("\n"), Event("")]


# --- recorded streams -----------------------------------------------------------------------


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-AZ9x3kQ1",
        "object": "chat.completion.chunk",
        "created": 1733000000,
        "model": "gpt-4o-mini-2024-07-18",
        "system_fingerprint": "fp_0ba0d124f1",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        "usage": None,
    }


def _tool_delta(args: str, first: bool = False) -> dict[str, Any]:
    call: dict[str, Any] = {"index": 0, "function": {"arguments": args}}
    if first:
        call = {
            "index": 0,
            "id": "call_q8Yw2",
            "type": "function",
            "function": {"name": "get_weather", "arguments": args},
        }
    return {"tool_calls": [call]}


OPENAI_CHUNKS: list[dict[str, Any]] = [
    _chunk({"role": "assistant", "content": "", "refusal": None}),
    _chunk({"content": "Let"}),
    _chunk({"content": " me check"}),
    _chunk({"content": " the café's"}),
    _chunk({"content": " weather 😀"}),
    _chunk({"content": "…"}),
    _chunk(_tool_delta("", first=True)),
    _chunk(_tool_delta('{"city"')),
    _chunk(_tool_delta(':"Paris, Île-de-France"')),
    _chunk(_tool_delta("}")),
    _chunk({}, finish="tool_calls"),
    {
        **_chunk({}),
        "choices": [],
        "usage": {"prompt_tokens": 57, "completion_tokens": 21, "total_tokens": 78},
    },
]


def _sse_line(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def _stream(lines: list[bytes], eol: bytes) -> bytes:
    return b"".join(line + eol + eol for line in lines)


OPENAI_LINES = [
    _sse_line(OPENAI_CHUNKS[0]),
    b": OPENROUTER PROCESSING",
    *(_sse_line(c) for c in OPENAI_CHUNKS[1:]),
    b"data: [DONE]",
]
EOLS = [
    pytest.param(b"\n", id="lf"),
    pytest.param(b"\r\n", id="crlf"),
    pytest.param(b"\r", id="cr"),
]


@pytest.mark.parametrize("eol", EOLS)
def test_openai_stream_decodes_to_its_chunks_then_done(eol: bytes) -> None:
    dec = SSEDecoder()
    events = decode([_stream(OPENAI_LINES, eol)], dec)
    assert [json.loads(e.data) for e in events[:-1]] == OPENAI_CHUNKS
    assert events[-1] == Event("[DONE]")
    assert {e.event for e in events} == {"message"}
    assert dec.comments == 1


@pytest.mark.parametrize("eol", EOLS)
def test_openai_stream_split_at_every_offset_matches_whole(eol: bytes) -> None:
    stream = _stream(OPENAI_LINES, eol)
    whole = decode([stream])
    assert len(whole) == len(OPENAI_CHUNKS) + 1
    for i, chunks in splits(stream):
        dec = SSEDecoder()
        assert decode(chunks, dec) == whole, f"split at {i}"
        assert dec.comments == 1


@pytest.mark.parametrize("eol", EOLS)
def test_openai_stream_fed_byte_by_byte_matches_whole(eol: bytes) -> None:
    stream = _stream(OPENAI_LINES, eol)
    assert decode(stream[i : i + 1] for i in range(len(stream))) == decode([stream])


def test_short_stream_split_into_three_pieces_at_every_pair_of_offsets() -> None:
    stream = (
        b'data: {"choices":[{"delta":{"role":"assistant"}}]}\r\n\r\n'
        b": ping\r\n\r\n"
        + 'data: {"choices":[{"delta":{"content":"é😀"}}]}\r\n\r\n'.encode()
        + b"data: [DONE]\r\n"
    )
    whole = decode([stream])
    assert [e.data for e in whole] == [
        '{"choices":[{"delta":{"role":"assistant"}}]}',
        '{"choices":[{"delta":{"content":"é😀"}}]}',
        "[DONE]",
    ]
    n = len(stream)
    for i in range(n + 1):
        for j in range(i, n + 1):
            assert decode([stream[:i], stream[i:j], stream[j:]]) == whole, f"split at {i}, {j}"


LETTA_STREAMS = sorted(
    p
    for p in (Path(__file__).parent / "fixtures" / "letta").glob("*.sse")
    if ".timestamped." not in p.name
)


@pytest.mark.parametrize("path", LETTA_STREAMS, ids=[p.name for p in LETTA_STREAMS])
def test_recorded_letta_stream_split_at_every_offset_matches_whole(path: Path) -> None:
    stream = path.read_bytes()
    whole = decode([stream])
    assert whole
    for i, chunks in splits(stream):
        assert decode(chunks) == whole, f"split at {i}"


# --- property -------------------------------------------------------------------------------

NO_EOL = st.characters(exclude_characters="\r\n", exclude_categories=["Cs"])


@st.composite
def event_streams(draw: st.DrawFn) -> tuple[bytes, list[Event]]:
    """Random events, each framed with its own line-end style, plus what they decode to."""
    parts: list[bytes] = []
    expected: list[Event] = []
    last_id: str | None = None
    if draw(st.booleans()):
        parts.append(b"\xef\xbb\xbf")
    for _ in range(draw(st.integers(0, 6))):
        # One style per event: a CR-ended line followed by an LF-ended blank line would be one
        # CRLF line end, which is the decoder being right, not the encoding being lossless.
        eol = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
        lines: list[str] = []
        if draw(st.booleans()):
            lines.append(": " + draw(st.text(NO_EOL, max_size=10)))
        name = draw(st.text(NO_EOL, max_size=12))
        if name:
            lines.append("event: " + name)
        if draw(st.booleans()):
            last_id = draw(st.text(st.characters(exclude_characters="\r\n\0", codec="utf-8")))
            lines.append("id: " + last_id)
        data = draw(st.lists(st.text(NO_EOL, max_size=20), min_size=1, max_size=4))
        lines += ["data: " + d for d in data]
        parts.append(b"".join(line.encode() + eol for line in lines) + eol)
        expected.append(Event("\n".join(data), name or "message", last_id))
    return b"".join(parts), expected


@settings(max_examples=300, deadline=None)
@given(event_streams(), st.data())
def test_random_events_round_trip_through_any_chunking(
    case: tuple[bytes, list[Event]], data: st.DataObject
) -> None:
    stream, expected = case
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    bounds = [0, *cuts, len(stream)]
    chunks = [stream[a:b] for a, b in pairwise(bounds)]
    assert decode(chunks) == expected
    assert decode([stream]) == expected


def reference_decode(stream: bytes) -> tuple[list[Event], int]:
    """The spec's algorithm read literally, on the whole stream at once, plus flush's rule."""
    text = stream.decode("utf-8", "replace").removeprefix("\ufeff")
    *lines, tail = re.split(r"\r\n|\r|\n", text)
    lines += [tail, ""] if tail else [""]
    events: list[Event] = []
    data: list[str] = []
    event_type, last_id, retry, comments = "", None, None, 0
    for line in lines:
        if not line:
            if data:
                events.append(Event("\n".join(data), event_type or "message", last_id, retry))
            data, event_type = [], ""
        elif line.startswith(":"):
            comments += 1
        else:
            name, colon, value = line.partition(":")
            if colon and value.startswith(" "):
                value = value[1:]
            if name == "data":
                data.append(value)
            elif name == "event":
                event_type = value
            elif name == "id" and "\0" not in value:
                last_id = value
            elif name == "retry" and value and all(c in "0123456789" for c in value):
                retry = int(value)
    return events, comments


TOKENS = [
    b"data", b"data:", b"data: ", b"event:", b"event: x", b"id:", b"id: 1", b"retry:", b"42",
    b":", b" ", b"x", b"\r", b"\n", b"\r\n", b"\xc3\xa9", b"\xf0\x9f", b"\x98\x80",
    b"\xef\xbb\xbf", b"\xef", b"\0", b"\xff",
]  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=40).map(b"".join), st.data())
def test_byte_soup_decodes_like_the_spec_algorithm_under_any_chunking(
    stream: bytes, data: st.DataObject
) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    bounds = [0, *cuts, len(stream)]
    dec = SSEDecoder()
    events = decode([stream[a:b] for a, b in pairwise(bounds)], dec)
    assert (events, dec.comments) == reference_decode(stream)


# --- encoders -------------------------------------------------------------------------------


def test_encode_data_frames_one_event() -> None:
    payload = json.dumps(OPENAI_CHUNKS[3], ensure_ascii=False, separators=(",", ":")).encode()
    framed = encode_data(payload)
    assert framed == b"data: " + payload + b"\n\n"
    assert decode([framed]) == [Event(payload.decode())]


def test_encode_comment_is_a_keepalive_the_decoder_ignores() -> None:
    assert encode_comment() == b": keep-alive\n\n"
    dec = SSEDecoder()
    assert dec.feed(encode_comment() + encode_comment("ping")) == []
    assert dec.comments == 2


def test_done_decodes_to_the_done_sentinel() -> None:
    assert DONE == b"data: [DONE]\n\n"
    assert decode([encode_data(b"{}") + encode_comment() + DONE]) == [
        Event("{}"),
        Event("[DONE]"),
    ]


@pytest.mark.parametrize("bad", [b"a\nb", b"a\rb", b"a\r\n"], ids=["lf", "cr", "crlf"])
def test_encode_data_rejects_line_ends(bad: bytes) -> None:
    with pytest.raises(ValueError, match="CR or LF"):
        encode_data(bad)


@pytest.mark.parametrize("bad", ["a\nb", "a\rb"], ids=["lf", "cr"])
def test_encode_comment_rejects_line_ends(bad: str) -> None:
    with pytest.raises(ValueError, match="CR or LF"):
        encode_comment(bad)


def test_an_event_of_many_short_data_lines_is_bounded_like_one_long_line() -> None:
    decoder = SSEDecoder(max_line=1000)
    with pytest.raises(SSEError, match="event larger than 1000 bytes"):
        for _ in range(20):
            decoder.feed(b"data: " + b"x" * 100 + b"\n")
    # After the refusal the decoder takes nothing more.
    with pytest.raises(SSEError):
        decoder.feed(b"\n")


def test_the_event_bound_counts_each_event_afresh() -> None:
    decoder = SSEDecoder(max_line=1000)
    events = []
    for _ in range(5):
        events += decoder.feed(b"data: " + b"x" * 300 + b"\ndata: " + b"y" * 300 + b"\n\n")
    assert len(events) == 5
