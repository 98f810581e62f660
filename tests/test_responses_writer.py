"""ResponsesWriter, sans-IO: chunk batches in, Responses SSE bytes and the final object out.

Every stream here passes the reusable stream check (tests/responses_assert.py) and validates,
event by event, against the openai SDK's own types; openai-python's `responses.stream()`
helper reads a writer's bytes (through an in-memory transport, no socket) and accumulates
the same final response.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import openai
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from proxy.chunks import HELD_CHUNK, KEEP_ALIVE, Comment, Out, TextRun
from proxy.errors import ProxyError, RateLimited, UpstreamFailed, UpstreamTimeout
from proxy.ingress.chat import ChatEncoder
from proxy.ingress.responses import render_sync
from proxy.ingress.responses_object import completion_response, response_base, responses_usage
from proxy.ingress.responses_request import parse_responses_request
from proxy.ingress.responses_writer import ResponsesWriter
from proxy.openai_types import ChatChunk, ChunkFactory, Usage, accumulate, make_usage
from proxy.sse import KEEPALIVE, encode_data
from proxy.upstreams.http_errors import MAX_ANSWER
from tests.responses_assert import assert_responses_stream, output_text, parse_sse

try:  # the HTTP library the installed openai SDK is built on
    import httpx2 as httpx
except ImportError:  # pragma: no cover - older SDKs
    import httpx  # type: ignore[no-redef]

MODEL = "local/qwen"
RID = "resp_test123"
EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)

F = ChunkFactory(MODEL, "chatcmpl-test")
F.created = 1


def writer(echo: dict[str, Any] | None = None, **kw: Any) -> ResponsesWriter:
    return ResponsesWriter(RID, MODEL, 1700000000, echo or {}, clock=lambda: 1700000005,
                           item_base="base", **kw)


def call(index: int, *, id: str | None = None, name: str | None = None,
         args: str | None = None) -> ChatChunk:
    delta: dict[str, Any] = {"index": index}
    if id is not None:
        delta["id"] = id
        delta["type"] = "function"
    function: dict[str, str] = {}
    if name is not None:
        function["name"] = name
    if args is not None:
        function["arguments"] = args
    if function:
        delta["function"] = function
    return F.chunk({"tool_calls": [delta]})  # type: ignore[list-item]


def usage(prompt: int, completion: int, cached: int = 0, reasoning: int = 0) -> ChatChunk:
    u: Usage = make_usage(prompt, completion)
    u["prompt_tokens_details"] = {"cached_tokens": cached}
    u["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return F.usage(u)


def run(chunks: Iterable[Out], *, batch: int = 1, w: ResponsesWriter | None = None,
        fail: ProxyError | None = None) -> tuple[bytes, ResponsesWriter]:
    """The whole stream: start, the chunks in batches of `batch`, then finish (or fail)."""
    w = w or writer()
    out = [w.start()]
    items = list(chunks)
    for i in range(0, len(items), batch):
        out.append(w.feed(items[i:i + batch]))
    out.append(w.fail(fail) if fail is not None else w.finish())
    return b"".join(out), w


def checked(raw: bytes) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Passes the stream check and the SDK's types; returns the event data and final object."""
    final = assert_responses_stream(raw)
    events = [data for _, data in parse_sse(raw).events]
    for data in events:
        EVENTS.validate_python(data)
    Response.model_validate(final)
    return events, final


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"].removeprefix("response.") for e in events]


TEXT = [F.role(), F.content("Hel"), F.content("lo, "), F.content("world"), F.finish("stop"),
        usage(12, 3)]


def test_text_stream_is_created_in_progress_message_events_then_completed() -> None:
    raw, w = run(TEXT)
    events, final = checked(raw)
    assert types(events) == [
        "created", "in_progress", "output_item.added", "content_part.added",
        "output_text.delta", "output_text.delta", "output_text.delta", "output_text.done",
        "content_part.done", "output_item.done", "completed",
    ]
    assert raw.endswith(b"data: [DONE]\n\n")
    assert output_text(final) == "Hello, world"
    assert final["output"][0]["id"] == "msg_base_0"
    assert final["status"] == "completed" and final["completed_at"] == 1700000005
    assert final == w.final()


