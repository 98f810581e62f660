"""The custom kind's rule engine and sync mapping, on hand-written events (sans-IO)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import yaml

from proxy.chunks import Out
from proxy.errors import UpstreamFailed
from proxy.openai_types import ChatChunk, ChunkFactory, Usage, accumulate
from proxy.upstreams.custom_reader import (
    StreamReader,
    SyncReader,
    coerce_text,
    error_message_of,
    is_json_content_type,
)
from proxy.upstreams.custom_spec import CustomSpec, compile_custom

MODEL = "custom-test"
F = ChunkFactory(MODEL, "chatcmpl-test")
F.created = 1
ROLE = F.role()
c = F.content
STOP = F.finish("stop")


def usage(prompt: int, completion: int, total: int | None = None) -> ChatChunk:
    u: Usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion if total is None else total}
    return F.usage(u)


def spec(rules: str, framing: str = "sse", extra: str = "") -> CustomSpec:
    text = f"""
mode: stream
request: {{path: /x, body: {{q: "{{{{ input }}}}", s: "{{{{ session.key }}}}"}}}}
stream:
  framing: {framing}
  rules:
{rules}
{extra}
"""
    return compile_custom(yaml.safe_load(text))


def reader(s: CustomSpec, **options: Any) -> StreamReader:
    factory = ChunkFactory(MODEL, "chatcmpl-test")
    factory.created = 1
    return StreamReader(s, factory, **options)


def run(s: CustomSpec, items: list[tuple[str, Any]], **options: Any) -> list[Out]:
    r = reader(s, **options)
    out = list(r.feed_items(items))
    while batch := r.finish():
        out += batch
    return out


def run_failing(s: CustomSpec, items: list[tuple[str, Any]], **options: Any
                ) -> tuple[list[Out], UpstreamFailed]:
    r = reader(s, **options)
    out: list[Out] = []
    try:
        out += r.feed_items(items)
        while batch := r.finish():
            out += batch
    except UpstreamFailed as exc:
        return out, exc
    raise AssertionError(f"the stream did not fail: {out}")


DELTAS = """
    - when: {type: delta}
      text: t
    - when: {type: done}
      end: true
"""


# --- text ---------------------------------------------------------------------------------------


def test_deltas_become_content_chunks_after_one_role_chunk() -> None:
    out = run(spec(DELTAS), [("message", {"type": "delta", "t": "Hel"}),
                             ("message", {"type": "delta", "t": "lo"}),
                             ("message", {"type": "done"})])
    assert out == [ROLE, c("Hel"), c("lo"), STOP]


def test_the_role_chunk_comes_with_the_first_event_even_one_no_rule_matches() -> None:
    r = reader(spec(DELTAS))
    assert r.feed_items([("message", {"type": "metadata"})]) == [ROLE]
    assert r.feed_items([("message", {"type": "delta", "t": "x"})]) == [c("x")]


def test_empty_text_makes_no_chunk() -> None:
    out = run(spec(DELTAS), [("message", {"type": "delta", "t": ""}),
                             ("message", {"type": "delta"}),
                             ("message", {"type": "done"})])
    assert out == [ROLE, STOP]


def test_first_matching_rule_wins() -> None:
    rules = """
    - when: {type: delta, hidden: true}
    - when: {type: delta}
      text: t
    - when: {type: done}
      end: true
"""
    out = run(spec(rules), [("message", {"type": "delta", "t": "shown"}),
                            ("message", {"type": "delta", "t": "secret", "hidden": True}),
                            ("message", {"type": "done"})])
    assert out == [ROLE, c("shown"), STOP]


def test_when_takes_a_list_of_values_and_the_event_name() -> None:
    rules = """
    - when: {$event: [token, chunk], kind: [a, b]}
      text: t
    - when: {$event: end}
      end: true
"""
    out = run(spec(rules), [("token", {"kind": "a", "t": "1"}),
                            ("chunk", {"kind": "b", "t": "2"}),
                            ("token", {"kind": "c", "t": "no"}),
                            ("other", {"kind": "a", "t": "no"}),
                            ("end", None)])
    assert out == [ROLE, c("1"), c("2"), STOP]


def test_when_keeps_booleans_apart_from_numbers() -> None:
    rules = """
    - when: {done: true}
      end: true
    - when: {n: 1}
      text: t
