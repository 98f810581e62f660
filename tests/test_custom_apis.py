"""The five worked configs (Dify, Flowise, Langflow, n8n, LangGraph) on their servers' traffic,
and two servers that appear nowhere in the research, configured only here.

Flowise, Langflow and LangGraph streams are byte-exact captures from real servers; Dify and
n8n follow the research to the byte (tests/fixtures/{dify,n8n}/README.md). Everything is
sans-IO: the bytes go through StreamReader / SyncReader as the adapter will feed them.
"""

from __future__ import annotations

import copy
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from proxy.chunks import Out
from proxy.errors import UpstreamFailed
from proxy.openai_types import ChatChunk, ChatCompletion, ChunkFactory, Usage, accumulate
from proxy.session_keys import session_keys
from proxy.upstreams import custom_values
from proxy.upstreams.custom_reader import (
    StreamReader,
    SyncReader,
    error_message_of,
    is_json_content_type,
)
from proxy.upstreams.custom_spec import CustomSpec, compile_custom
from tests import custom_configs

FIXTURES = Path(__file__).parent / "fixtures"
MODEL = "custom-test"
F = ChunkFactory(MODEL, "chatcmpl-test")
F.created = 1
ROLE = F.role()
STOP = F.finish("stop")


def c(text: str) -> ChatChunk:
    return F.content(text)


def u(prompt: int, completion: int, total: int) -> ChatChunk:
    usage: Usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                    "total_tokens": total}
    return F.usage(usage)


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def compiled(name: str) -> CustomSpec:
    return compile_custom(custom_configs.upstream_block(getattr(custom_configs, name)))


def factory() -> ChunkFactory:
    f = ChunkFactory(MODEL, "chatcmpl-test")
    f.created = 1
    return f


def stream(spec: CustomSpec, chunks: list[bytes], **options: Any) -> tuple[list[Out],
                                                                           StreamReader]:
    """What the adapter's loop yields: feed reads until `done`, then finish until []."""
    options.setdefault("include_usage", True)
    reader = StreamReader(spec, factory(), **options)
    out: list[Out] = []
    for data in chunks:
        out += reader.feed(data)
        if reader.done:
            break
    while batch := reader.finish():
        out += batch
    return out, reader


def stream_failing(spec: CustomSpec, chunks: list[bytes], **options: Any
                   ) -> tuple[list[Out], UpstreamFailed]:
    out: list[Out] = []
    options.setdefault("include_usage", True)
    reader = StreamReader(spec, factory(), **options)
    try:
        for data in chunks:
            out += reader.feed(data)
            if reader.done:
                break
        while batch := reader.finish():
            out += batch
    except UpstreamFailed as exc:
        return out, exc
    raise AssertionError(f"the stream did not fail: {out}")


def sync(spec: CustomSpec, body: bytes | Any, **options: Any) -> list[ChatChunk]:
    reader = SyncReader(spec, factory(), **options)
    return reader.read(body) if isinstance(body, bytes) else reader.read_value(body)


def completion(chunks: list[Any]) -> ChatCompletion:
    return accumulate([chunk for chunk in chunks if isinstance(chunk, dict)])


def assert_same_at_every_split(spec: CustomSpec, body: bytes, step: int = 1) -> None:
    expected, _ = stream(spec, [body])
    for i in range(0, len(body) + 1, step):
        got, _ = stream(spec, [body[:i], body[i:]])
        assert got == expected, f"split at {i}"


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Earlier question"},
    {"role": "assistant", "content": "Earlier answer"},
    {"role": "user", "content": "With history"},
]


def request_values(spec: CustomSpec, *, hint: str | None, model: str = "flow-1",
                   stream_call: bool = True, session_id: str | None = None) -> dict[str, Any]:
    """The placeholder values the adapter builds for CHAT; `session_id` stands for a
    looked-up id (else the derived one)."""
    keys = session_keys("key-id-1", hint, spec.session.without_hint)
    values = custom_values.request_values(
        spec, CHAT, session=keys, key_id="key-id-1", model=model, stream=stream_call,
        request_id="req-1")
    if session_id is None and spec.session.lookup is None:
        session_id = custom_values.session_id(spec, values, keys, stream=stream_call)
    values["session.id"] = session_id
    return values


