"""Fuzzing the stream codecs over random splits and corruptions of captured streams.

Inputs are the Letta streams captured from a real server (tests/fixtures/letta/*.sse) and an
OpenAI stream with every kind of chunk. Each example cuts its stream into random chunks and,
unless it is a clean run, corrupts it first: flipped bytes, truncation, inserted CR/LF, dropped
bytes, invalid UTF-8. The properties:

* SSEDecoder raises nothing but SSEError, and refuses input after one;
* LettaTranslator never raises (a broken stream sets `.error`), and what it returns can
  always be encoded as JSON (the adapter does that next);
* the openai relay's `_RelayState.frame` raises nothing (a broken stream sets `.error`, a
  ProxyError) and frames each event so that the client decodes exactly the upstream's data;
* on an uncorrupted stream, the output does not depend on where the stream was split.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.chunks import Out, chat_chunks
from proxy.errors import ProxyError
from proxy.openai_types import ChunkFactory
from proxy.sse import Event, SSEDecoder, SSEError
from proxy.upstreams.letta_translator import LettaTranslator
from proxy.upstreams.openai_relay import RelayState
from tests.fake_letta import FIXTURES, sse_events

SETTINGS = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=250,
    suppress_health_check=[HealthCheck.too_slow],
)


def letta_streams() -> dict[str, bytes]:
    streams = {}
    for path in sorted(FIXTURES.glob("*.sse")):
        name = path.name.removesuffix(".sse").removesuffix(".timestamped")
        streams[name] = b"".join(sse_events(path.name))
    return streams


LETTA = letta_streams()


def openai_stream(line_end: bytes = b"\n") -> bytes:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return orjson.dumps(
            {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
             "model": "m", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        )

    events = [
        b": upstream keep-alive",
        b"data: " + chunk({"role": "assistant", "content": ""}),
        b"data: " + chunk({"content": "Bonjour, ça va ? 🦜"}),
        b"data: " + chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                          "function": {"name": "get_weather", "arguments": ""}}]}),
        b"data: " + chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        b"id: 7\nretry: 100\ndata: " + chunk({"content": "multi"}),
        # A multi-line data event: legal SSE, the lines join with "\n".
        b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,\n'
        b'data: "model":"m","choices":[{"index":0,"delta":{"content":"x"},\n'
        b'data: "finish_reason":null}]}',
        b"data: " + chunk({}, "tool_calls"),
        b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
        b'"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}',
        b"data: [DONE]",
    ]
    return b"".join(e.replace(b"\n", line_end) + line_end * 2 for e in events)


OPENAI = {
    "lf": openai_stream(),
    "crlf": openai_stream(b"\r\n"),
    "cr": openai_stream(b"\r"),
    "bom": b"\xef\xbb\xbf" + openai_stream(),
}
ALL = {
    **{f"letta/{k}": v for k, v in LETTA.items()},
    **{f"openai/{k}": v for k, v in OPENAI.items()},
}


# --- splitting and corrupting -------------------------------------------------------------------


@st.composite
def splits(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """`data` cut at random offsets (empty chunks included, as a socket never sends them)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=40)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return pieces


CORRUPTIONS = ("flip", "truncate", "insert_cr", "insert_lf", "insert_crlf", "drop",
               "invalid_utf8", "insert_colon", "duplicate")


@st.composite
def corrupted(draw: st.DrawFn, data: bytes) -> bytes:
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(CORRUPTIONS))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if how == "flip" and data:
            data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]
        elif how == "truncate":
            data = data[:i]
        elif how == "insert_cr":
            data = data[:i] + b"\r" + data[i:]
        elif how == "insert_lf":
            data = data[:i] + b"\n" + data[i:]
        elif how == "insert_crlf":
            data = data[:i] + b"\r\n" + data[i:]
        elif how == "drop":
            data = data[:i] + data[i + 1 :]
        elif how == "invalid_utf8":
            data = data[:i] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80"])) \
                + data[i:]
        elif how == "insert_colon":
            data = data[:i] + b":" + data[i:]
        elif how == "duplicate":
            j = draw(st.integers(i, len(data)))
            data = data[:j] + data[i:j] + data[j:]
    return data