def test_every_event_line_names_its_type() -> None:
    raw, _ = run(TEXT)
    blocks = [b for b in raw.split(b"\n\n") if b and b != b"data: [DONE]"]
    for block in blocks:
        name, data = block.split(b"\n")
        assert name.startswith(b"event: ") and data.startswith(b"data: ")
        assert orjson.loads(data[6:])["type"] == name[7:].decode()


def test_reasoning_then_text_become_a_reasoning_item_then_a_message() -> None:
    chunks = [F.role(), F.reasoning("Let me "), F.reasoning("think."), F.content("42"),
              F.finish("stop")]
    events, final = checked(run(chunks)[0])
    assert types(events)[2:9] == [
        "output_item.added", "content_part.added", "reasoning_text.delta",
        "reasoning_text.delta", "reasoning_text.done", "content_part.done", "output_item.done",
    ]
    reasoning, message = final["output"]
    assert reasoning["id"] == "rs_base_0" and reasoning["type"] == "reasoning"
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "Let me think."}]
    assert reasoning["summary"] == []
    assert message["id"] == "msg_base_1" and output_text(final) == "42"


def test_parallel_tool_calls_with_ids_only_in_the_first_chunk_become_function_calls() -> None:
    chunks = [
        F.role(),
        call(0, id="call_a", name="get_weather", args=""),
        call(0, args='{"city":'),
        call(0, args=' "Paris"}'),
        call(1, id="call_b", name="get_time", args=""),
        call(1, args='{"tz": "CET"}'),
        F.finish("tool_calls"),
    ]
    events, final = checked(run(chunks)[0])
    calls = final["output"]
    assert [(c["id"], c["call_id"], c["name"], c["arguments"]) for c in calls] == [
        ("fc_base_0", "call_a", "get_weather", '{"city": "Paris"}'),
        ("fc_base_1", "call_b", "get_time", '{"tz": "CET"}'),
    ]
    first_done = types(events).index("output_item.done")
    assert types(events)[first_done + 1] == "output_item.added", "calls follow one another"
    # The sync chat answer of the same chunks names the same calls with the same arguments.
    chat = accumulate(c for c in chunks)["choices"][0]["message"]["tool_calls"]
    assert [(t["id"], t["function"]["arguments"]) for t in chat] == [
        (c["call_id"], c["arguments"]) for c in calls
    ]


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [(['{"a": 1}'], '{"a": 1}'), ([], "{}"), ([""], "{}")],
    ids=["whole-in-one-chunk", "none-at-all", "empty-fragment"],
)
def test_every_function_call_streams_at_least_one_arguments_delta(
    arguments: list[str], expected: str
) -> None:
    chunks = [F.role(), call(0, id="call_x", name="ping"), *(call(0, args=a) for a in arguments),
              F.finish("tool_calls")]
    events, final = checked(run(chunks)[0])
    deltas = [e["delta"] for e in events if e["type"].endswith("function_call_arguments.delta")]
    assert deltas == [expected]
    assert final["output"][0]["arguments"] == expected


def test_text_before_a_tool_call_is_its_own_message_item() -> None:
    chunks = [F.role(), F.content("Checking."), call(0, id="call_1", name="f", args="{}"),
              F.finish("tool_calls")]
    _, final = checked(run(chunks)[0])
    assert [o["type"] for o in final["output"]] == ["message", "function_call"]


def test_interleaved_arguments_of_a_finished_call_fail_the_response() -> None:
    w = writer()
    out = [w.start(), w.feed([F.role(), call(0, id="c0", name="a", args="{")])]
    with pytest.raises(UpstreamFailed) as caught:
        w.feed([call(1, id="c1", name="b", args="{}"), call(0, args="}")])
    out.append(w.fail(caught.value))
    _, final = checked(b"".join(out))
    assert final["status"] == "failed"
    # The events of the batch that raised still went out, in order (no sequence gap).
    assert [o["call_id"] for o in final["output"]] == ["c0", "c1"]


def test_a_repeated_tool_call_name_is_not_doubled() -> None:
    chunks = [F.role(), call(0, id="c0", name="lookup", args="{"),
              call(0, name="lookup", args="}"), F.finish("tool_calls")]
    _, final = checked(run(chunks)[0])
    assert final["output"][0]["name"] == "lookup"