# === Dify ========================================================================================

DIFY_CONV = "8f4c6f5e-2f3a-4d5b-9c1e-7a2b3c4d5e6f"
DIFY_TASK = "a9b8c7d6-e5f4-4a3b-9c2d-1e0f9a8b7c6d"


def test_dify_stream_gives_deltas_usage_and_the_ids_for_session_and_cancel() -> None:
    out, reader = stream(compiled("DIFY"), [fixture("dify/chat_stream.sse")])
    words = ["Hello", " there", ",", " how", " can", " I", " help?"]
    assert out == [ROLE, *map(c, words), STOP, u(24, 7, 31)]
    assert reader.captured == {"task_id": DIFY_TASK}
    assert reader.session_id == DIFY_CONV


def test_dify_stream_reads_the_same_at_every_split() -> None:
    assert_same_at_every_split(compiled("DIFY"), fixture("dify/chat_stream.sse"))


def test_dify_blocking_answer_equals_the_accumulated_stream() -> None:
    spec = compiled("DIFY")
    streamed, _ = stream(spec, [fixture("dify/chat_stream.sse")])
    reader = SyncReader(spec, factory())
    blocking = reader.read(fixture("dify/chat_blocking.response.json"))
    assert completion(blocking) == completion(streamed)
    assert reader.session_id == DIFY_CONV


def test_dify_agent_app_thoughts_are_reasoning_when_shown() -> None:
    out, _ = stream(compiled("DIFY"), [fixture("dify/agent_stream.sse")], show_reasoning=True)
    message = completion(out)["choices"][0]["message"]
    assert message["content"] == "Hi! What do you need?"
    assert message.get("reasoning_content") == "The user greets me; answer briefly."
    hidden, _ = stream(compiled("DIFY"), [fixture("dify/agent_stream.sse")])
    assert "reasoning_content" not in completion(hidden)["choices"][0]["message"]


def test_dify_error_event_with_http_200_fails_after_the_deltas() -> None:
    out, err = stream_failing(compiled("DIFY"), [fixture("dify/error_stream.sse")])
    assert out == [ROLE, c("Hello"), c(" there")]
    assert err.message == "The upstream reported an error: [openai] Rate limit reached for requests"


def test_dify_stream_without_message_end_is_truncated() -> None:
    out, err = stream_failing(compiled("DIFY"), [fixture("dify/truncated_stream.sse")])
    assert out == [ROLE, c("Hello"), c(" there")]
    assert "truncated" in err.message


def test_dify_session_lookup_and_cancel_requests() -> None:
    spec = compiled("DIFY")
    values = request_values(spec, hint="session:chat-1")
    lookup = spec.session.lookup
    assert lookup is not None
    assert lookup.request.method == "GET"
    assert lookup.request.target(values) == f"/conversations?user={values['session.key']}&limit=1"
    found = orjson.loads(fixture("dify/conversations.response.json"))
    assert lookup.id(found, "message") == DIFY_CONV
    assert lookup.id(orjson.loads(fixture("dify/conversations_empty.response.json")),
                     "message") is None
    assert spec.session.cache == 600
    assert spec.cancel is not None
    _, reader = stream(spec, [fixture("dify/chat_stream.sse")])
    values = custom_values.with_captured(values, reader.captured)
    assert spec.cancel.target(values) == f"/chat-messages/{DIFY_TASK}/stop"
    assert spec.cancel.render_body(values) == {"user": values["session.key"]}


def test_dify_first_turn_omits_the_conversation_id_and_later_turns_send_it() -> None:
    spec = compiled("DIFY")
    call = spec.call(stream=True)
    first = call.render_body(request_values(spec, hint="session:c", session_id=None))
    assert "conversation_id" not in first
    assert first["response_mode"] == "streaming" and first["query"] == "With history"
    later = call.render_body(request_values(spec, hint="session:c", session_id=DIFY_CONV))
    assert later["conversation_id"] == DIFY_CONV