"""
    out = run(spec(rules), [("message", {"done": 1, "n": True, "t": "bool-is-not-1"}),
                            ("message", {"n": 1.0, "t": "one"}), ("message", {"done": True})])
    assert out == [ROLE, c("one"), STOP]


def test_when_null_matches_a_missing_key() -> None:
    rules = """
    - when: {error: null}
      text: t
"""
    out = run(spec(rules), [("message", {"t": "a"}), ("message", {"t": "b", "error": "x"})])
    assert out == [ROLE, c("a"), STOP]


def test_has_needs_every_path_present_and_truthy() -> None:
    rules = """
    - has: [t, ok]
      text: t
"""
    out = run(spec(rules), [("message", {"t": "a", "ok": 1}), ("message", {"t": "b", "ok": 0}),
                            ("message", {"t": "c"}), ("message", {"t": "", "ok": True})])
    assert out == [ROLE, c("a"), STOP]


def test_cumulative_text_emits_only_what_is_new() -> None:
    rules = """
    - when: {$event: partial}
      text: "[0].content"
      cumulative: true
"""
    items = [("partial", [{"content": c_}]) for c_ in
             ["", "You", "You said", "You said", "You said: hi", "Tool", "Tool ran"]]
    out = run(spec(rules), items)
    assert out == [ROLE, c("You"), c(" said"), c(": hi"), c("Tool"), c(" ran"), STOP]


def test_recap_is_used_only_when_no_delta_was_sent() -> None:
    rules = """
    - when: {event: token}
      text: chunk
    - when: {event: message}
      text: text
      recap: true
"""
    streamed = run(spec(rules), [("message", {"event": "token", "chunk": "Hi"}),
                                 ("message", {"event": "message", "text": "Hi"}),
                                 ("message", {"event": "message", "text": "Hi"})])
    assert streamed == [ROLE, c("Hi"), STOP]
    unstreamed = run(spec(rules), [("message", {"event": "message", "text": ""}),
                                   ("message", {"event": "message", "text": "Whole"}),
                                   ("message", {"event": "message", "text": "Whole"})])
    assert unstreamed == [ROLE, c("Whole"), STOP]


def test_separator_goes_between_texts_only_after_the_first() -> None:
    rules = """
    - has: text
      text: text
      separator: "\\n\\n"
"""
    out = run(spec(rules), [("message", {"text": "one"}), ("message", {"text": "two"})])
    assert out == [ROLE, c("one"), c("\n\ntwo"), STOP]


def test_text_coercion_reads_content_blocks() -> None:
    rules = """
    - has: content
      text: content
"""
    blocks = [{"type": "text", "text": "a"}, {"type": "tool_use", "text": "no"},
              {"text": "b"}, {"type": "text", "text": "no", "thought": True}, 7, True, None]
    out = run(spec(rules), [("message", {"content": blocks})])
    assert out == [ROLE, c("ab7true"), STOP]


@pytest.mark.parametrize(
    ("value", "join", "expected"),
    [
        pytest.param("s", "", "s", id="string"),
        pytest.param(None, "", "", id="null"),
        pytest.param(3, "", "3", id="int"),
        pytest.param(1.5, "", "1.5", id="float"),
        pytest.param(False, "", "false", id="bool"),
        pytest.param({"text": "t"}, "", "t", id="text-block"),
        pytest.param({"type": "image", "text": "t"}, "", "", id="other-block"),
        pytest.param({"text": 5}, "", "", id="non-string-text"),
        pytest.param(["a", ["b", {"text": "c"}], "", None, "d"], "|", "a|b|c|d", id="nested-join"),
    ],
)
def test_coerce_text(value: Any, join: str, expected: str) -> None:
    assert coerce_text(value, join) == expected


# --- reasoning, usage, finish, capture ------------------------------------------------------------


REASONING = """
    - when: {type: thought}
      reasoning: r
    - when: {type: delta}
      text: t