@pytest.mark.parametrize(
    ("finish", "reason"),
    [("length", "max_output_tokens"), ("content_filter", "content_filter")],
)
def test_length_or_filter_stop_ends_incomplete_with_its_reason(finish: str, reason: str) -> None:
    events, final = checked(run([F.role(), F.content("Once upon a"), F.finish(finish)])[0])
    assert events[-1]["type"] == "response.incomplete"
    assert final["status"] == "incomplete"
    assert final["incomplete_details"] == {"reason": reason}
    assert final["output"][0]["status"] == "incomplete"
    assert final["completed_at"] is None


def test_length_stop_marks_only_the_last_item_incomplete() -> None:
    chunks = [F.role(), F.reasoning("hmm"), F.content("partial"), F.finish("length")]
    _, final = checked(run(chunks)[0])
    assert [o["status"] for o in final["output"]] == ["completed", "incomplete"]


def test_failure_after_start_is_response_failed_after_the_start_events() -> None:
    w = writer()
    raw = w.start() + w.feed([F.role(), F.content("Hal")])
    raw += w.fail(UpstreamTimeout("The upstream did not answer in time."))
    events, final = checked(raw)
    assert types(events)[:2] == ["created", "in_progress"]
    assert events[-1]["type"] == "response.failed"
    assert final["error"]["message"] == "The upstream did not answer in time."
    assert final["error"]["code"] == "server_error"
    # The half-written message is listed, not closed: no client acts on half an item.
    assert final["output"][0]["status"] == "incomplete"
    assert "output_item.done" not in types(events)
    assert raw.endswith(b"data: [DONE]\n\n")


def test_failure_before_any_event_still_starts_with_created() -> None:
    raw = writer().fail(UpstreamFailed("The upstream closed the stream."))
    events, _ = checked(raw)
    assert types(events) == ["created", "in_progress", "failed"]


def test_rate_limit_failure_keeps_the_rate_limit_code() -> None:
    _, final = checked(writer().fail(RateLimited("Slow down.")))
    assert final["error"]["code"] == "rate_limit_exceeded"


def test_nothing_follows_the_terminal_event() -> None:
    w = writer()
    raw = w.start() + w.finish()
    assert w.finish() == b"" and w.fail(UpstreamFailed("late")) == b""
    assert w.feed([F.content("late")]) == b""
    assert w.final()["status"] == "completed"
    checked(raw)


def test_an_answer_without_content_is_one_empty_message() -> None:
    events, final = checked(run([F.role(), F.finish("stop")])[0])
    assert [o["type"] for o in final["output"]] == ["message"]
    assert output_text(final) == ""
    assert "output_text.delta" not in types(events)


def test_keep_alive_comments_are_sse_comments_between_events() -> None:
    raw, _ = run([F.role(), KEEP_ALIVE, F.content("a"), Comment("still here"), F.finish("stop")])
    assert b"\n\n: keep-alive\n\n" in raw and b": still here\n\n" in raw
    checked(raw)


@pytest.mark.parametrize(
    ("chat_usage", "expected"),
    [
        (None, (0, 0, 0, 0, 0)),
        ({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}, (10, 0, 5, 0, 15)),
        ({"prompt_tokens": 10, "completion_tokens": 5},
         (10, 0, 5, 0, 15)),
        ({"prompt_tokens": 100, "completion_tokens": 40, "total_tokens": 140,
          "prompt_tokens_details": {"cached_tokens": 64},
          "completion_tokens_details": {"reasoning_tokens": 30}}, (100, 64, 40, 30, 140)),
        ({"prompt_tokens": "many", "completion_tokens": None,
          "prompt_tokens_details": None}, (0, 0, 0, 0, 0)),
    ],
    ids=["unknown", "plain", "no-total", "details", "garbage"],
)
def test_usage_maps_to_input_output_tokens_with_details(
    chat_usage: dict[str, Any] | None, expected: tuple[int, ...]
) -> None:
    got = responses_usage(chat_usage)
    assert (
        got["input_tokens"], got["input_tokens_details"]["cached_tokens"], got["output_tokens"],
        got["output_tokens_details"]["reasoning_tokens"], got["total_tokens"],
    ) == expected