def test_dify_error_before_the_stream_is_read_from_its_json() -> None:
    assert error_message_of(compiled("DIFY"),
                            fixture("dify/error_conversation_not_exists.response.json")) == (
        "Conversation Not Exists.")


# === Flowise =====================================================================================


def test_flowise_stream_with_message_lines() -> None:
    out, reader = stream(compiled("FLOWISE"),
                         [fixture("flowise/prediction_stream_chatid.response.sse")])
    assert out == [ROLE, c("You "), c("said: "), c("Again "), c("via "), c("chatId"), STOP,
                   u(0, 0, 0)]
    assert reader.ended


def test_flowise_stream_reads_the_same_at_every_split() -> None:
    assert_same_at_every_split(compiled("FLOWISE"),
                               fixture("flowise/prediction_stream_chatid.response.sse"))


def test_flowise_heartbeats_before_the_answer_are_only_activity() -> None:
    out, _ = stream(compiled("FLOWISE"), [fixture("flowise/slow_stream_heartbeat.response.sse")])
    assert completion(out)["choices"][0]["message"]["content"] == "You said: SLOW35 please"


def test_flowise_error_event_then_end_fails_with_the_error() -> None:
    out, err = stream_failing(compiled("FLOWISE"),
                              [fixture("flowise/error_llm_500_stream.response.sse")])
    assert out == [ROLE]
    assert err.message == ("The upstream reported an error: Error: predictionsServices."
                           "buildChatflow - 500 fake LLM failure (FAIL in prompt)")


def test_flowise_truncated_stream_before_end() -> None:
    body = fixture("flowise/prediction_stream_chatid.response.sse")
    cut = body[: body.index(b'message:\ndata:{"event":"end"')]
    out, err = stream_failing(compiled("FLOWISE"), [cut])
    assert completion(out)["choices"][0]["message"]["content"] == "You said: Again via chatId"
    assert "truncated" in err.message


def test_flowise_sync_answer_equals_the_accumulated_stream() -> None:
    spec = compiled("FLOWISE")
    streamed, _ = stream(spec, [fixture("flowise/prediction_stream_chatid.response.sse")])
    # The captured sync body of the same chat, carrying the streamed turn's text.
    body = orjson.loads(fixture("flowise/prediction_sync_chatid.response.json"))
    body["text"] = "You said: Again via chatId"
    assert completion(sync(spec, body)) == completion(streamed)


def test_flowise_json_answer_to_a_streaming_call_is_read_with_the_sync_mapping() -> None:
    headers = fixture("flowise/prediction_stream_streaming_false.headers.txt").decode()
    content_type = next(line.split(":", 1)[1].strip() for line in headers.splitlines()
                        if line.lower().startswith("content-type:"))
    assert is_json_content_type(content_type)
    out = sync(compiled("FLOWISE"), fixture("flowise/prediction_stream_streaming_false"
                                            ".response.json"))
    assert out == [ROLE, c("You said: Streaming false"), STOP, u(0, 0, 0)]


def test_flowise_without_a_hint_sends_the_history_exactly_as_flowise_took_it() -> None:
    spec = compiled("FLOWISE")
    values = request_values(spec, hint=None)
    assert values["session.id"] is None
    body = spec.call(stream=True, stateless=True).render_body(values)
    assert body == orjson.loads(fixture("flowise/prediction_stream_history.request.json"))
    assert spec.call(stream=True, stateless=True).target(values) == "/prediction/flow-1"


def test_flowise_with_a_hint_sends_the_chat_id_and_only_the_new_turn() -> None:
    spec = compiled("FLOWISE")
    values = request_values(spec, hint="openwebui:chat-9")
    body = spec.call(stream=False).render_body(values)
    assert body == {"question": "With history", "chatId": values["session.key"],
                    "streaming": False}


def test_flowise_unknown_chatflow_error_text() -> None:
    assert error_message_of(compiled("FLOWISE"),
                            fixture("flowise/error_unknown_chatflow_sync.response.json")) == (
        "Chatflow 00000000-0000-0000-0000-000000000000 not found in the database!")