@st.composite
def streams(draw: st.DrawFn, pool: dict[str, bytes]) -> tuple[str, bool, list[bytes]]:
    """(stream name, whether it is intact, its chunks)."""
    name = draw(st.sampled_from(sorted(pool)))
    data = pool[name]
    intact = draw(st.booleans())
    if not intact:
        data = draw(corrupted(data))
    return name, intact, draw(splits(data))


# --- running the codecs -------------------------------------------------------------------------


def decode_batches(chunks: Iterable[bytes], max_line: int | None = None) -> list[list[Event]]:
    """The decoder's output per chunk, then the flush; stops after an SSEError."""
    decoder = SSEDecoder() if max_line is None else SSEDecoder(max_line)
    batches: list[list[Event]] = []
    try:
        for chunk in chunks:
            batches.append(decoder.feed(chunk))
        batches.append(decoder.flush())
    except SSEError:
        # Refused for good: resuming mid-line could misread the rest.
        with pytest.raises(SSEError):
            decoder.feed(b"data: more\n\n")
        with pytest.raises(SSEError):
            decoder.flush()
        batches.append([Event("<SSEError>", "sse-error")])
    return batches


def flat(batches: list[list[Event]]) -> list[Event]:
    return [e for batch in batches for e in batch]


def translate(events: Iterable[Event], **options: bool) -> tuple[LettaTranslator, list[Out]]:
    """What the letta adapter does with the events: start, feed until [DONE], finish."""
    factory = ChunkFactory("letta/agent", "chatcmpl-fuzz")
    factory.created = 1
    translator = LettaTranslator(factory, **options)
    out: list[Out] = list(translator.start())
    for event in events:
        if event.data == "[DONE]":
            break
        out.extend(translator.feed(event))
    out.extend(translator.finish())
    return translator, out


def relay(batches: list[list[Event]]) -> tuple[RelayState, bytes]:
    """What the openai relay does: frame each read's events until [DONE] or an error."""
    state = RelayState("up")
    out = bytearray()
    for batch in batches:
        try:
            out += state.frame(batch)
        except ProxyError:  # the one exception the relay may raise to its caller
            break
        if state.done or state.error is not None:
            break
    return state, bytes(out)


def reports_an_error(data: str) -> bool:
    """An error event, by the relay's rule: an object with a non-null `error` member wherever
    it is (OpenRouter's mid-stream error is a chunk with one), or a broken object that starts
    as an error."""
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        return data.startswith('{"error"')
    return isinstance(parsed, dict) and parsed.get("error") is not None


# --- the decoder --------------------------------------------------------------------------------


@SETTINGS
@given(case=streams(ALL), max_line=st.sampled_from([None, 16, 200, 1000]))
def test_decoder_raises_only_sse_error_and_splits_do_not_matter(
    case: tuple[str, bool, list[bytes]], max_line: int | None
) -> None:
    name, intact, chunks = case
    batches = decode_batches(chunks, max_line)  # anything but SSEError fails the test here
    whole = decode_batches([b"".join(chunks)], max_line)
    events = flat(batches)
    if not any(e.event == "sse-error" for e in events + flat(whole)):
        # Without an SSEError the split cannot matter, corrupted or not.
        assert events == flat(whole), name
    if intact and max_line is None:
        assert events == flat(whole)
        assert len(events) >= 3, name


@pytest.mark.parametrize("name", sorted(ALL))
def test_every_captured_stream_decodes_the_same_at_every_single_split(name: str) -> None:
    data = ALL[name]
    whole = flat(decode_batches([data]))
    assert whole
    for i in range(len(data) + 1):
        assert flat(decode_batches([data[:i], data[i:]])) == whole, f"split at {i}"


@pytest.mark.parametrize(
    ("chunks", "partial"),
    [
        pytest.param([b"data: a\n\n"], False, id="ends-with-a-blank-line"),
        pytest.param([b"data: a\n"], False, id="ends-with-a-line-end"),
        pytest.param([b"data: a\r"], False, id="ends-with-a-cr"),
        pytest.param([b"data: a\n\ndata: {\"x"], True, id="ends-inside-a-line"),
        pytest.param([b"data: a\n\n", b"da"], True, id="ends-inside-a-field-name"),
    ],
)
def test_decoder_tells_whether_the_body_ended_inside_a_line(
    chunks: list[bytes], partial: bool
) -> None:
    decoder = SSEDecoder()
    for chunk in chunks:
        decoder.feed(chunk)
    assert decoder.partial_line is partial
    decoder.flush()
    assert decoder.partial_line is False


