"""The custom kind's framing decoders (sse, ndjson, text) on real captures, at every split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.upstreams.custom_framing import (
    Decoder,
    FramingError,
    Item,
    NdjsonDecoder,
    SseDecoder,
    TextDecoder,
    make_decoder,
)

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def decode(decoder: Decoder, chunks: list[bytes]) -> list[Item]:
    items: list[Item] = []
    for chunk in chunks:
        items += decoder.feed(chunk)
    return items + decoder.flush()


def whole(framing: str, body: bytes) -> list[Item]:
    return decode(make_decoder(framing), [body])  # type: ignore[arg-type]


CAPTURES = [
    pytest.param("sse", "flowise/prediction_stream_chatid.response.sse",
                 id="flowise-message-lines"),
    pytest.param("sse", "flowise/error_llm_500_stream.response.sse", id="flowise-heartbeat-error"),
    pytest.param("sse", "langgraph/error_llm_500_thread_runs_stream.response.sse",
                 id="langgraph-crlf-error"),
    pytest.param("sse", "langgraph/slow_thread_runs_stream.response.sse",
                 id="langgraph-crlf-heartbeat"),
    pytest.param("sse", "dify/chat_stream.sse", id="dify-ping-without-data"),
    pytest.param("ndjson", "langflow/error_llm_500_stream.response.ndjson",
                 id="langflow-blank-line-json"),
    pytest.param("ndjson", "n8n/stream.ndjson", id="n8n-ndjson"),
    pytest.param("ndjson", "n8n/last_node.response.json", id="n8n-one-document"),
]


@pytest.mark.parametrize(("framing", "name"), CAPTURES)
def test_a_capture_decodes_the_same_split_at_every_offset(framing: str, name: str) -> None:
    body = fixture(name)
    expected = whole(framing, body)
    assert expected
    for i in range(len(body) + 1):
        decoder = make_decoder(framing)  # type: ignore[arg-type]
        assert decode(decoder, [body[:i], body[i:]]) == expected, f"split at {i}"


@pytest.mark.parametrize(("framing", "name"), CAPTURES)
def test_a_capture_decodes_the_same_one_byte_at_a_time(framing: str, name: str) -> None:
    body = fixture(name)
    decoder = make_decoder(framing)  # type: ignore[arg-type]
    assert decode(decoder, [body[i : i + 1] for i in range(len(body))]) == whole(framing, body)


@pytest.mark.parametrize(
    ("framing", "name", "step"),
    [
        pytest.param("sse", "langgraph/thread_runs_stream_tool_call_multi_mode.response.sse", 7,
                     id="langgraph-large"),
        pytest.param("ndjson", "langflow/agent_run_stream.response.ndjson", 7,
                     id="langflow-large"),
    ],
)
def test_large_captures_decode_the_same_at_many_offsets(
    framing: str, name: str, step: int
) -> None:
    body = fixture(name)
    expected = whole(framing, body)
    for i in range(0, len(body) + 1, step):
        decoder = make_decoder(framing)  # type: ignore[arg-type]
        assert decode(decoder, [body[:i], body[i:]]) == expected, f"split at {i}"


# --- sse --------------------------------------------------------------------------------------


def test_flowise_message_lines_are_ignored_and_data_without_a_space_is_json() -> None:
    items = whole("sse", fixture("flowise/prediction_stream_chatid.response.sse"))
    assert items[:2] == [("message", {"event": "start", "data": ""}),
                         ("message", {"event": "token", "data": "You "})]
    assert items[-1] == ("message", {"event": "end", "data": "[DONE]"})
    assert len(items) == 8


def test_langgraph_crlf_events_keep_their_names_and_heartbeats_are_only_comments() -> None:
    decoder = SseDecoder()
    items = decode(decoder, [fixture("langgraph/slow_thread_runs_stream.response.sse")])
    assert [name for name, _ in items] == ["metadata"] + ["messages"] * 8
    assert items[2][1][0]["content"] == "You "
    assert decoder.comments == 1


def test_an_event_name_without_data_reaches_the_rules_with_a_null_payload() -> None:
    items = whole("sse", fixture("dify/chat_stream.sse"))
    assert items[0] == ("ping", None)
    assert ("ping", None) in items[1:]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(b"data: [DONE]\n\n", [("message", "[DONE]")], id="done-string"),
        pytest.param(b"data: hello world\n\n", [("message", "hello world")], id="plain-text"),
        pytest.param(b'data: "quoted"\n\n', [("message", "quoted")], id="json-string"),
        pytest.param(b"data: 42\n\n", [("message", 42)], id="json-number"),
        pytest.param(b"data: {broken\n\n", [("message", "{broken")], id="broken-json-as-text"),
        pytest.param(b'data: {"a":\ndata: 1}\n\n', [("message", {"a": 1})], id="multi-line"),
        pytest.param(b"event: end\r\n\r\n", [("end", None)], id="langserve-end"),
        pytest.param(b"event: end\n", [("end", None)], id="named-event-cut-at-eof"),
        pytest.param(b"data: a\rdata: b\r\r", [("message", "a\nb")], id="cr-line-ends"),
        pytest.param(b"\xef\xbb\xbfdata: 1\n\n", [("message", 1)], id="byte-order-mark"),
        pytest.param(b"id: 7\nretry: 10\ndata: 1\n\n", [("message", 1)], id="id-and-retry"),
        pytest.param(b"data\n\n", [("message", "")], id="bare-data-field"),
        pytest.param(b"id: 1\n\n: c\n\n", [], id="no-data-no-name"),
        pytest.param(b"event:\n\n", [], id="empty-name-names-nothing"),
        pytest.param(b"event:\ndata: 1\n\n", [("message", 1)], id="empty-name-is-message"),
        pytest.param(b"data: x\n", [("message", "x")], id="last-event-without-blank-line"),
        pytest.param(b'data: {"a":"\xc3\xa9"}\n\n', [("message", {"a": "é"})], id="utf8"),
        pytest.param(b'data: {"a":"h\xff\xfei"}\n\n', [("message", {"a": "h\ufffd\ufffdi"})],
                     id="json-with-invalid-utf8-parsed-with-replacements"),
    ],
)
def test_sse_field_rules(body: bytes, expected: list[Item]) -> None:
    assert whole("sse", body) == expected
    # And the same a byte at a time, which goes through the full decoder only.
    assert decode(SseDecoder(), [body[i : i + 1] for i in range(len(body))]) == expected


def test_a_byte_order_mark_after_an_empty_read_is_still_stripped() -> None:
    decoder = SseDecoder()
    assert decoder.feed(b"") == []
    assert decoder.feed(b"\xef\xbb\xbfdata: 1\n\n") == [("message", 1)]
    assert decoder.feed(b"data: 2\n\n") == [("message", 2)]


def test_an_oversized_sse_event_is_an_error_after_the_events_before_it() -> None:
    decoder = SseDecoder(max_event=64)
    first = b"data: small\n\n"
    items = decoder.feed(first + b"data: " + b"x" * 40 + b"\ndata: " + b"y" * 40 + b"\n\n")
    assert items == [("message", "small")]
    assert decoder.error is not None and "longer than 64 bytes" in decoder.error
    with pytest.raises(FramingError):
        decoder.feed(b"data: more\n\n")


def test_an_sse_line_that_never_ends_cannot_grow_past_the_bound() -> None:
    decoder = SseDecoder(max_event=1024)
    decoder.feed(b"data: ")
    for _ in range(8):
        if decoder.error is not None:
            break
        decoder.feed(b"z" * 256)
    assert decoder.error is not None
    with pytest.raises(FramingError):
        decoder.flush()


# --- ndjson -------------------------------------------------------------------------------------


def test_langflow_blank_lines_are_skipped() -> None:
    items = whole("ndjson", fixture("langflow/error_llm_500_stream.response.ndjson"))
    assert [payload["event"] for _, payload in items] == ["add_message", "error", "error"]
    assert {name for name, _ in items} == {"message"}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(b'{"a":1}\r\n\r\n{"a":2}\r\n', [{"a": 1}, {"a": 2}], id="crlf"),
        pytest.param(b'{"a":1}', [{"a": 1}], id="no-final-newline"),
        pytest.param(b'  {"a":1}  \n \t \n[1,2]\n', [{"a": 1}, [1, 2]], id="spaces"),
        pytest.param(b'\xef\xbb\xbf{"a":1}\n', [{"a": 1}], id="byte-order-mark"),
        pytest.param(b"\n\n\n", [], id="only-blank-lines"),
    ],
)
def test_ndjson_lines(body: bytes, expected: list[Any]) -> None:
    assert [payload for _, payload in whole("ndjson", body)] == expected
    one_by_one = decode(NdjsonDecoder(), [body[i : i + 1] for i in range(len(body))])
    assert [payload for _, payload in one_by_one] == expected


def test_a_line_that_is_not_json_is_an_error_after_the_lines_before_it() -> None:
    decoder = NdjsonDecoder()
    assert decoder.feed(b'{"a":1}\nnot json at all\n{"a":2}\n') == [("message", {"a": 1})]
    assert decoder.error is not None and "not JSON: 'not json at all'" in decoder.error
    with pytest.raises(FramingError):
        decoder.feed(b"{}\n")


def test_an_unterminated_ndjson_line_cannot_grow_past_the_bound() -> None:
    decoder = NdjsonDecoder(max_event=100)
    decoder.feed(b'{"a": "' + b"x" * 60)
    assert decoder.error is None
    decoder.feed(b"x" * 60)
    assert decoder.error is not None and "longer than 100 bytes" in decoder.error


def test_an_oversized_ndjson_line_inside_one_chunk_is_refused() -> None:
    decoder = NdjsonDecoder(max_event=16)
    assert decoder.feed(b'{"a":1}\n{"b":"' + b"y" * 40 + b'"}\n') == [("message", {"a": 1})]
    assert decoder.error is not None


# --- text ---------------------------------------------------------------------------------------


def test_text_passes_chunks_on_and_decodes_utf8_split_across_reads() -> None:
    body = "héllo wörld ✓".encode()
    pieces = [body[i : i + 1] for i in range(len(body))]
    items = decode(TextDecoder(), pieces)
    assert "".join(text for _, text in items) == "héllo wörld ✓"
    assert all(text for _, text in items)


def test_text_replaces_invalid_utf8_instead_of_failing() -> None:
    assert decode(TextDecoder(), [b"ok \xff\xfe", b"!"]) == [("message", "ok \ufffd\ufffd"),
                                                             ("message", "!")]