# === Langflow ====================================================================================


@pytest.mark.parametrize(
    ("name", "text", "usage"),
    [
        pytest.param("langflow/run_stream.response.ndjson", "You said: Stream me", (22, 4, 26),
                     id="basic-prompting"),
        pytest.param("langflow/agent_run_stream.response.ndjson", "You said: Second turn",
                     (20, 4, 24), id="agent"),
    ],
)
def test_langflow_answer_is_not_repeated_by_the_copies_after_the_tokens(
    name: str, text: str, usage: tuple[int, int, int]
) -> None:
    body = fixture(name)
    assert body.count(text.encode()) >= 4  # the server repeats the whole answer
    out, _ = stream(compiled("LANGFLOW"), [body])
    contents = [chunk["choices"][0]["delta"].get("content") for chunk in out
                if isinstance(chunk, dict) and chunk["choices"]]
    assert "".join(t for t in contents if t) == text
    assert out[-2:] == [STOP, u(*usage)]


def test_without_recap_the_langflow_answer_would_repeat() -> None:
    raw = custom_configs.upstream_block(custom_configs.LANGFLOW)
    del raw["stream"]["rules"][1]["recap"]
    out, _ = stream(compile_custom(raw), [fixture("langflow/run_stream.response.ndjson")])
    assert completion(out)["choices"][0]["message"]["content"].count("You said: Stream me") == 4


def test_langflow_stream_reads_the_same_at_every_split() -> None:
    assert_same_at_every_split(compiled("LANGFLOW"),
                               fixture("langflow/run_stream.response.ndjson"), step=3)


def test_langflow_sync_answer_equals_the_accumulated_stream() -> None:
    spec = compiled("LANGFLOW")
    body = fixture("langflow/run_stream.response.ndjson")
    streamed, _ = stream(spec, [body])
    # The `end` event carries the run's whole sync response.
    end = orjson.loads(body.strip().split(b"\n\n")[-1])
    assert end["event"] == "end"
    assert completion(sync(spec, end["data"]["result"])) == completion(streamed)


def test_langflow_captured_sync_answer() -> None:
    out = sync(compiled("LANGFLOW"), fixture("langflow/run_sync.response.json"))
    assert completion(out)["choices"][0]["message"]["content"] == "You said: Hello there"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        pytest.param("langflow/error_llm_500_stream.response.ndjson",
                     "Error code: 500 - {'error': {'message': 'fake LLM failure (FAIL in prompt)',",
                     id="basic-prompting"),
        pytest.param("langflow/error_llm_500_agent_stream.response.ndjson",
                     "fake LLM failure (FAIL in prompt)", id="agent"),
    ],
)
def test_langflow_error_without_end_fails_with_the_first_errors_text(
    name: str, message: str
) -> None:
    out, err = stream_failing(compiled("LANGFLOW"), [fixture(name)])
    assert out == [ROLE]
    assert err.message.startswith("The upstream reported an error: " + message)
    assert "Traceback" not in err.message and len(err.message) < 400


def test_langflow_truncated_stream_before_end() -> None:
    body = fixture("langflow/run_stream.response.ndjson")
    out, err = stream_failing(compiled("LANGFLOW"), [body[: body.rindex(b'{"event": "end"')]])
    assert "truncated" in err.message
    assert completion(out)["choices"][0]["message"]["content"] == "You said: Stream me"


def test_langflow_request_and_unknown_flow_error() -> None:
    spec = compiled("LANGFLOW")
    values = request_values(spec, hint="session:s")
    assert spec.call(stream=True).target(values) == "/run/flow-1?stream=true"
    assert spec.call(stream=True).render_body(values) == {
        "input_value": "With history", "input_type": "chat", "output_type": "chat",
        "session_id": values["session.key"]}
    assert error_message_of(spec, fixture("langflow/error_unknown_flow.response.json")) == (
        "Flow identifier 00000000-0000-0000-0000-000000000000 not found")


# === n8n =========================================================================================

N8N_TEXT = "Hello! I'm the agent. Anything else?"