# --- the Letta translator -----------------------------------------------------------------------

LETTA_OPTIONS = st.fixed_dictionaries(
    {"show_reasoning": st.booleans(), "show_tools": st.booleans(), "include_usage": st.booleans()}
)


@SETTINGS
@given(case=streams(ALL), options=LETTA_OPTIONS)
def test_letta_translator_never_raises_and_its_output_is_encodable(
    case: tuple[str, bool, list[bytes]], options: dict[str, bool]
) -> None:
    name, intact, chunks = case
    events = [e for e in flat(decode_batches(chunks)) if e.event != "sse-error"]
    translator, out = translate(events, **options)
    # The adapter encodes every chunk next: it must be JSON, whatever the input was.
    for item in out:
        if isinstance(item, dict):
            orjson.dumps(item)
    assert_finished_or_failed(translator, out, options["include_usage"], name)
    if intact:
        # Splitting never changes the translation.
        _, unsplit = translate(flat(decode_batches([b"".join(chunks)])), **options)
        assert out == unsplit


def assert_finished_or_failed(
    translator: LettaTranslator, out: list[Out], include_usage: bool, name: str = ""
) -> None:
    """Exactly one of the two ends a client can be given: a finished stream (the role chunk
    first, one finish chunk, last or just before the usage chunk asked for) or a failed one
    (an error with an OpenAI-shaped body and a message, and no finish chunk)."""
    chunks_out = [o for o in out if isinstance(o, dict)]
    assert chunks_out[0]["choices"][0]["delta"].get("role") == "assistant"
    assert len({c["id"] for c in chunks_out}) == 1
    finals = [c for c in chunks_out if c["choices"] and c["choices"][0]["finish_reason"]]
    error = translator.error
    if error is None:
        assert len(finals) == 1, name
        assert chunks_out.index(finals[0]) == len(chunks_out) - (2 if include_usage else 1)
        assert any(c.get("usage") for c in chunks_out) == include_usage
    else:
        assert finals == [], "a failed stream must not look finished"
        body = orjson.loads(error.to_json())["error"]
        assert body["message"] and body["type"] and 400 <= error.status < 600, body


@pytest.mark.parametrize("name", sorted(LETTA))
def test_intact_letta_captures_translate_the_same_split_anywhere(name: str) -> None:
    data = LETTA[name]
    _, whole = translate(flat(decode_batches([data])), show_reasoning=True, show_tools=True)
    step = max(1, len(data) // 200)
    for i in range(0, len(data) + 1, step):
        _, out = translate(
            flat(decode_batches([data[:i], data[i:]])), show_reasoning=True, show_tools=True
        )
        assert out == whole, f"split at {i}"


# Structure-aware: Letta events that are valid JSON objects with the fields the translator reads,
# holding values of any type. Byte flips rarely produce these.
LETTA_KINDS = ["assistant_message", "reasoning_message", "hidden_reasoning_message",
               "tool_call_message", "approval_request_message", "tool_return_message",
               "stop_reason", "usage_statistics", "ping", "error_message", "user_message",
               "something_new"]
LETTA_FIELDS = ["content", "reasoning", "tool_call", "tool_calls", "tool_return", "tool_returns",
                "tool_call_id", "name", "arguments", "status", "otid", "run_id", "stop_reason",
                "detail", "message", "error_type", "text", "type", "prompt_tokens",
                "completion_tokens", "total_tokens", "cached_input_tokens", "reasoning_tokens"]
json_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False),
    st.text(max_size=12), st.sampled_from([*LETTA_KINDS, "end_turn", "error", "cancelled"]),
)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(LETTA_FIELDS), inner, max_size=4),
    max_leaves=8,
)
letta_events = st.builds(
    lambda kind, fields, event: Event(
        orjson.dumps({**fields, "message_type": kind}).decode(), event
    ),
    st.one_of(st.sampled_from(LETTA_KINDS), json_values),
    st.dictionaries(st.sampled_from(LETTA_FIELDS), json_values, max_size=5),
    st.sampled_from(["message", "message", "message", "error"]),
)