"""


def test_reasoning_is_shown_only_when_asked() -> None:
    items = [("message", {"type": "thought", "r": "hmm"}), ("message", {"type": "delta", "t": "A"})]
    assert run(spec(REASONING), items) == [ROLE, c("A"), STOP]
    assert run(spec(REASONING), items, show_reasoning=True) == [ROLE, F.reasoning("hmm"), c("A"),
                                                                STOP]


USAGE = """
    - when: {type: delta}
      text: t
    - when: {type: usage}
      usage: {prompt_tokens: u.in, completion_tokens: u.out, total_tokens: u.total}
"""


def test_usage_chunk_only_with_include_usage_and_last_report_wins() -> None:
    items = [("message", {"type": "usage", "u": {"in": 1, "out": 1, "total": 2}}),
             ("message", {"type": "delta", "t": "A"}),
             ("message", {"type": "usage", "u": {"in": 5, "out": 3, "total": 8}})]
    assert run(spec(USAGE), items) == [ROLE, c("A"), STOP]
    assert run(spec(USAGE), items, include_usage=True) == [ROLE, c("A"), STOP, usage(5, 3)]


def test_usage_sum_adds_each_calls_usage_and_ignores_events_without_one() -> None:
    rules = """
    - when: {type: delta}
      text: t
      usage: {prompt_tokens: u.in, completion_tokens: u.out}
      usage_sum: true
"""
    items = [("message", {"type": "delta", "t": "a", "u": None}),
             ("message", {"type": "delta", "t": "", "u": {"in": 10, "out": 2}}),
             ("message", {"type": "delta", "t": "b", "u": {"in": 20, "out": 4}})]
    assert run(spec(rules), items, include_usage=True)[-1] == usage(30, 6)


def test_usage_zeros_when_none_was_reported() -> None:
    assert run(spec(DELTAS), [("message", {"type": "done"})], include_usage=True) == [
        ROLE, STOP, usage(0, 0)]


def test_usage_with_only_some_counts_fills_the_total() -> None:
    rules = """
    - has: u
      usage: {completion_tokens: u.out}
    - has: t
      text: t
"""
    out = run(spec(rules), [("message", {"t": "x"}), ("message", {"u": {"out": 4}})],
              include_usage=True)
    assert out[-1] == usage(0, 4)


def test_finish_length_passes_through_and_anything_else_is_stop() -> None:
    rules = """
    - has: t
      text: t
      finish: why
"""
    cut = run(spec(rules), [("message", {"t": "a", "why": "max_tokens"}),
                            ("message", {"t": "b", "why": "length"}), ("message", {"t": "c"})])
    assert cut[-1] == F.finish("length")
    other = run(spec(rules), [("message", {"t": "a", "why": "tool_calls"})])
    assert other[-1] == STOP


def test_captured_values_and_the_server_issued_session_id_are_exposed() -> None:
    s = spec("""
    - when: {event: message}
      text: answer
      capture: {task_id: task_id}
""", extra="session: {from_response: conversation_id}")
    r = reader(s)
    r.feed_items([("ping", None),
                  ("message", {"event": "message", "answer": "a", "task_id": "t-1",
                               "conversation_id": "conv-1"}),
                  ("message", {"event": "message", "answer": "b", "conversation_id": "conv-2"})])
    assert r.captured == {"task_id": "t-1"}
    assert r.session_id == "conv-1"


# --- errors, end, truncation ----------------------------------------------------------------------


ERRORS = """
    - when: {type: delta}
      text: t
    - when: {type: error}
      error: [message, error]
    - when: {type: done}
      end: true
"""


def test_an_error_event_raises_after_the_chunks_before_it() -> None:
    r = reader(spec(ERRORS))
    out = r.feed_items([("message", {"type": "delta", "t": "par"}),
                        ("message", {"type": "error", "error": "rate limited"}),
                        ("message", {"type": "delta", "t": "never"})])
    assert out == [ROLE, c("par")]
    assert r.done
    with pytest.raises(UpstreamFailed) as caught:
        r.finish()
    assert caught.value.message == "The upstream reported an error: rate limited"
    assert caught.value.status == 502
    with pytest.raises(UpstreamFailed):
        r.feed(b"")


def test_an_error_as_the_first_event_still_comes_after_the_role_chunk() -> None:
    out, err = run_failing(spec(ERRORS), [("message", {"type": "error", "message": "boom"})])
    assert out == [ROLE] and err.message.endswith(": boom")


def test_an_error_without_a_message_says_so_generically() -> None:
    _, err = run_failing(spec("""
    - when: {$event: error}
      error: true
    - has: t
      text: t