def test_the_usage_chunk_reaches_the_final_object() -> None:
    _, final = checked(run([F.role(), F.content("x"), F.finish("stop"),
                            usage(7, 2, cached=4, reasoning=1)])[0])
    assert final["usage"]["input_tokens"] == 7
    assert final["usage"]["input_tokens_details"]["cached_tokens"] == 4
    assert final["usage"]["output_tokens_details"]["reasoning_tokens"] == 1
    assert final["usage"]["total_tokens"] == 9


def test_the_request_echo_and_store_appear_in_every_response_object() -> None:
    request = parse_responses_request(orjson.dumps({
        "model": MODEL, "input": "hi", "instructions": "Be brief.", "temperature": 0.2,
        "max_output_tokens": 50, "metadata": {"k": "v"},
        "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
        "tool_choice": "required", "text": {"format": {"type": "json_object"}},
    }))
    raw, _ = run(TEXT, w=writer(dict(request.echo)))
    events, _ = checked(raw)
    for event in events:
        if "response" in event:
            response = event["response"]
            assert response["instructions"] == "Be brief."
            assert response["temperature"] == 0.2 and response["max_output_tokens"] == 50
            assert response["tool_choice"] == "required"
            assert response["tools"][0]["name"] == "f"
            assert response["text"] == {"format": {"type": "json_object"}}
            assert response["metadata"] == {"k": "v"}
            assert response["store"] is False


ECHOED = {
    "allowed-tools": {"tools": [{"type": "function", "name": "f"},
                                {"type": "function", "name": "g", "strict": True}],
                      "tool_choice": {"type": "allowed_tools", "mode": "auto",
                                      "tools": [{"type": "function", "name": "g"}]}},
    "function-choice": {"tools": [{"type": "function", "name": "f"}],
                        "tool_choice": {"type": "function", "name": "f"},
                        "parallel_tool_calls": False},
    "json-schema": {"text": {"format": {"type": "json_schema", "name": "p",
                                        "schema": {"type": "object"}}, "verbosity": "low"}},
    "reasoning": {"reasoning": {"effort": "high", "summary": "auto"}},
    "chained": {"previous_response_id": "resp_prev", "truncation": "auto", "user": "u",
                "safety_identifier": "s", "prompt_cache_key": "k", "max_tool_calls": 3},
}


@pytest.mark.parametrize("name", list(ECHOED))
def test_every_echoed_request_option_validates_as_an_sdk_response(name: str) -> None:
    request = parse_responses_request(orjson.dumps({"input": "hi", **ECHOED[name]}))
    _, final = checked(run(TEXT, w=writer(dict(request.echo)))[0])
    for key in ECHOED[name]:
        if key != "tools":
            assert final[key] == request.echo[key]


def test_reasoning_between_answers_opens_new_items_each_time() -> None:
    chunks = [F.role(), F.reasoning("a"), F.content("b"), F.reasoning("c"), F.content("d"),
              F.finish("stop")]
    _, final = checked(run(chunks)[0])
    assert [o["id"] for o in final["output"]] == ["rs_base_0", "msg_base_1", "rs_base_2",
                                                  "msg_base_3"]


STREAMS = {
    "text": TEXT,
    "reasoning-text-usage": [F.role(), F.reasoning("a"), F.reasoning("b"), F.content("c"),
                             F.finish("stop"), usage(1, 2, reasoning=1)],
    "tools": [F.role(), F.content("ok"), call(0, id="c0", name="f", args='{"x":'),
              call(0, args="1}"), call(1, id="c1", name="g", args="{}"), F.finish("tool_calls"),
              usage(5, 5)],
    "refusal": [F.role(), F.chunk({"refusal": "I can't."}), F.finish("stop")],
    "length": [F.role(), F.content("cut"), F.finish("length")],
}


@pytest.mark.parametrize("batch", [1, 3, 100], ids=["chunk-per-batch", "3-per-batch", "one-batch"])
@pytest.mark.parametrize("name", list(STREAMS))
def test_the_sync_answer_equals_the_streams_final_object(name: str, batch: int) -> None:
    raw, streamed = run(STREAMS[name], batch=batch)
    _, final_event = checked(raw)
    sync = render_sync(writer(events=False), [STREAMS[name]])
    assert sync == final_event == streamed.final()
    # The same writer with events on ends in the same object: `events` changes only bytes.
    assert render_sync(writer(), [STREAMS[name]]) == sync