@settings(SETTINGS, max_examples=150)
@given(events=st.lists(letta_events, max_size=8), options=LETTA_OPTIONS)
def test_letta_translator_survives_any_types_in_well_formed_events(
    events: list[Event], options: dict[str, bool]
) -> None:
    translator, out = translate(events, **options)
    for item in out:
        if isinstance(item, dict):
            orjson.dumps(item)
    assert_finished_or_failed(translator, out, options["include_usage"])
    # Only a stop_reason can finish a stream; without one, the stream ended too early.
    stops = [e for e in events if orjson.loads(e.data).get("message_type") == "stop_reason"]
    if not stops:
        assert translator.error is not None


@pytest.mark.parametrize("show_tools", [False, True])
def test_letta_translator_survives_a_tool_return_nested_too_deep_to_encode(
    show_tools: bool,
) -> None:
    deep = "[" * 300 + "]" * 300
    events = [
        Event('{"message_type":"tool_return_message","tool_return":' + deep + "}"),
        Event('{"message_type":"stop_reason","stop_reason":"end_turn"}'),
    ]
    translator, out = translate(events, show_tools=show_tools)
    assert translator.error is None
    for item in out:
        if isinstance(item, dict):
            orjson.dumps(item)


# --- the openai relay's framing -----------------------------------------------------------------


@SETTINGS
@given(case=streams(ALL))
def test_relay_frame_never_raises_and_the_client_reads_the_upstreams_data(
    case: tuple[str, bool, list[bytes]]
) -> None:
    name, intact, chunks = case
    batches = [b for b in decode_batches(chunks) if not any(e.event == "sse-error" for e in b)]
    state, out = relay(batches)
    # Every relayed event is one well-framed data event: the client decodes exactly the data
    # the upstream sent, in order, up to [DONE] or the error (never [DONE] itself: the handler
    # writes that).
    client = flat(decode_batches([out]))
    assert all(e.event == "message" for e in client)
    expected = []
    ended_by = None
    for event in flat(batches):
        if event.data == "[DONE]":
            ended_by = "done"
            break
        if event.event == "error" or reports_an_error(event.data):
            ended_by = "error"
            break
        if event.data and not (event.data.startswith("{") and event.data.rstrip().endswith("}")):
            # Not the shape of a JSON object: the stream ends with an error there.
            ended_by = "error"
            break
        if event.data:
            expected.append(event.data)
    assert [e.data for e in client] == expected, name
    # The relay fails the stream exactly when the upstream sent an error before [DONE], and
    # that failure is one the client can be told about.
    assert state.done == (ended_by == "done")
    if ended_by == "error":
        assert state.error is not None
        assert orjson.loads(state.error.to_json())["error"]["message"]
    else:
        assert state.error is None
    assert re.fullmatch(rb"(data: [^\r\n]*\n(data: [^\r\n]*\n)*\n)*", out), out[-300:]
    if intact:
        _, unsplit = relay(decode_batches([b"".join(chunks)]))
        assert out == unsplit
        if name.startswith("openai/"):
            assert state.done and state.finished and state.error is None


def test_relay_reframes_a_multi_line_data_event_line_by_line() -> None:
    state = RelayState("up")
    out = state.frame([Event('{"a":\n1}')])
    assert out == b'data: {"a":\ndata: 1}\n\n'
    assert flat(decode_batches([out])) == [Event('{"a":\n1}')]


def test_fixtures_are_all_covered() -> None:
    names = {p.name for p in Path(FIXTURES).glob("*.sse")}
    assert len(LETTA) == len(names) >= 9


# --- the openai relay's pass-through --------------------------------------------------------------


def plain_openai_stream() -> bytes:
    """What model servers send: single-line `data:` events only, [DONE] last."""
    return b"".join(
        e + b"\n\n" for e in openai_stream().split(b"\n\n")
        if e.startswith(b"data: ") and b"\n" not in e
    )


PLAIN = plain_openai_stream()