"""), [("error", None)])
    assert err.message == "The upstream reported an error: the request failed"


def test_an_error_object_without_text_is_shown_as_short_json() -> None:
    _, err = run_failing(spec(ERRORS), [("message", {"type": "error",
                                                     "error": {"code": 42, "why": "x" * 500}})])
    assert err.message.startswith('The upstream reported an error: {"code":42,"why":"xxx')
    assert len(err.message) < 400


def test_the_label_names_the_upstream() -> None:
    _, err = run_failing(spec(ERRORS), [("message", {"type": "error", "message": "m"})],
                         label="Upstream 'dify'")
    assert err.message == "Upstream 'dify' reported an error: m"


def test_with_an_end_rule_eof_before_the_end_event_is_a_truncated_stream() -> None:
    out, err = run_failing(spec(DELTAS), [("message", {"type": "delta", "t": "half"})])
    assert out == [ROLE, c("half")]
    assert "truncated" in err.message


def test_without_an_end_rule_eof_ends_the_answer() -> None:
    s = spec("""
    - has: t
      text: t
""")
    assert run(s, [("message", {"t": "whole"})]) == [ROLE, c("whole"), STOP]


def test_events_after_the_end_event_are_ignored() -> None:
    r = reader(spec(DELTAS))
    out = r.feed_items([("message", {"type": "done"}), ("message", {"type": "delta", "t": "x"})])
    assert out == [ROLE] and r.done and r.ended
    assert r.feed(b'data: {"type": "delta", "t": "late"}\n\n') == []
    assert r.finish() == [STOP]
    assert r.finish() == []


def test_a_stream_with_no_event_at_all_fails() -> None:
    r = reader(spec(DELTAS))
    assert r.feed(b": keep-alive\n\n") == []
    with pytest.raises(UpstreamFailed, match="without sending anything"):
        r.finish()


def test_a_framing_error_fails_the_stream_after_the_events_before_it() -> None:
    s = spec("""
    - has: t
      text: t
""", framing="ndjson")
    r = reader(s)
    assert r.feed(b'{"t":"ok"}\nnot json\n') == [ROLE, c("ok")]
    with pytest.raises(UpstreamFailed, match="not JSON"):
        r.finish()


def test_an_oversized_event_fails_the_stream() -> None:
    r = reader(spec(DELTAS), max_event=100)
    with pytest.raises(UpstreamFailed, match="longer than 100 bytes"):
        r.feed(b'data: {"type": "delta", "t": "' + b"x" * 200 + b'"}\n\n')


def test_bytes_are_decoded_with_the_declared_framing() -> None:
    r = reader(spec(DELTAS))
    out = r.feed(b'data: {"type": "delta", "t": "A"}\n\ndata: {"type": "de')
    out += r.feed(b'lta", "t": "B"}\n\ndata: {"type": "done"}\n\n')
    assert r.done
    while batch := r.finish():
        out += batch
    assert out == [ROLE, c("A"), c("B"), STOP]


# --- ndjson single-document fallback -----------------------------------------------------------


FALLBACK = """
    - when: {type: item}
      text: content
"""


def test_ndjson_with_one_unmatched_document_is_read_with_the_sync_mapping() -> None:
    s = spec(FALLBACK, framing="ndjson", extra="sync: {text: [output, text]}")
    r = reader(s, include_usage=True)
    out = r.feed(b'{"output":"whole answer"}')
    while batch := r.finish():
        out += batch
    assert out == [ROLE, c("whole answer"), STOP, usage(0, 0)]


def test_ndjson_fallback_errors_come_after_the_role_chunk() -> None:
    s = spec(FALLBACK, framing="ndjson", extra="sync: {text: output, error: error}")
    r = reader(s)
    out = r.feed(b'{"error":"workflow failed"}')
    out += r.finish()
    assert out == [ROLE]
    with pytest.raises(UpstreamFailed, match="workflow failed"):
        r.finish()


def test_ndjson_without_a_sync_mapping_or_with_matches_takes_no_fallback() -> None:
    plain = spec(FALLBACK, framing="ndjson")
    assert run(plain, [("message", {"output": "x"})]) == [ROLE, STOP]
    s = spec(FALLBACK, framing="ndjson", extra="sync: {text: output}")
    assert run(s, [("message", {"type": "item", "content": "a", "output": "no"})]) == [
        ROLE, c("a"), STOP]


# --- sync mapping ---------------------------------------------------------------------------------


SYNC = """
mode: sync
request: {path: /x, body: {q: "{{ input }}", s: "{{ session.key }}"}}
sync:
  text: "responses[*].text"
  join: "\\n\\n"
  reasoning: thinking
  usage: {prompt_tokens: usage.in, completion_tokens: usage.out}
  finish: stop_reason
  error: error
  require_text: true