def test_n8n_stream_runs_across_nodes_until_eof() -> None:
    out, reader = stream(compiled("N8N"), [fixture("n8n/stream.ndjson")])
    assert completion(out)["choices"][0]["message"]["content"] == N8N_TEXT
    assert out[0] == ROLE and out[-2:] == [STOP, u(0, 0, 0)]
    assert not reader.ended  # `type: end` closes one node's message only


def test_n8n_stream_reads_the_same_at_every_split() -> None:
    assert_same_at_every_split(compiled("N8N"), fixture("n8n/stream.ndjson"))


def test_n8n_text_chunk_objects_are_text() -> None:
    out, _ = stream(compiled("N8N"), [fixture("n8n/stream_text_chunk.ndjson")])
    assert out[:3] == [ROLE, c("Hello"), c("!")]


def test_n8n_last_node_answer_on_a_streaming_call_falls_back_to_the_sync_mapping() -> None:
    body = fixture("n8n/last_node.response.json")
    out, _ = stream(compiled("N8N"), [body])
    assert out == [ROLE, c(N8N_TEXT), STOP, u(0, 0, 0)]
    streamed, _ = stream(compiled("N8N"), [fixture("n8n/stream.ndjson")])
    assert completion(sync(compiled("N8N"), body)) == completion(streamed)


def test_n8n_error_line_fails_after_the_deltas() -> None:
    out, err = stream_failing(compiled("N8N"), [fixture("n8n/error_stream.ndjson")])
    assert out == [ROLE, c("Hello")]
    assert err.message == ("The upstream reported an error: Execution stopped: the model "
                           "returned 429")


def test_n8n_stream_cut_inside_a_line_fails() -> None:
    body = fixture("n8n/stream.ndjson")
    cut = body[: body.index(b'"content":" else?"') + 5]
    out, err = stream_failing(compiled("N8N"), [cut])
    assert "not JSON" in err.message
    assert completion(out)["choices"][0]["message"]["content"] == "Hello! I'm the agent. Anything"


def test_n8n_request_uses_the_session_key_as_session_id() -> None:
    spec = compiled("N8N")
    values = request_values(spec, hint="session:1", model="webhook-id")
    assert spec.call(stream=True).target(values) == "/webhook-id/chat"
    assert spec.call(stream=True).render_body(values) == {
        "action": "sendMessage", "sessionId": values["session.key"], "chatInput": "With history"}


# === LangGraph ===================================================================================


def test_langgraph_messages_tuple_stream() -> None:
    out, _ = stream(compiled("LANGGRAPH"),
                    [fixture("langgraph/thread_runs_stream_messages_tuple.response.sse")])
    assert out == [ROLE, c("You "), c("said: "), c("Second "), c("turn"), STOP, u(13, 4, 17)]


def test_langgraph_stream_reads_the_same_at_every_split() -> None:
    assert_same_at_every_split(
        compiled("LANGGRAPH"), fixture("langgraph/thread_runs_stream_messages_tuple.response.sse"),
        step=2)


def test_langgraph_tool_turn_hides_the_tool_message_and_sums_both_calls_usage() -> None:
    out, _ = stream(compiled("LANGGRAPH"),
                    [fixture("langgraph/thread_runs_stream_tool_call_multi_mode.response.sse")])
    result = completion(out)
    assert result["choices"][0]["message"]["content"] == "Tool said: lookup result for test"
    assert result["usage"] == {"prompt_tokens": 66, "completion_tokens": 8, "total_tokens": 74}


def test_langgraph_heartbeat_comments_are_only_activity() -> None:
    out, _ = stream(compiled("LANGGRAPH"),
                    [fixture("langgraph/slow_thread_runs_stream.response.sse")])
    assert completion(out)["choices"][0]["message"]["content"] == "You said: SLOW stream"


def test_langgraph_error_event_fails_with_the_servers_message() -> None:
    out, err = stream_failing(compiled("LANGGRAPH"),
                              [fixture("langgraph/error_llm_500_thread_runs_stream.response.sse")])
    assert out == [ROLE]
    assert err.message == "The upstream reported an error: An internal error occurred"