def token_stream() -> bytes:
    """A token stream as a model server writes it, reasoning then answer, whose token chunks
    the decode path reads from a template (proxy/upstreams/openai_template.py): plain text,
    text the template must leave to the decoder (escapes a server may or may not write,
    control bytes), and chunks whose bytes differ from the template's elsewhere."""

    def chunk(delta: dict[str, Any], finish: str | None = None, **more: Any) -> bytes:
        return b"data: " + orjson.dumps(
            {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 2, "model": "m",
             "choices": [{"index": 0, "delta": delta, "logprobs": None,
                          "finish_reason": finish}], "usage": None, **more}
        ) + b"\n\n"

    texts = ["Hello", " wörld", " 🦜", "", "content", ' "quoted"', "line\nbreak", "tab\t",
             "index", '":"', " finish_reason", "\\", " plain", "."]
    events = [chunk({"role": "assistant", "content": ""})]
    # Reasoning first, then the answer: each teaches a template of its own.
    events += [chunk({"reasoning_content": text}) for text in texts[:8]]
    events += [chunk({"content": text}) for text in texts]
    # The same text as a server that escapes what JSON need not (`\u00e9`, `\/`) writes it.
    events.append(chunk({"content": "caf\u00e9 a/b"}).replace(
        "é".encode(), b"\\u00e9").replace(b"a/b", b"a\\/b"))
    events.append(chunk({"content": " extra"}, x=1))
    events.append(chunk({"content": " other id"}).replace(b"chatcmpl-9", b"chatcmpl-8"))
    events += [chunk({"content": text}) for text in texts[:4]]
    events.append(chunk({}, "stop"))
    return b"".join(events) + b"data: [DONE]\n\n"


TOKENS = token_stream()