@pytest.mark.parametrize("name", list(STREAMS))
def test_a_sync_chat_completion_answers_what_its_stream_ends_with(name: str) -> None:
    chunks = STREAMS[name]
    base = response_base(RID, MODEL, 1700000000, {}, False)
    from_completion = completion_response(accumulate(chunks), base, "base", 1700000005)
    streamed = render_sync(writer(), [chunks])
    assert orjson.dumps(from_completion) == orjson.dumps(streamed)


def test_a_writer_without_events_writes_no_bytes_and_still_ends_in_the_object() -> None:
    quiet = writer(events=False)
    out = quiet.start() + quiet.feed(STREAMS["tools"]) + quiet.finish()
    assert out == b"data: [DONE]\n\n"
    assert quiet.final() == render_sync(writer(), [STREAMS["tools"]])


def test_item_ids_differ_between_responses_and_hold_only_url_safe_characters() -> None:
    ids = set()
    for _ in range(50):
        raw, _ = run(STREAMS["tools"], w=ResponsesWriter(RID, MODEL, 0, {}))
        final = assert_responses_stream(raw)  # checks the id alphabet and prefixes
        ids.update(o["id"] for o in final["output"])
    assert len(ids) == 50 * 3


# -- the openai SDK reads the stream -------------------------------------------------------


def sdk_client(body: bytes, content_type: str = "text/event-stream") -> openai.OpenAI:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": content_type})

    return openai.OpenAI(api_key="sk-test", base_url="http://proxy.invalid/v1",
                         http_client=httpx.Client(transport=httpx.MockTransport(answer)))


@pytest.mark.parametrize("name", [n for n in STREAMS if n != "length"])
def test_openai_sdk_stream_helper_accumulates_the_same_final_response(name: str) -> None:
    raw, w = run(STREAMS[name])
    client = sdk_client(raw)
    with client.responses.stream(model=MODEL, input="hi") as stream:
        seen = [event.type for event in stream]
        final = stream.get_final_response()
    assert seen[0] == "response.created" and seen[-1] == "response.completed"
    dump = {"mode": "json", "exclude_none": True, "by_alias": True}
    assert final.model_dump(**dump) == Response.model_validate(w.final()).model_dump(**dump)
    assert final.output_text == output_text(w.final())


def test_openai_sdk_stream_helper_reads_an_incomplete_response_to_the_end() -> None:
    raw, _ = run(STREAMS["length"])
    with sdk_client(raw).responses.stream(model=MODEL, input="hi") as stream:
        last = list(stream)[-1]
    assert last.type == "response.incomplete"
    assert last.response.incomplete_details is not None
    assert last.response.incomplete_details.reason == "max_output_tokens"