def test_langgraph_stream_ends_at_eof_so_a_cut_stream_ends_the_answer() -> None:
    # LangGraph has no end event (§7.5 has no `end` rule): EOF is the end, whatever came.
    body = fixture("langgraph/thread_runs_stream_messages_tuple.response.sse")
    events = body.split(b"\r\n\r\n")
    out, _ = stream(compiled("LANGGRAPH"), [b"\r\n\r\n".join(events[:4]) + b"\r\n\r\n"])
    assert out == [ROLE, c("You "), c("said: "), STOP, u(0, 0, 0)]


def test_langgraph_runs_wait_body_equals_the_accumulated_stream() -> None:
    raw = custom_configs.upstream_block(custom_configs.LANGGRAPH)
    raw["sync"] = {"text": "messages[-1].content", "error": "__error__.message",
                   "usage": {"prompt_tokens": "messages[-1].usage_metadata.input_tokens",
                             "completion_tokens": "messages[-1].usage_metadata.output_tokens",
                             "total_tokens": "messages[-1].usage_metadata.total_tokens"}}
    spec = compile_custom(raw)
    streamed, _ = stream(spec,
                         [fixture("langgraph/stateless_runs_stream_messages_tuple.response.sse")])
    # The captured /runs/wait state, for the streamed turn's text (leading keep-alive
    # newlines included, as the server writes them).
    state = orjson.loads(fixture("langgraph/stateless_runs_wait.response.json"))
    assert completion(sync(spec, state))["choices"][0]["message"]["content"] == (
        "You said: Stateless hi")
    state = copy.deepcopy(state)
    state["messages"][-1]["content"] = "You said: Stateless stream"
    assert completion(sync(spec, b"\n\n" + orjson.dumps(state))) == completion(streamed)
    with pytest.raises(UpstreamFailed, match="An internal error occurred"):
        sync(spec, fixture("langgraph/error_llm_500_stateless_runs_wait.response.json"))


def test_langgraph_thread_is_the_session_uuid_and_hintless_requests_are_stateless() -> None:
    spec = compiled("LANGGRAPH")
    values = request_values(spec, hint="session:chat", model="agent")
    thread = values["session.id"]
    assert uuid.UUID(thread).version == 4 and thread == values["session.uuid"]
    call = spec.call(stream=True)
    assert call.target(values) == f"/threads/{thread}/runs/stream"
    body = call.render_body(values)
    assert body["input"] == {"messages": [{"role": "user", "content": "With history"}]}
    assert body["assistant_id"] == "agent" and body["if_not_exists"] == "create"
    hintless = request_values(spec, hint=None, model="agent")
    assert hintless["session.id"] is None
    stateless = spec.call(stream=True, stateless=True)
    assert stateless.target(hintless) == "/runs/stream"
    assert stateless.render_body(hintless)["input"]["messages"] == [
        {"role": "user", "content": "Earlier question"},
        {"role": "assistant", "content": "Earlier answer"},
        {"role": "user", "content": "With history"},
    ]
    assert error_message_of(spec, fixture("langgraph/error_missing_thread_runs_stream"
                                          ".response.txt")) == "Thread or assistant not found."


# === Servers that appear nowhere in the research =================================================

# "Quill", an in-house agent: SSE with CRLF, named events, snapshots of the whole text so far
# (not deltas), thoughts as a separate event, a data-less `event: done` as the end, errors as
# a plain-text `failure` event, usage on the last snapshot; sessions in a query parameter.
QUILL = """
kind: custom
url: http://quill.internal:9000/api
mode: client
request:
  path: "/agents/{{ model }}/reply"
  query: {conversation: "{{ session.key }}", trace: "{{ request_id }}"}
  body:
    prompt: "{{ input }}"
    context: "{{ system? }}"
    opts: {stream: "{{ stream }}"}
sync:
  text: reply.parts
  join: "\\n"
  reasoning: reply.thinking
  usage: {prompt_tokens: meter.in, completion_tokens: meter.out}
  finish: reply.cut
  error: failure
stream:
  framing: sse
  rules:
    - when: {$event: snapshot}
      text: reply.parts
      cumulative: true
      usage: {prompt_tokens: meter.in, completion_tokens: meter.out}
      finish: reply.cut
    - when: {$event: thought}
      reasoning: $
    - when: {$event: failure}
      error: $
    - when: {$event: done}
      end: true
"""