@st.composite
def event_splits(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """`data` cut only where an event ends, as a server writing whole events is read."""
    ends = [i + 2 for i in range(len(data)) if data.startswith(b"\n\n", i)]
    cuts = sorted(set(draw(st.lists(st.sampled_from(ends), max_size=12)))) if ends else []
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def relay_reads(
    chunks: list[bytes], *, fast: bool, decode: bool = False
) -> tuple[RelayState, list[Any]]:
    """What OpenAI._relay (or, with `decode`, OpenAI._decode) does with each read, with or
    without its pass-through: the relayed bytes of each read, or the chunks decoded."""
    decoder = SSEDecoder()
    state = RelayState("up")
    out: list[Any] = []

    def slow(events: list[Any]) -> list[Any]:
        return state.decode(events) if decode else [state.frame(events)]

    def read(chunk: bytes) -> list[Any]:
        if fast and decode:
            return state.decode_read(decoder, chunk)
        plain = state.pass_through(chunk) if fast and decoder.at_boundary else None
        if plain is None:
            return slow(decoder.feed(chunk))
        decoder.passed_over()
        return [plain]

    try:
        for chunk in chunks:
            if not chunk:
                continue  # a read returns b"" only at the end of the body
            out += read(chunk)
            if state.done or state.error is not None:
                return state, out
        out += slow(decoder.flush())
    except SSEError:
        pass
    return state, out


@SETTINGS
@given(data=st.data(), intact=st.booleans(), at_events=st.booleans())
def test_relay_pass_through_gives_exactly_what_the_decoder_path_gives(
    data: st.DataObject, intact: bool, at_events: bool
) -> None:
    stream = PLAIN if intact else data.draw(corrupted(PLAIN))
    chunks = data.draw(event_splits(stream) if at_events else splits(stream))
    fast_state, fast = relay_reads(chunks, fast=True)
    slow_state, slow = relay_reads(chunks, fast=False)
    assert b"".join(fast) == b"".join(slow)
    assert (fast_state.done, fast_state.finished) == (slow_state.done, slow_state.finished)
    assert repr(fast_state.error) == repr(slow_state.error)
    if intact:
        assert fast_state.done and fast_state.finished and fast_state.error is None


@SETTINGS
@given(
    data=st.data(), intact=st.booleans(), at_events=st.booleans(),
    plain=st.sampled_from([PLAIN, TOKENS]),
)
def test_decoding_plain_reads_from_their_bytes_gives_exactly_the_decoders_chunks(
    data: st.DataObject, intact: bool, at_events: bool, plain: bytes
) -> None:
    stream = plain if intact else data.draw(corrupted(plain))
    chunks = data.draw(event_splits(stream) if at_events else splits(stream))
    fast_state, fast = relay_reads(chunks, fast=True, decode=True)
    slow_state, slow = relay_reads(chunks, fast=False, decode=True)
    # Encoded, so that the keys' order counts too: the chat writer encodes chunks as they are.
    assert [orjson.dumps(c) for c in chat_chunks(fast)] == [orjson.dumps(c) for c in slow]
    assert repr(fast_state.error) == repr(slow_state.error)
    if fast_state.error is None:
        assert (fast_state.done, fast_state.finished) == (slow_state.done, slow_state.finished)
    if intact:
        assert fast_state.done and fast_state.finished and fast_state.error is None
        assert len(list(chat_chunks(fast))) == plain.count(b"data: {")


def test_a_plain_read_with_an_event_that_is_no_chunk_stops_at_it() -> None:
    state = RelayState("up")
    read = b'data: {"choices":[]}\n\ndata: {"a":1}\n\ndata: {"choices":[]}\n\n'
    plain = state.pass_through(read)
    assert plain is not None
    assert state.decode_passed(plain) == [{"choices": []}]
    assert "not a chat completion chunk" in str(state.error)


@pytest.mark.parametrize(
    "chunk",
    [
        pytest.param(b": keep-alive\n\n" + PLAIN, id="comment"),
        pytest.param(PLAIN.replace(b"\n\n", b"\r\n\r\n"), id="crlf"),
        pytest.param(b"event: error\n" + PLAIN, id="event-field"),
        pytest.param(b"data: \n\n" + PLAIN, id="empty-data"),
        pytest.param(b'data: {"error": {"message": "x"}}\n\n', id="error"),
        pytest.param(b'data: { "error": {"message": "x"}}\n\n', id="error-spaced"),
        pytest.param(b'data: {"choices":[],"error":{"message":"x"}}\n\n', id="error-later"),
        pytest.param(b'data: {"a": "\xff"}\n\n', id="invalid-utf8"),
        pytest.param(b"data: x data: [DONE]\n\n" + PLAIN, id="done-inside-a-value"),
        pytest.param(PLAIN[:-3], id="cut"),
    ],
)
def test_relay_pass_through_leaves_anything_unusual_to_the_decoder(chunk: bytes) -> None:
    assert RelayState("up").pass_through(chunk) is None


def test_relay_pass_through_relays_plain_events_as_they_came_and_stops_at_done() -> None:
    state = RelayState("up")
    out = state.pass_through(PLAIN)
    assert out == PLAIN.removesuffix(b"data: [DONE]\n\n")
    assert state.done and state.finished and state.error is None


def test_relay_pass_through_does_not_take_done_at_the_end_of_another_value() -> None:
    assert RelayState("up").pass_through(b"data: x data: [DONE]\n\n") is None


@pytest.mark.parametrize(
    "chunk",
    [
        pytest.param(b'data: {"finish_reason":"stop"}\n\ndata: {"finish_reason":null}\n\n',
                     id="finish-then-null"),
        pytest.param(b'data: {"finish_reason" : "finish_reason"}\n\n', id="value-like-the-key"),
        pytest.param(b'data: {"a":1}\n\ndata: {"finish_reason":\t"length"}\n\n', id="spaced"),
    ],
)
def test_relay_pass_through_finds_a_finish_reason_anywhere_in_the_read(chunk: bytes) -> None:
    state = RelayState("up")
    assert state.pass_through(chunk) == chunk
    assert state.finished


EMPTY_FINISH = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":""}]}\n\n'


def test_an_empty_finish_reason_is_no_finish_on_either_path() -> None:
    # Byte pass-through...
    state = RelayState("up")
    assert state.pass_through(EMPTY_FINISH) == EMPTY_FINISH
    assert not state.finished
    # ...and the decoding path, taken for a read that is not plain events.
    state = RelayState("up")
    state.frame(SSEDecoder().feed(EMPTY_FINISH))
    assert not state.finished