def test_openai_sdk_create_stream_yields_every_event_typed() -> None:
    raw, _ = run(STREAMS["tools"])
    events = list(sdk_client(raw).responses.create(model=MODEL, input="hi", stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [e.arguments for e in done] == ['{"x":1}', "{}"]


def test_sequence_numbers_continue_across_batches_without_gaps() -> None:
    w = writer()
    raw = w.start()
    for piece in itertools.islice(itertools.cycle(["a", "b", "c"]), 50):
        raw += w.feed([F.content(piece)])
    raw += w.finish()
    events, final = checked(raw)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert len(output_text(final)) == 50


def test_openai_sdk_reads_the_sync_answer_with_its_tool_calls() -> None:
    final = render_sync(writer(events=False), [STREAMS["tools"]])
    response = sdk_client(orjson.dumps(final), "application/json").responses.create(
        model=MODEL, input="hi")
    assert response.id == RID and response.output_text == "ok"
    calls = [o for o in response.output if o.type == "function_call"]
    assert [(c.call_id, c.name, c.arguments) for c in calls] == [
        ("c0", "f", '{"x":1}'), ("c1", "g", "{}")]


# --- a TextRun is its chunks ------------------------------------------------------------------


def text_run(texts: list[str], field: str = "content") -> TextRun:
    base = F.content("")
    choice = dict(base["choices"][0])
    del choice["delta"]
    return TextRun(dict(base), choice, texts, field)


PIECES: dict[str, Out] = {
    "role": F.role(),
    "reasoning": F.reasoning("hm"),
    "text": F.content("a"),
    "refusal": F.chunk({"refusal": "no"}),
    "keep-alive": KEEP_ALIVE,
}


@settings(derandomize=True, database=None, deadline=None, max_examples=200)
@given(
    steps=st.lists(
        st.one_of(
            st.sampled_from([*sorted(PIECES), "call"]),
            st.tuples(
                st.sampled_from(["content", "reasoning_content"]),
                st.lists(st.sampled_from(["", "x", " wörld", "🦜", 'q"uote', "\n"]), max_size=4),
            ),
        ),
        max_size=8,
    ),
    events=st.booleans(),
    batch=st.sampled_from([1, 3]),
)
def test_a_text_run_writes_exactly_what_its_chunks_write(
    steps: list[str | tuple[str, list[str]]], events: bool, batch: int
) -> None:
    # A TextRun (of text or of reasoning) wherever a stream may have one: first, after
    # reasoning, text, a refusal part, a tool call or another run, empty texts among its
    # texts, or no text at all.
    with_runs: list[Out] = []
    as_chunks: list[Out] = []
    for n, step in enumerate(steps):
        if isinstance(step, str):
            piece = call(n, id=f"call_{n}", name="f", args="{}") if step == "call" else PIECES[step]
            with_runs.append(piece)
            as_chunks.append(piece)
        else:
            with_runs.append(text_run(step[1], step[0]))
            as_chunks += text_run(step[1], step[0]).chunks()
    tail: list[Out] = [F.finish("stop"), usage(3, 4)]
    # One piece a batch, too: a token stream read as it comes, the writer's shortest path.
    fast, w_fast = run(with_runs + tail, batch=batch, w=writer(events=events))
    slow, w_slow = run(as_chunks + tail, batch=1, w=writer(events=events))
    assert fast == slow
    assert w_fast.final() == w_slow.final()


def test_a_text_run_is_its_chunks_to_the_chat_writer() -> None:
    run_ = text_run(["a", "", "b"])
    expected = b"".join(encode_data(orjson.dumps(c)) for c in run_.chunks())
    assert ChatEncoder().batch([run_]) == expected
    assert ChatEncoder().batch([KEEP_ALIVE, run_]) == KEEPALIVE + expected


# The final object keeps every text and argument: the writer ends the response past the bound
# of an answer held whole (proxy/upstreams/http_errors.py), whatever brings them.
TOO_LARGE = f"more than {MAX_ANSWER} bytes"
MIB = 1024 * 1024


@pytest.mark.parametrize(
    "piece",
    [
        pytest.param(F.content("x" * MIB), id="text"),
        pytest.param(F.reasoning("x" * MIB), id="reasoning"),
        pytest.param(text_run(["x" * MIB]), id="text-run"),
        pytest.param(call(0, args="x" * MIB), id="tool-call-arguments"),
    ],
)
@pytest.mark.parametrize("events", [True, False], ids=["stream", "sync"])
def test_an_answer_past_the_answer_limit_fails_the_response(piece: Out, events: bool) -> None:
    w = writer(events=events)
    w.start()
    with pytest.raises(UpstreamFailed, match=TOO_LARGE):
        for _ in range(MAX_ANSWER // MIB + 1):
            w.feed([piece])
    w.fail(UpstreamFailed("x"))
    assert w.final()["status"] == "failed"


def test_a_flood_of_one_character_tokens_is_bounded_before_its_text_reaches_the_limit() -> None:
    # Each token held costs far more than its one character: HELD_CHUNK counts it.
    w = writer(events=False)
    w.start()
    with pytest.raises(UpstreamFailed, match=TOO_LARGE):
        w.feed([text_run(["x"] * (MAX_ANSWER // HELD_CHUNK))])


@pytest.mark.parametrize("end", ["finish", "fail"])
def test_a_text_that_comes_after_the_response_ended_writes_nothing(end: str) -> None:
    w = writer()
    w.start()
    w.feed([text_run(["a"])])
    w.feed([text_run(["b"])])
    w.finish() if end == "finish" else w.fail(UpstreamFailed("gone"))
    final = w.final()
    assert w.feed([text_run(["c"])]) == b""
    assert w.final() == final
    assert output_text(final) == "ab"