session: {from_response: session}
"""


def sync_reader(text: str = SYNC, **options: Any) -> SyncReader:
    factory = ChunkFactory(MODEL, "chatcmpl-test")
    factory.created = 1
    return SyncReader(compile_custom(yaml.safe_load(text)), factory, **options)


def test_sync_body_becomes_the_chunks_of_a_whole_answer() -> None:
    r = sync_reader(show_reasoning=True)
    body = {"responses": [{"text": "one"}, {"image": "x"}, {"text": "two"}], "thinking": "t",
            "usage": {"in": 3, "out": 2}, "stop_reason": "length", "session": "s-1"}
    assert r.read(orjson.dumps(body)) == [ROLE, c("one\n\ntwo"), F.reasoning("t"),
                                          F.finish("length"), usage(3, 2)]
    assert r.session_id == "s-1"


def test_sync_without_include_usage_has_no_usage_chunk() -> None:
    assert sync_reader(include_usage=False).read(b'{"responses": [{"text": "a"}]}') == [
        ROLE, c("a"), STOP]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        pytest.param(b'{"error": "quota exceeded", "responses": []}', "reported an error: quota "
                     "exceeded", id="error-in-2xx"),
        pytest.param(b'{"responses": []}', "answered without any text", id="require-text"),
        pytest.param(b"[]", "answered without any text", id="rasa-empty-list"),
        pytest.param(b"<html>", "not JSON", id="not-json"),
        pytest.param(b'{"responses": [{"text": "half"}], "stop_reason": "error"}',
                     "reported that its turn failed", id="finish-error"),
        pytest.param(b'{"responses": [{"text": "a"}], "session": "' + b"s" * 513 + b'"}',
                     "session id longer than 512", id="session-id-too-long"),
        pytest.param(b'{"responses": [{"text": "a"}], "session": "s\\r\\nX-Evil: 1"}',
                     "session id with a control character", id="session-id-control"),
    ],
)
def test_sync_failures(body: bytes, fragment: str) -> None:
    with pytest.raises(UpstreamFailed) as caught:
        sync_reader().read(body)
    assert fragment in caught.value.message


def test_a_falsy_error_field_is_not_an_error() -> None:
    out = sync_reader().read(b'{"error": false, "responses": [{"text": "fine"}]}')
    assert accumulate(out)["choices"][0]["message"]["content"] == "fine"


def test_leading_keepalive_newlines_before_a_json_body_are_fine() -> None:
    out = sync_reader().read(b'\n\n\n{"responses": [{"text": "late"}]}')
    assert accumulate(out)["choices"][0]["message"]["content"] == "late"


# --- helpers for the adapter -------------------------------------------------------------------


def test_error_message_of_a_non_2xx_body_uses_error_message_paths() -> None:
    s = spec(DELTAS)
    assert error_message_of(s, b'{"detail": "Flow not found"}') == "Flow not found"
    assert error_message_of(s, b'{"error": {"message": "nested"}}') == "nested"
    assert error_message_of(s, b'{"message": "first", "detail": "second"}') == "first"
    assert error_message_of(s, b"<html>oops</html>") is None
    assert error_message_of(s, b'{"other": 1}') is None


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [("application/json", True), ("application/json; charset=utf-8", True),
     ("Application/JSON", True), ("application/problem+json", True),
     ("text/event-stream", False), (None, False), ("", False)],
)
def test_is_json_content_type(content_type: str | None, expected: bool) -> None:
    assert is_json_content_type(content_type) is expected
