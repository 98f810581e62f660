"""The decode path's template for token chunks (proxy/upstreams/openai_template.py): a chunk
read from the template is exactly the chunk decoding its event gives, and anything the
template cannot read exactly is left to the decoder."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy.chunks import TextRun, chat_chunks
from proxy.sse import SSEDecoder
from proxy.upstreams.openai_relay import RelayState
from proxy.upstreams.openai_template import TextTemplate


def event(text: str, field: str = "content", **fields: Any) -> bytes:
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {field: text}, "logprobs": None,
                          "finish_reason": None}], "usage": None}
    chunk.update(fields)
    return b"data: " + orjson.dumps(chunk)


def learned(source: bytes) -> TextTemplate | None:
    chunk = orjson.loads(source[6:])
    field = TextTemplate.candidate(chunk)
    assert field is not None
    return TextTemplate.learn(source, chunk, field)


def template() -> TextTemplate:
    found = learned(event("Hello"))
    assert found is not None
    return found


def read_one(raw: bytes) -> Any:
    """The chunk the template reads `raw` (one event without its blank line) as, or None."""
    run, end = template().run(raw + b"\n\n", 0)
    if run is None:
        assert end == 0
        return None
    assert end == len(raw) + 2
    [chunk] = run.chunks()
    return chunk


@pytest.mark.parametrize("text", [" world", "", " café 🦜", "a/b", "\x7f", "x" * 5000])
def test_a_token_chunk_read_from_the_template_is_exactly_its_decoding(text: str) -> None:
    raw = event(text)
    chunk = read_one(raw)
    # Encoded, so the keys' order counts too.
    assert orjson.dumps(chunk) == raw[6:]
    assert chunk == orjson.loads(raw[6:])


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(event('say "hi"'), id="quote"),
        pytest.param(event("back\\slash"), id="backslash"),
        pytest.param(event("two\nlines"), id="newline"),
        pytest.param(event("caf\u00e9").replace("é".encode(), b"\\u00e9"), id="unicode-escape"),
        pytest.param(event("a/b").replace(b"a/b", b"a\\/b"), id="solidus-escape"),
        pytest.param(event("x").replace(b'"x"', b'"\x01"'), id="control-byte"),
        pytest.param(event("x").replace(b'"x"', b'"\xff"'), id="invalid-utf8"),
        pytest.param(event("x", usage={"total_tokens": 1}), id="other-bytes-after"),
        pytest.param(event("x", id="chatcmpl-2"), id="other-bytes-before"),
        pytest.param(event("x") + b" ", id="longer"),
        pytest.param(event("x").replace(b'"usage":null', b'"usage":0000'), id="same-length"),
    ],
)
def test_an_event_the_template_cannot_read_exactly_is_left_to_the_decoder(raw: bytes) -> None:
    assert read_one(raw) is None


def test_an_event_shorter_than_the_template_is_left_to_the_decoder() -> None:
    # The template's bytes before and after the text overlapping on the text's quotes: no
    # text is there, and the event is not even JSON.
    found = template()
    assert read_one(found.prefix + found.suffix[1:]) is None


def test_a_text_whose_json_is_first_found_in_another_value_teaches_no_template() -> None:
    # The model's name has the text's bytes; the text itself is written with an escape.
    raw = event("café", model="café").replace(b'"content":"caf\xc3\xa9"', b'"content":"caf\\u00e9"')
    assert learned(raw) is None
    assert learned(event("m")) is None  # "m" is the model's name before it is the text


def test_a_chunk_with_a_nested_value_teaches_no_template() -> None:
    # Every chunk read from it would share that one value.
    assert learned(event("x", extra={"a": 1})) is None
    assert learned(event("x", extra=[1])) is None


@pytest.mark.parametrize(
    "chunk",
    [
        pytest.param({"choices": [{"index": 0, "delta": {"content": "x"},
                                   "finish_reason": "stop"}]}, id="finish"),
        pytest.param({"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}],
                      "usage": {"total_tokens": 1}}, id="usage"),
        pytest.param({"choices": [{"index": 0, "delta": {"role": "assistant", "content": "x"},
                                   "finish_reason": None}]}, id="more-than-text"),
        pytest.param({"choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": None}]},
                     id="no-text"),
        pytest.param({"choices": [{"index": 0, "delta": {"role": "assistant"},
                                   "finish_reason": None}]}, id="role"),
        pytest.param({"choices": [{"index": 0, "delta": {"refusal": "no"},
                                   "finish_reason": None}]}, id="refusal"),
        pytest.param({"choices": [{"index": i, "delta": {"content": "x"}, "finish_reason": None}
                                  for i in range(2)]}, id="two-choices"),
    ],
)
def test_only_a_chunk_of_text_alone_is_a_template_candidate(chunk: dict[str, Any]) -> None:
    # A TextRun carries texts alone: a finish or usage in it would be lost to a writer.
    assert TextTemplate.candidate(chunk) is None


def stream(texts: list[str]) -> bytes:
    return b"".join(event(t) + b"\n\n" for t in texts)


def test_a_run_is_every_matching_event_in_a_row_from_its_position() -> None:
    texts = [" a", " 東京", "", " 🦜", " z"]
    head = b'data: {"other":1}\n\n'
    read = head + stream(texts) + event("done", id="chatcmpl-2") + b"\n\n"
    run, end = template().run(read, len(head))
    assert run is not None
    assert [orjson.dumps(c) for c in run.chunks()] == [event(t)[6:] for t in texts]
    assert end == len(head + stream(texts))


def test_a_read_whose_rest_is_one_event_is_read_from_its_position() -> None:
    # A token stream read as it comes: the rest of the read is one event, which the template
    # reads alone; one it cannot read exactly is left to the decoder from the same position.
    head = b'data: {"other":1}\n\n'
    run, end = template().run(head + stream([" 東京"]), len(head))
    assert run is not None and run.texts == [" 東京"]
    assert end == len(head + stream([" 東京"]))
    assert template().run(head + stream([' "q"']), len(head)) == (None, len(head))
    assert template().run(head + event("b") + b"\n\n", len(head) + 1) == (None, len(head) + 1)


@pytest.mark.parametrize(
    ("stop", "name"),
    [
        (event(' "q"'), "escape"),
        (event("x").replace(b'"x"', b'"\xff"'), "invalid-utf8"),
        (event("x", id="chatcmpl-2"), "other-bytes"),
        (event("x").replace(b"data: ", b"data:  "), "other-framing"),
    ],
)
def test_a_run_ends_at_the_first_event_it_cannot_read_exactly(stop: bytes, name: str) -> None:
    before, after = stream(["a", "b"]), stream(["c", "d"])
    run, end = template().run(before + stop + b"\n\n" + after, 0)
    assert run is not None and run.texts == ["a", "b"], name
    assert end == len(before)


def test_a_run_does_not_take_an_event_without_its_blank_line() -> None:
    read = stream(["a"]) + event("b") + b"\n"
    run, end = template().run(read, 0)
    assert run is not None and run.texts == ["a"]
    assert end == len(stream(["a"]))
    assert template().run(read, end) == (None, end)


def test_the_relay_reads_a_token_stream_through_the_template_as_the_decoder_does() -> None:
    texts = ["Hi", " there", ' "q"', "", " 東京", "\\", " end"]
    body = b"".join(event(t) + b"\n\n" for t in texts)
    state = RelayState("up")
    # The first read teaches the template, the second is read with it, event by event and
    # then, from the escaped text on, the usual way.
    first, rest = body.split(b"\n\n", 1)
    decoder = SSEDecoder()
    out = state.decode_read(decoder, first + b"\n\n")
    out += state.decode_read(decoder, rest)
    assert [orjson.dumps(c) for c in chat_chunks(out)] == [event(t)[6:] for t in texts]
    assert state.error is None


def test_a_run_longer_than_its_window_and_a_text_longer_than_an_event_are_read_whole() -> None:
    # The run reads the read in growing windows: a run of a hundred events crosses several,
    # and a text of 5,000 bytes does not fit the first.
    texts = [f" w{i}" for i in range(100)]
    texts[37] = "x" * 5000
    read = stream(texts)
    run, end = template().run(read, 0)
    assert run is not None
    assert [orjson.dumps(c) for c in run.chunks()] == [event(t)[6:] for t in texts]
    assert end == len(read)


def test_the_template_follows_a_stream_from_its_reasoning_to_its_answer() -> None:
    thinking = [" Let", " me", " think"]
    answer = [" The", " answer", "."]
    # Between them, a token of another shape that teaches nothing (its text escaped as the
    # template could not be): the reasoning's template stays.
    odd = event("é", "reasoning_content", id="chatcmpl-2").replace("é".encode(), b"\\u00e9")
    events = [event(t, "reasoning_content") for t in thinking[:2]] + [odd]
    events += [event(thinking[2], "reasoning_content")] + [event(t) for t in answer]
    # One event per read, as a model server writes them, and all in one read.
    for reads, expected in [
        ([e + b"\n\n" for e in events],
         [("reasoning_content", [" me"]), ("reasoning_content", [" think"]),
          ("content", [" answer"]), ("content", ["."])]),
        ([b"".join(e + b"\n\n" for e in events)],
         [("reasoning_content", [" me"]), ("reasoning_content", [" think"]),
          ("content", [" answer", "."])]),
    ]:
        state = RelayState("up")
        decoder = SSEDecoder()
        out = [o for read in reads for o in state.decode_read(decoder, read)]
        assert list(chat_chunks(out)) == [orjson.loads(e[6:]) for e in events]
        # Each kind's first token teaches its template; the tokens after it are read from it.
        assert [(o.field, o.texts) for o in out if isinstance(o, TextRun)] == expected


def test_the_byte_relay_passes_token_events_as_they_are_and_leaves_bad_utf8_to_the_decoder() -> (
    None
):
    # A token stream read as it comes: the byte relay learns the template from its first
    # token, then passes each token event on as it came, a text holding the word "error"
    # too (no error member); a token whose text is not UTF-8 is the decoder's, which
    # replaces what is not UTF-8, as is a read of two events.
    state = RelayState("up")
    role = b'data: {"choices":[{"index":0,"delta":{"role":"assistant"},"finish_reason":null}]}'
    reads = [role + b"\n\n"] + [event(t) + b"\n\n" for t in ["Hi", " there", "error", " 東京"]]
    assert [state.relay_read(r) for r in reads] == reads
    assert state.error is None and not state.finished
    bad = event("x").replace(b'"x"', b'"\xff"') + b"\n\n"
    assert state.relay_read(bad) is None
    assert state.relay_read(stream(["a", "b"])) == stream(["a", "b"])
    finish = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    assert state.relay_read(finish) == finish
    assert state.finished