def quill_events(*events: tuple[str, str | None]) -> bytes:
    out = b""
    for name, data in events:
        out += f"event: {name}\r\n".encode()
        if data is not None:
            out += f"data: {data}\r\n".encode()
        out += b"\r\n"
    return out


QUILL_STREAM = quill_events(
    ("thought", "planning"),
    ("snapshot", '{"reply": {"parts": [{"type": "text", "text": "Bonjour"}]}}'),
    ("snapshot", '{"reply": {"parts": [{"type": "text", "text": "Bonjour, "}, '
                 '{"type": "tool_use", "name": "x"}, {"type": "text", "text": "monde"}]}}'),
    ("snapshot", '{"reply": {"parts": [{"type": "text", "text": "Bonjour, monde"}]}, '
                 '"meter": {"in": 11, "out": 3}, "reply.cut": null}'),
    ("done", None),
)


def test_an_unknown_server_streams_from_yaml_alone() -> None:
    spec = compile_custom(yaml.safe_load(QUILL))
    assert spec.warnings == ()
    out, reader = stream(spec, [QUILL_STREAM], show_reasoning=True)
    assert out == [ROLE, F.reasoning("planning"), c("Bonjour"), c(", monde"), STOP, u(11, 3, 14)]
    assert reader.ended
    assert_same_at_every_split(spec, QUILL_STREAM)


def test_an_unknown_servers_sync_answer_equals_its_stream() -> None:
    spec = compile_custom(yaml.safe_load(QUILL))
    streamed, _ = stream(spec, [QUILL_STREAM], show_reasoning=True)
    body = {"reply": {"parts": [{"type": "text", "text": "Bonjour, monde"}],
                      "thinking": "planning"}, "meter": {"in": 11, "out": 3}}
    assert completion(sync(spec, body, show_reasoning=True)) == completion(streamed)


def test_an_unknown_servers_failure_and_truncation() -> None:
    spec = compile_custom(yaml.safe_load(QUILL))
    failed = quill_events(("snapshot", '{"reply": {"parts": "Bon"}}'),
                          ("failure", "quota exhausted for tenant"))
    out, err = stream_failing(spec, [failed])
    assert out == [ROLE, c("Bon")]
    assert err.message == "The upstream reported an error: quota exhausted for tenant"
    _, err = stream_failing(spec, [QUILL_STREAM[: QUILL_STREAM.index(b"event: done")]])
    assert "truncated" in err.message


def test_an_unknown_servers_request() -> None:
    spec = compile_custom(yaml.safe_load(QUILL))
    values = request_values(spec, hint="session:x", model="writer/v2")
    call = spec.call(stream=True)
    assert call.target(values) == (
        f"/agents/writer%2Fv2/reply?conversation={values['session.key']}&trace=req-1")
    assert call.render_body(values) == {"prompt": "With history", "opts": {"stream": True}}


# A plain-text streaming agent behind a GET: no JSON anywhere.
ECHOER = """
mode: stream
request:
  method: GET
  path: /say
  query: {text: "{{ input }}", who: "{{ caller }}"}
stream: {framing: text}
"""


def test_a_plain_text_agent_streams_its_body_as_deltas() -> None:
    spec = compile_custom(yaml.safe_load(ECHOER))
    body = "Ça va ? ✓".encode()
    out, _ = stream(spec, [body[:2], body[2:7], body[7:]], include_usage=False)
    assert completion(out)["choices"][0]["message"]["content"] == "Ça va ? ✓"
    assert out[0] == ROLE and out[-1] == STOP
    values = {"input": "a&b c", "caller": "ap-1"}
    assert spec.call(stream=True).target(values) == "/say?text=a%26b%20c&who=ap-1"
    assert spec.call(stream=True).render_body(values) is None
    assert [str(w).split(":")[0] for w in spec.warnings] == ["stream.rules", "request"]
