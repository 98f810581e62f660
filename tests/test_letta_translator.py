"""LettaTranslator on the streams captured from a real Letta 0.16.8 server."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy.chunks import KEEP_ALIVE, Comment, Out
from proxy.errors import UpstreamFailed
from proxy.openai_types import ChatChunk, ChunkFactory, Usage, accumulate
from proxy.sse import Event, SSEDecoder
from proxy.upstreams.http_errors import MAX_ANSWER
from proxy.upstreams.letta_translator import (
    ERROR_STOP_REASONS,
    FINISH_REASONS,
    LettaTranslator,
    letta_usage,
)
from tests.fake_letta import sse_events

MODEL = "letta/support-bot"
MIB = 1024 * 1024
F = ChunkFactory(MODEL, "chatcmpl-test")
F.created = 1

ROLE = F.role()
KA = KEEP_ALIVE
c = F.content
r = F.reasoning
STOP = F.finish("stop")


def usage(prompt: int, completion: int, **details: int) -> ChatChunk:
    u: Usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if "cached" in details:
        u["prompt_tokens_details"] = {"cached_tokens": details["cached"]}
    if "reasoning" in details:
        u["completion_tokens_details"] = {"reasoning_tokens": details["reasoning"]}
    return F.usage(u)


def decode(name: str) -> list[Event]:
    decoder = SSEDecoder()
    events: list[Event] = []
    for chunk in sse_events(name):
        events.extend(decoder.feed(chunk))
    events.extend(decoder.flush())
    return events


def translator(**options: bool) -> LettaTranslator:
    factory = ChunkFactory(MODEL, "chatcmpl-test")
    factory.created = 1
    return LettaTranslator(factory, **options)


def run_events(events: list[Event], **options: bool) -> tuple[LettaTranslator, list[Out]]:
    """What the adapter does: start, feed until [DONE], finish."""
    t = translator(**options)
    out: list[Out] = list(t.start())
    for event in events:
        if event.data == "[DONE]":
            break
        out.extend(t.feed(event))
    out.extend(t.finish())
    return t, out


def run(name: str, **options: bool) -> tuple[LettaTranslator, list[Out]]:
    return run_events(decode(name), **options)


def data(obj: dict[str, Any], event: str = "message") -> Event:
    return Event(orjson.dumps(obj).decode(), event)


def chunks(out: list[Out]) -> list[ChatChunk]:
    return [o for o in out if not isinstance(o, Comment)]


PING = data({"message_type": "ping", "id": "ping-1", "run_id": "run-1"})
END_TURN = data({"message_type": "stop_reason", "stop_reason": "end_turn"})


def assistant(text: Any, otid: str = "o1") -> Event:
    return data({"message_type": "assistant_message", "otid": otid, "content": text})


def reasoning(text: str, otid: str = "r1") -> Event:
    return data({"message_type": "reasoning_message", "otid": otid, "reasoning": text})


def stats(**fields: Any) -> Event:
    return data({"message_type": "usage_statistics", **fields})


# -- every captured stream, default options: the exact chunks ---------------------------------

CAPTURED = [
    pytest.param(
        "stream_tokens",
        [ROLE, KA, c("Echo: "), c("token "), c("streaming "), c("please"), STOP],
        "run-f4ded9a4-5697-46b8-80e3-18a12f6139d7",
        usage(460, 4),
        id="stream_tokens",
    ),
    pytest.param(
        "stream_tokens_tool",
        [ROLE, KA]
        + [c(t) for t in ("Tool ", "finished. ", "token ", "stream ", "with ", "a ", "TOOL ")]
        + [c("call"), STOP],
        "run-4dae6558-db20-460d-8171-c713f5bb0d62",
        usage(994, 10),
        id="stream_tokens_tool",
    ),
    pytest.param(
        "stream_tokens_think_tool",
        # Text before the tool call and the answer after it are two messages: kept apart.
        [ROLE, KA, c("Let me "), c("look that up."), c("\n\nTool ")]
        + [c(t) for t in ("finished. ", "THINK ", "then ", "use ", "a ", "TOOL")]
        + [STOP],
        "run-a3bf507e-5473-4cd1-9e85-fd4118844576",
        usage(1228, 9),
        id="stream_tokens_think_tool",
    ),
    pytest.param(
        "stream_steps",
        [ROLE, KA, c("Echo: step streaming please"), STOP],
        "run-9f60cfc1-4043-453a-859b-7aa28c715ec2",
        # Whole-step streaming reports zeros where token streaming reports null.
        usage(453, 4, cached=0, reasoning=0),
        id="stream_steps",
    ),
    pytest.param(
        "stream_slow_keepalive",
        [ROLE, KA, KA, c("Echo: "), c("be "), c("SLOW "), c("please"), STOP],
        "run-2f3d6a2c-8560-4dc5-9c27-9b4fdb97de01",
        usage(567, 4),
        id="stream_slow_keepalive",
    ),
    pytest.param(
        "conversation_stream",
        [ROLE, KA, c("Echo: "), c("hello "), c("from "), c("alice "), c("thread"), STOP],
        "run-65dac7f6-d84a-47d2-afb5-d9061bfa2f78",
        usage(383, 5),
        id="conversation_stream",
    ),
    pytest.param(
        "stream_tokens_tool_filtered_assistant_only",
        [ROLE, c("Tool "), c("finished. "), c("filtered "), c("TOOL "), c("stream"), STOP],
        "run-e02257a2-fdd7-4644-8c23-83025119b4f2",
        usage(1318, 7),
        id="filtered_assistant_only",
    ),
    pytest.param(
        "stream_via_messages_streaming_true",
        [ROLE, c("Echo: "), c("new "), c("style "), c("streaming"), STOP],
        "run-c1b0134d-784e-424e-8c7f-2150ebf5f68d",
        usage(535, 4),
        id="via_messages_streaming_true",
    ),
]


@pytest.mark.parametrize(("name", "expected", "run_id", "usage_chunk"), CAPTURED)
def test_captured_stream_gives_exact_chunks(
    name: str, expected: list[Out], run_id: str, usage_chunk: ChatChunk
) -> None:
    t, out = run(name)
    assert out == expected
    assert t.error is None
    assert t.finish_reason == "stop"
    assert t.stop_reason == "end_turn"
    assert t.run_id == run_id
    assert t.usage == usage_chunk["usage"]


@pytest.mark.parametrize(("name", "expected", "run_id", "usage_chunk"), CAPTURED)
def test_include_usage_adds_one_usage_chunk_after_the_finish_chunk(
    name: str, expected: list[Out], run_id: str, usage_chunk: ChatChunk
) -> None:
    _, out = run(name, include_usage=True)
    assert out == [*expected, usage_chunk]


@pytest.mark.parametrize(("name", "expected", "run_id", "usage_chunk"), CAPTURED)
def test_accumulated_stream_is_the_assistant_text(
    name: str, expected: list[Out], run_id: str, usage_chunk: ChatChunk
) -> None:
    _, out = run(name, include_usage=True)
    completion = accumulate(chunks(out))
    text = "".join(
        o["choices"][0]["delta"].get("content") or ""
        for o in expected
        if not isinstance(o, Comment)
    )
    assert completion["choices"][0]["message"]["content"] == text
    assert completion["choices"][0]["finish_reason"] == "stop"
    assert completion["usage"] == usage_chunk["usage"]
    assert "tool_calls" not in completion["choices"][0]["message"]


def test_think_tool_stream_accumulates_both_messages_with_a_paragraph_break() -> None:
    _, out = run("stream_tokens_think_tool")
    assert accumulate(chunks(out))["choices"][0]["message"]["content"] == (
        "Let me look that up.\n\nTool finished. THINK then use a TOOL"
    )


@pytest.mark.parametrize("name", [p.values[0] for p in CAPTURED] + ["stream_llm_error"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"show_reasoning": True},
        {"show_tools": True},
        {"show_reasoning": True, "show_tools": True},
    ],
    ids=["default", "reasoning", "tools", "both"],
)
def test_agent_tool_calls_never_become_openai_tool_calls(
    name: str, options: dict[str, bool]
) -> None:
    _, out = run(name, include_usage=True, **options)
    for chunk in chunks(out):
        assert chunk["id"] == "chatcmpl-test"
        assert chunk["created"] == 1
        for choice in chunk["choices"]:
            assert "tool_calls" not in choice["delta"]


def test_chunks_share_id_created_and_model() -> None:
    factory = ChunkFactory(MODEL)
    t = LettaTranslator(factory, show_tools=True, include_usage=True)
    out = chunks(t.start())
    for event in decode("stream_tokens_tool")[:-1]:
        out.extend(chunks(t.feed(event)))
    out.extend(t.finish())
    assert {(o["id"], o["created"], o["model"]) for o in out} == {
        (factory.id, factory.created, MODEL)
    }


# -- show_tools / show_reasoning ----------------------------------------------------------------

TOOL_RESULT_2 = (
    "[tool result] conversation_search ok: {'message': 'Showing 2 results:', 'results': "
    "[{'timestamp': '2026-11-22T02:15:22.619152+00:00', 'time_ago': '13s ago', 'role': "
    "'assistant', 'relevance': {'search_mode': 'sql'}, 'content': 'Echo: hell…\n"
)
TOOL_RESULT_3 = (
    "[tool result] conversation_search ok: {'message': 'Showing 3 results:', 'results': "
    "[{'timestamp': '2026-11-22T02:15:47.517405+00:00', 'time_ago': '1m ago', 'role': "
    "'assistant', 'relevance': {'search_mode': 'sql'}, 'content': 'Echo: hello…\n"
)
TOOL_CALL = '[tool] conversation_search({"query": "hello"})\n'


def test_show_tools_summarises_the_call_once_its_arguments_are_complete() -> None:
    _, out = run("stream_tokens_tool", show_tools=True)
    assert out[:6] == [ROLE, KA, r(TOOL_CALL), r(TOOL_RESULT_2), c("Tool "), c("finished. ")]
    assert out[-1] == STOP
    message = accumulate(chunks(out))["choices"][0]["message"]
    assert message["reasoning_content"] == TOOL_CALL + TOOL_RESULT_2
    assert message["content"] == "Tool finished. token stream with a TOOL call"


def test_show_tools_keeps_summaries_between_the_two_messages() -> None:
    _, out = run("stream_tokens_think_tool", show_tools=True)
    assert out[:7] == [
        ROLE,
        KA,
        c("Let me "),
        c("look that up."),
        r(TOOL_CALL),
        r(TOOL_RESULT_3),
        c("\n\nTool "),
    ]


def test_show_reasoning_alone_does_not_reveal_tools() -> None:
    _, out = run("stream_tokens_tool", show_reasoning=True)
    assert out == run("stream_tokens_tool")[1]


def test_tool_summary_truncates_long_arguments() -> None:
    args = orjson.dumps({"body": "x" * 500}).decode()
    t = translator(show_tools=True)
    t.feed(
        data(
            {
                "message_type": "tool_call_message",
                "otid": "t1",
                "tool_call": {"name": "send_email", "arguments": args, "tool_call_id": "c1"},
                "tool_calls": [{"name": "send_email", "arguments": args, "tool_call_id": "c1"}],
            }
        )
    )
    out = t.feed(END_TURN)
    summary = chunks(out)[0]["choices"][0]["delta"]["reasoning_content"]
    assert summary.startswith('[tool] send_email({"body":"xxx')
    assert summary.endswith("…)\n")
    assert len(summary) == len("[tool] send_email()\n") + 200


def test_tool_arguments_without_end_end_the_stream_at_the_answer_limit() -> None:
    # They are held until the call's summary is due: an agent that streams them without end
    # must not grow the proxy without end.
    t = translator(show_tools=True)
    t.start()
    piece = data({"message_type": "tool_call_message", "otid": "t1",
                  "tool_call": {"name": "f", "arguments": "x" * MIB, "tool_call_id": "c1"}})
    for _ in range(MAX_ANSWER // MIB + 1):
        assert t.feed(piece) == []
    assert t.error is not None and f"more than {MAX_ANSWER} bytes" in t.error.message
    assert t.feed(piece) == [] and t.finish() == []


def test_show_tools_marks_a_call_that_awaits_approval() -> None:
    t = translator(show_tools=True)
    t.start()
    out = t.feed(
        data(
            {
                "message_type": "approval_request_message",
                "otid": "a1",
                "tool_call": {"name": "delete_all", "arguments": "{}", "tool_call_id": "c9"},
                "tool_calls": {"name": "delete_all", "arguments": "{}", "tool_call_id": "c9"},
            }
        )
    )
    assert out == []
    out = t.feed(data({"message_type": "stop_reason", "stop_reason": "requires_approval"}))
    assert out == [r("[tool] delete_all({}) (awaiting approval)\n")]
    assert t.finish() == [F.finish("stop")]


def test_tool_error_result_says_error() -> None:
    t = translator(show_tools=True)
    out = t.feed(
        data(
            {
                "message_type": "tool_return_message",
                "otid": "x",
                "name": "web_search",
                "tool_return": "Timeout\ncalling search",
                "status": "error",
                "tool_call_id": "c1",
                "tool_returns": None,
            }
        )
    )
    assert out == [r("[tool result] web_search error: Timeout calling search\n")]


def test_tool_names_that_are_not_text_are_never_shown_as_a_repr() -> None:
    t = translator(show_tools=True)
    call = {"message_type": "tool_call_message", "otid": "t1",
            "tool_call": {"tool_call_id": "c1", "name": "x" * 1000, "arguments": "{}"}}
    ret = {"message_type": "tool_return_message", "otid": "x", "name": {"a": [1]},
           "tool_return": "ok", "status": "success", "tool_call_id": 7}
    out = [*t.feed(data(call)), *t.feed(data(ret))]
    texts = [o["choices"][0]["delta"]["reasoning_content"] for o in chunks(out)]
    assert texts == [f"[tool] {'x' * 99}…({{}})\n", "[tool result] tool ok: ok\n"]


def test_show_reasoning_streams_reasoning_content() -> None:
    events = [
        PING,
        reasoning("The user "),
        reasoning("greets me."),
        assistant("Hi"),
        reasoning("Second thought", otid="r2"),
        END_TURN,
    ]
    _, out = run_events(events, show_reasoning=True)
    assert out == [
        ROLE,
        KA,
        r("The user "),
        r("greets me."),
        c("Hi"),
        r("\n"),
        r("Second thought"),
        STOP,
    ]


def test_reasoning_is_hidden_by_default() -> None:
    events = [PING, reasoning("secret plan"), assistant("Hi"), END_TURN]
    _, out = run_events(events)
    assert out == [ROLE, KA, c("Hi"), STOP]


def test_hidden_reasoning_is_never_shown() -> None:
    hidden = data(
        {"message_type": "hidden_reasoning_message", "state": "redacted", "hidden_reasoning": "x"}
    )
    _, out = run_events([hidden, assistant("Hi"), END_TURN], show_reasoning=True, show_tools=True)
    assert out == [ROLE, c("Hi"), STOP]


def test_tool_summary_starts_a_new_line_after_open_reasoning() -> None:
    events = [
        reasoning("thinking"),
        data(
            {
                "message_type": "tool_call_message",
                "otid": "t1",
                "tool_calls": {"name": "f", "arguments": "{}", "tool_call_id": "c1"},
            }
        ),
        END_TURN,
    ]
    _, out = run_events(events, show_reasoning=True, show_tools=True)
    assert out == [ROLE, r("thinking"), r("\n[tool] f({})\n"), STOP]


# -- content shapes -----------------------------------------------------------------------------


def test_assistant_content_as_text_parts() -> None:
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "world"}]
    _, out = run_events([assistant(parts), END_TURN])
    assert out == [ROLE, c("Hello world"), STOP]


def test_empty_assistant_deltas_are_skipped() -> None:
    _, out = run_events([assistant(""), assistant("Hi"), END_TURN])
    assert out == [ROLE, c("Hi"), STOP]


def test_unknown_message_types_are_ignored() -> None:
    events = [
        data({"message_type": "user_message", "content": "echo of the input"}),
        data({"message_type": "something_new", "x": 1}),
        assistant("Hi"),
        END_TURN,
    ]
    _, out = run_events(events)
    assert out == [ROLE, c("Hi"), STOP]


# -- stop reasons, errors, truncation -----------------------------------------------------------


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [
        ("end_turn", "stop"),
        ("max_steps", "length"),
        ("max_tokens_exceeded", "length"),
        ("requires_approval", "stop"),
        ("no_tool_call", "stop"),
        ("tool_rule", "stop"),
        ("a_reason_from_the_future", "stop"),
    ],
)
def test_stop_reason_maps_to_finish_reason(stop_reason: str, finish_reason: str) -> None:
    stop = data({"message_type": "stop_reason", "stop_reason": stop_reason})
    t, out = run_events([assistant("Hi"), stop, stats(prompt_tokens=3, completion_tokens=1)])
    assert out == [ROLE, c("Hi"), F.finish(finish_reason)]
    assert t.finish_reason == finish_reason
    assert t.error is None


@pytest.mark.parametrize("stop_reason", sorted(ERROR_STOP_REASONS))
def test_failed_stop_reason_ends_with_an_error_and_no_finish_chunk(stop_reason: str) -> None:
    stop = data({"message_type": "stop_reason", "stop_reason": stop_reason})
    t, out = run_events(
        [assistant("Hi"), stop, stats(prompt_tokens=3, completion_tokens=1)], include_usage=True
    )
    assert out == [ROLE, c("Hi")]
    assert isinstance(t.error, UpstreamFailed)
    assert stop_reason in t.error.message
    assert "Letta" in t.error.message
    assert t.finish_reason is None


def test_every_letta_stop_reason_is_mapped_or_an_error() -> None:
    letta_reasons = {
        "end_turn",
        "error",
        "llm_api_error",
        "invalid_llm_response",
        "invalid_tool_call",
        "max_steps",
        "max_tokens_exceeded",
        "no_tool_call",
        "tool_rule",
        "cancelled",
        "insufficient_credits",
        "requires_approval",
        "context_window_overflow_in_system_prompt",
    }
    assert set(FINISH_REASONS) | ERROR_STOP_REASONS == letta_reasons
    assert not set(FINISH_REASONS) & ERROR_STOP_REASONS


def test_openai_error_codes_for_quota_and_context_length() -> None:
    for reason, code in [
        ("insufficient_credits", "insufficient_quota"),
        ("context_window_overflow_in_system_prompt", "context_length_exceeded"),
    ]:
        t, _ = run_events([data({"message_type": "stop_reason", "stop_reason": reason})])
        assert t.error is not None
        assert t.error.code == code


def test_llm_error_stream_sets_error_without_leaking_the_detail() -> None:
    t, out = run("stream_llm_error", include_usage=True)
    assert out == [ROLE, KA]
    assert isinstance(t.error, UpstreamFailed)
    assert t.error.status == 502
    assert t.error.message == (
        "Letta reported an error (llm_api_error): An error occurred with the LLM request."
    )
    assert "fake upstream failure" not in t.error.to_json().decode()
    assert t.error_detail is not None and "fake upstream failure" in t.error_detail
    assert t.run_id == "run-1ce6251e-a3d8-4f44-bbbf-a157bebc82b0"
    assert t.stop_reason == "llm_api_error"
    assert t.finish_reason is None


def test_error_event_is_terminal() -> None:
    err = data(
        {"message_type": "error_message", "error_type": "internal_error", "message": "boom"},
        event="error",
    )
    t, out = run_events([assistant("Hi"), err, assistant(" more"), END_TURN])
    assert out == [ROLE, c("Hi")]
    assert t.error is not None
    assert t.error.message == "Letta reported an error (internal_error): boom"


def test_error_event_with_unreadable_data_is_still_an_error() -> None:
    t, out = run_events([Event("oops", "error")])
    assert out == [ROLE]
    assert t.error is not None
    assert t.error.message == "Letta reported an error: the agent run failed"


@pytest.mark.parametrize("cut", range(2, 6))
def test_stream_cut_before_stop_reason_is_an_error(cut: int) -> None:
    events = decode("stream_tokens")[:cut]
    t, out = run_events(events, include_usage=True)
    assert all(o == KA or o["choices"][0]["finish_reason"] is None for o in out)
    assert isinstance(t.error, UpstreamFailed)
    assert t.error.message == "Letta's stream ended before the agent run finished."


def test_stream_cut_after_stop_reason_still_finishes() -> None:
    events = decode("stream_tokens")[:-2]  # no usage_statistics, no [DONE]
    t, out = run_events(events, include_usage=True)
    assert out[-2:] == [STOP, usage(0, 0)]
    assert t.error is None
    assert t.usage is None


def test_event_that_is_not_json_is_an_error() -> None:
    t, out = run_events([assistant("Hi"), Event("{not json")])
    assert out == [ROLE, c("Hi")]
    assert t.error is not None


def test_only_the_usage_event_may_carry_numbers_that_cannot_be_read() -> None:
    usage_event = '{"message_type":"usage_statistics","prompt_tokens":1e400,"total_tokens":-1e400}'
    t, out = run_events([assistant("Hi"), END_TURN, Event(usage_event)], include_usage=True)
    assert out == [ROLE, c("Hi"), STOP, usage(0, 0)]
    assert t.error is None
    other = '{"message_type":"assistant_message","otid":"o2","content":"x","n":1e400}'
    t, out = run_events([assistant("Hi"), Event(other), END_TURN])
    assert out == [ROLE, c("Hi")]
    assert t.error is not None
    assert t.error.message == "Letta sent a stream event that is not a JSON object."


def test_finish_is_idempotent_and_feed_after_finish_is_ignored() -> None:
    t, _ = run("stream_tokens")
    assert t.finish() == []
    assert t.feed(assistant("late")) == []


@pytest.mark.parametrize(
    "stop_reason", [None, 5, ["end_turn"], {"stop_reason": "end_turn"}, ""],
    ids=["null", "number", "list", "object", "empty"],
)
def test_a_stop_reason_that_is_not_text_ends_with_an_error(stop_reason: Any) -> None:
    stop = data({"message_type": "stop_reason", "stop_reason": stop_reason})
    t, out = run_events([assistant("Hi"), stop], include_usage=True)
    assert out == [ROLE, c("Hi")]
    assert t.error is not None
    assert t.error.message == "Letta sent a stop_reason that is not text."


def test_a_second_stop_reason_cannot_turn_a_failed_run_into_a_success() -> None:
    failed = data({"message_type": "stop_reason", "stop_reason": "llm_api_error"})
    t, out = run_events([assistant("Hi"), failed, END_TURN])
    assert out == [ROLE, c("Hi")]
    assert t.error is not None and "llm_api_error" in t.error.message


def test_an_error_type_of_any_length_gives_a_short_error_message() -> None:
    err = data({"message_type": "error_message", "error_type": "e" * 100_000, "message": "boom"})
    t, _ = run_events([err])
    assert t.error is not None and len(t.error.message) < 200


@pytest.mark.parametrize(
    "run_id",
    ["run-1\nCRITICAL forged log line", "../../v1/agents", "r" * 129, "", 5, ["run-1"]],
    ids=["newline", "path", "huge", "empty", "number", "list"],
)
def test_a_run_id_that_is_no_run_id_is_not_taken(run_id: Any) -> None:
    t = translator()
    t.feed(data({"message_type": "ping", "run_id": run_id}))
    assert t.run_id is None
    t.feed(data({"message_type": "ping", "run_id": "run-f4ded9a4-5697-46b8-80e3-18a12f6139d7"}))
    assert t.run_id == "run-f4ded9a4-5697-46b8-80e3-18a12f6139d7"


def test_run_id_comes_from_the_first_ping() -> None:
    t = translator()
    t.feed(data({"message_type": "ping", "run_id": "run-first"}))
    t.feed(data({"message_type": "ping", "run_id": "run-second"}))
    assert t.run_id == "run-first"


# -- usage ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
            {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
        ),
        (
            {
                "prompt_tokens": 10,
                "completion_tokens": 2,
                "total_tokens": 12,
                "cached_input_tokens": 8,
                "reasoning_tokens": None,
            },
            {
                "prompt_tokens": 10,
                "completion_tokens": 2,
                "total_tokens": 12,
                "prompt_tokens_details": {"cached_tokens": 8},
            },
        ),
        (
            {"prompt_tokens": 10, "completion_tokens": 2, "reasoning_tokens": 1},
            {
                "prompt_tokens": 10,
                "completion_tokens": 2,
                "total_tokens": 12,
                "completion_tokens_details": {"reasoning_tokens": 1},
            },
        ),
        ({}, {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}),
    ],
    ids=["plain", "cached", "reasoning", "empty"],
)
def test_letta_usage(fields: dict[str, Any], expected: Usage) -> None:
    assert letta_usage(fields) == expected


def test_usage_chunk_comes_after_finish_even_though_letta_sends_usage_last() -> None:
    _, out = run_events(
        [assistant("Hi"), END_TURN, stats(prompt_tokens=5, completion_tokens=1)], include_usage=True
    )
    assert out == [ROLE, c("Hi"), STOP, usage(5, 1)]
