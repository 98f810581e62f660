"""Compiling a custom block: precise problems by key path, warnings, and the compiled calls."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from proxy.upstreams.custom_spec import CustomSpecError, compile_custom
from tests import custom_configs

VALUES: dict[str, Any] = {
    "input": "hi",
    "new_messages": [{"role": "user", "content": "hi"}],
    "messages": [{"role": "user", "content": "hi"}],
    "model": "agent",
    "session.id": "9b2f4a8e-0000-4000-8000-000000000001",
    "session.key": "ap-k",
    "stream": True,
}

MINIMAL = """
request: {path: /chat, body: {q: "{{ input }}", session: "{{ session.key }}"}}
sync: {text: answer}
stream:
  framing: sse
  rules:
    - when: {$event: delta}
      text: t
    - when: {$event: done}
      end: true
"""


def block(text: str = MINIMAL, **changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load(text)
    raw.update(changes)
    return raw


def problems(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(CustomSpecError) as caught:
        compile_custom(raw)
    return [str(p) for p in caught.value.problems]


@pytest.mark.parametrize("name", ["DIFY", "FLOWISE", "LANGFLOW", "N8N", "LANGGRAPH"])
def test_each_worked_config_compiles_without_problems_or_warnings(name: str) -> None:
    spec = compile_custom(custom_configs.upstream_block(getattr(custom_configs, name)))
    assert spec.warnings == ()


def test_the_agent_protocol_variant_compiles() -> None:
    spec = compile_custom(custom_configs.agent_protocol_block())
    call = spec.call(stream=True)
    assert call.target(VALUES) == "/runs/stream"
    assert call.render_body(VALUES)["thread_id"] == VALUES["session.id"]
    assert "thread_id" not in call.render_body({**VALUES, "session.id": None})


def test_the_shared_keys_of_every_kind_are_left_to_the_config_reader() -> None:
    raw = custom_configs.upstream_block(custom_configs.DIFY)
    assert {"kind", "url", "api_key"} <= set(raw)
    compile_custom(raw)


# --- calls: request merged with its overrides ------------------------------------------------


def test_sync_and_stream_overrides_merge_over_the_request() -> None:
    spec = compile_custom(custom_configs.upstream_block(custom_configs.DIFY))
    sync = spec.call(stream=False).render_body(VALUES)
    stream = spec.call(stream=True).render_body(VALUES)
    assert sync["response_mode"] == "blocking" and stream["response_mode"] == "streaming"
    assert sync["query"] == stream["query"] == "hi"
    assert sync["conversation_id"] == VALUES["session.id"]


def test_query_overrides_select_the_streaming_endpoint() -> None:
    spec = compile_custom(custom_configs.upstream_block(custom_configs.LANGFLOW))
    assert spec.call(stream=True).target(VALUES) == "/run/agent?stream=true"
    assert spec.call(stream=False).target(VALUES) == "/run/agent?stream=false"


def test_the_stateless_variant_replaces_path_and_merges_body() -> None:
    spec = compile_custom(custom_configs.upstream_block(custom_configs.LANGGRAPH))
    stateful = spec.call(stream=True)
    stateless = spec.call(stream=True, stateless=True)
    assert stateful.target(VALUES) == f"/threads/{VALUES['session.id']}/runs/stream"
    assert stateless.target({**VALUES, "session.id": None}) == "/runs/stream"
    body = stateless.render_body(VALUES)
    assert body["input"] == {"messages": VALUES["messages"]}
    assert body["assistant_id"] == "agent" and body["if_not_exists"] == "create"
    assert stateful.render_body(VALUES)["input"] == {"messages": VALUES["new_messages"]}


def test_upstream_streams_follows_the_mode() -> None:
    client = compile_custom(block())
    assert client.upstream_streams(True) and not client.upstream_streams(False)
    assert compile_custom(block(mode="stream")).upstream_streams(False)
    assert not compile_custom(block(mode="sync")).upstream_streams(True)


def test_a_get_request_has_no_body() -> None:
    spec = compile_custom(block("""
request: {method: GET, path: "/ask", query: {q: "{{ input }}", s: "{{ session.key }}"}}
sync: {text: answer}
mode: sync
"""))
    assert spec.call(stream=False).render_body(VALUES) is None
    assert spec.call(stream=False).method == "GET"


# --- problems -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        pytest.param({"mode": "steam"}, "mode: 'steam' is not one of client, stream, sync; "
                     "did you mean 'stream'?", id="mode-typo"),
        pytest.param({"reqest": {}}, "reqest: unknown key 'reqest'; did you mean 'request'?",
                     id="unknown-top-key"),
        pytest.param({"sync": {"txt": "a"}}, "sync.txt: unknown key 'txt'; did you mean "
                     "'text'?", id="unknown-sync-key"),
        pytest.param({"sync": {"join": ""}}, "sync: missing required key 'text'",
                     id="sync-without-text"),
        pytest.param({"sync": {"text": "a..b"}}, "sync.text: 'a..b': expected a name at column 3",
                     id="bad-sync-path"),
        pytest.param({"sync": {"text": ["a", "jmespath:a"]}}, "sync.text: [1]: 'jmespath:a': "
                     "`jmespath:` paths are not supported yet", id="jmespath"),
        pytest.param({"stream": {"rules": [{"text": "t"}]}},
                     "stream: missing required key 'framing'", id="missing-framing"),
        pytest.param({"stream": {"framing": "websocket", "rules": [{"text": "t"}]}},
                     "stream.framing: 'websocket' is not one of sse, ndjson, text",
                     id="unknown-framing"),
        pytest.param({"stream": {"framing": "sse", "rules": [{"end": True}]}},
                     "stream.rules: no rule has `text`", id="no-text-rule"),
        pytest.param({"stream": {"framing": "sse", "rules": {"text": "t"}}},
                     "stream.rules: expected a list of rules, got a mapping", id="rules-not-list"),
        pytest.param({"request": {"path": "/x", "body": {"q": "{{ inptu }}"}}},
                     "request.body.q: unknown placeholder `{{ inptu }}`; did you mean "
                     "`{{ input }}`?", id="unknown-placeholder-in-body"),
        pytest.param({"sync": {"text": "a", "body": {"x": ["{{ sesion.key }}"]}}},
                     "sync.body.x[0]: unknown placeholder `{{ sesion.key }}`; did you mean "
                     "`{{ session.key }}`?", id="unknown-placeholder-in-override"),
        pytest.param({"request": {"path": "/x", "body": {"n": 10**20}}}, "request.body.n: "
                     "100000000000000000000 is beyond what JSON can carry exactly",
                     id="integer-beyond-64-bits"),
        pytest.param({"sync": {"text": "a", "body": {"t": [float("inf")]}}}, "sync.body.t[0]: "
                     "inf is not a JSON number", id="infinite-number"),
        pytest.param({"request": {"path": "/x", "body": {"d": yaml.safe_load("[" * 200 + "]"
                                                                            * 200)}}},
                     "request.body.d" + "[0]" * 127 + ": nested more than 128 levels deep",
                     id="body-nested-too-deep"),
        pytest.param({"request": {"path": "chat"}}, "request.path: a path starts with `/`",
                     id="relative-path"),
        pytest.param({"request": {"path": "/x", "method": "FETCH"}},
                     "request.method: 'FETCH' is not one of GET, POST, PUT, PATCH, DELETE",
                     id="bad-method"),
        pytest.param({"request": {"method": "GET", "path": "/x", "body": {"a": 1}}},
                     "request.method: a GET request sends no body", id="get-with-body"),
        pytest.param({"request": {"path": "/x", "body": {"q": "{{ captured.task_id }}"}}},
                     "request.body.q: `{{ captured.task_id }}`: captured values exist only in "
                     "`cancel` and `session` requests", id="captured-in-request"),
        pytest.param({"cancel": {"path": "/stop/{{ captured.taskid }}"}},
                     "cancel.path: `{{ captured.taskid }}`: no stream rule captures `taskid`",
                     id="captured-never-captured"),
        pytest.param({"request": {"path": "/x"}, "models": {"path": "/m/{{ model }}"}},
                     "models.path: unknown placeholder `{{ model }}`", id="placeholder-in-models"),
        pytest.param({"session": {"id": "{{ session.id }}"}}, "session.id: the session id "
                     "cannot be made from `{{ session.id }}` itself", id="self-referent-id"),
        pytest.param({"session": {"from_response": "sid", "create": {"path": "/s"}}},
                     "session.create: `create` is for ids the proxy derives; with "
                     "`from_response` the server issues them", id="create-with-issued-ids"),
        pytest.param({"session": {"lookup": {"path": "/c", "id": "x"},
                                  "id": "{{ session.uuid }}"}},
                     "session.id: `id` is for ids the proxy derives; with `lookup` the server "
                     "issues them", id="id-with-issued-ids"),
        pytest.param({"session": {"lookup": {"path": "/c"}}},
                     "session.lookup: missing required key 'id'", id="lookup-without-id"),
        pytest.param({"session": {"without_hint": "never"}}, "session.without_hint: 'never' is "
                     "not one of new, per_key, stateless", id="bad-without-hint"),
        pytest.param({"session": {"stateless": {"path": "/y"}}}, "session.stateless: used only "
                     "with `without_hint: stateless`", id="stateless-without-stateless"),
        pytest.param({"session": {"cache": -1}}, "session.cache: expected a finite number",
                     id="negative-cache"),
        pytest.param({"session": {"cache": float("nan")}}, "session.cache: expected a finite "
                     "number", id="nan-cache"),
        pytest.param({"session": {"cache": float("inf")}}, "session.cache: expected a finite "
                     "number", id="infinite-cache"),
        pytest.param({"session": {"create": {"path": "/s", "ok": [409, "x"]}}},
                     "session.create.ok: expected HTTP statuses (100-599), got 'x'",
                     id="bad-ok-status"),
        pytest.param({"session": {"carry": "cookie"}}, "session.carry: 'cookie' is not one of "
                     "marker", id="bad-carry"),
        pytest.param({"request": {"path": "/x", "message_format": {"roles": {"bot": "ai"}}}},
                     "request.message_format.roles.bot: unknown role 'bot'",
                     id="unknown-role"),
        pytest.param({"error_message": "a[x]"}, "error_message: 'a[x]': [x] at column 2 is not "
                     "an index", id="bad-error-message"),
    ],
)
def test_a_problem_names_its_key_path(changes: dict[str, Any], expected: str) -> None:
    found = problems(block(**changes))
    assert any(p.startswith(expected) for p in found), found


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        pytest.param({"text": "a", "colour": 1}, "stream.rules[1].colour: unknown key 'colour'",
                     id="unknown-rule-key"),
        pytest.param({"text": "a..b"}, "stream.rules[1].text: 'a..b'", id="bad-text-path"),
        pytest.param({"when": {"a[": "x"}, "text": "t"}, "stream.rules[1].when.a[: 'a[': the "
                     "`[` at column 2 is not closed", id="bad-when-path"),
        pytest.param({"when": {"type": {"a": 1}}, "text": "t"}, "stream.rules[1].when.type: "
                     "compare with a string, number, boolean or null", id="when-mapping"),
        pytest.param({"when": {"type": []}, "text": "t"}, "stream.rules[1].when.type: an empty "
                     "list matches nothing", id="when-empty-list"),
        pytest.param({"when": {"type": [1, float("nan")]}, "text": "t"},
                     "stream.rules[1].when.type: NaN equals nothing", id="when-nan"),
        pytest.param({"has": ["ok", "b..c"], "text": "t"}, "stream.rules[1].has[1]: 'b..c'",
                     id="bad-has"),
        pytest.param({"cumulative": True, "recap": True, "text": "t"},
                     "stream.rules[1].recap: `cumulative` and `recap` exclude each other",
                     id="cumulative-and-recap"),
        pytest.param({"recap": True}, "stream.rules[1].recap: `recap` qualifies `text`",
                     id="recap-without-text"),
        pytest.param({"usage_sum": True, "text": "t"}, "stream.rules[1].usage_sum: `usage_sum` "
                     "qualifies `usage`", id="usage-sum-without-usage"),
        pytest.param({"usage": {"prompt": "a"}}, "stream.rules[1].usage.prompt: unknown key "
                     "'prompt'; did you mean 'prompt_tokens'?", id="usage-key-typo"),
        pytest.param({"error": "message", "text": "t"}, "stream.rules[1].error: an `error` rule "
                     "ends the stream with that error; move `text` to a rule of its own",
                     id="error-with-text"),
        pytest.param({"error": None}, "stream.rules[1].error: give the path of the error's "
                     "message", id="error-null"),
        pytest.param({"capture": {"1task": "task_id"}, "text": "t"},
                     "stream.rules[1].capture.1task: a capture name is letters",
                     id="bad-capture-name"),
        pytest.param({"end": "yes"}, "stream.rules[1].end: expected true or false",
                     id="end-not-bool"),
        pytest.param("text", "stream.rules[1]: expected a mapping, got a string",
                     id="rule-not-mapping"),
    ],
)
def test_a_rule_problem_names_the_rule_by_index(rule: Any, expected: str) -> None:
    raw = block()
    raw["stream"]["rules"].insert(1, rule)
    found = problems(raw)
    assert any(p.startswith(expected) for p in found), found


def test_every_problem_is_reported_not_only_the_first() -> None:
    raw = block(mode="bogus", sync={"text": "a..b"})
    raw["stream"]["rules"].append({"text": "x", "nope": 1})
    found = problems(raw)
    assert len(found) >= 3
    assert [p.split(":")[0] for p in found] == ["mode", "sync.text", "stream.rules[2].nope"]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        pytest.param({"sync": None}, "missing required key 'sync' (`mode: client` calls the "
                     "upstream without streaming when the client does not stream; or set "
                     "`mode: stream`)", id="client-without-sync"),
        pytest.param({"stream": None}, "missing required key 'stream' (`mode: client` streams "
                     "from the upstream when the client streams; or set `mode: sync`)",
                     id="client-without-stream"),
        pytest.param({"stream": None, "mode": "stream"}, "missing required key 'stream' "
                     "(`mode: stream` always streams from the upstream)",
                     id="stream-without-stream"),
        pytest.param({"sync": None, "mode": "sync"}, "missing required key 'sync' (`mode: sync` "
                     "always calls the upstream without streaming)", id="sync-without-sync"),
    ],
)
def test_the_mode_needs_its_mappings(changes: dict[str, Any], expected: str) -> None:
    raw = block()
    for key, value in changes.items():
        if value is None:
            del raw[key]
        else:
            raw[key] = value
    assert any(p.startswith(expected) for p in problems(raw))


def test_a_missing_request_is_a_problem() -> None:
    raw = block()
    del raw["request"]
    assert "missing required key 'request' (the path and body of the chat call)" in problems(raw)


def test_stateless_without_a_path_of_its_own_cannot_use_the_session_id_in_the_path() -> None:
    raw = block("""
mode: stream
request: {path: "/threads/{{ session.id }}/runs", body: {m: "{{ messages }}"}}
session: {without_hint: stateless}
stream: {framing: sse, rules: [{text: t, when: {$event: x}}, {when: {$event: e}, error: m}]}
""")
    assert any("give `session.stateless` a `path`" in p for p in problems(raw))


# --- warnings -------------------------------------------------------------------------------------


def warnings(raw: dict[str, Any]) -> list[str]:
    return [str(w) for w in compile_custom(raw).warnings]


def test_no_end_and_no_error_rule_warns_that_truncation_is_invisible() -> None:
    raw = block()
    raw["stream"]["rules"].pop()
    assert warnings(raw) == ["stream.rules: no rule has `end` or `error`: a truncated or failed "
                             "stream will look like a complete answer"]


def test_a_request_without_session_or_history_warns_about_memory() -> None:
    raw = block()
    raw["request"]["body"] = {"q": "{{ input }}"}
    assert any(w.startswith("request: the request sends no session placeholder")
               for w in warnings(raw))


def test_a_stateless_request_without_history_warns() -> None:
    raw = block()
    raw["session"] = {"without_hint": "stateless", "stateless": {"body": {"q": "{{ input }}"}}}
    raw["request"]["body"] = {"q": "{{ input }}", "s": "{{ session.id }}"}
    assert any(w.startswith("session.without_hint: `without_hint: stateless`, but")
               for w in warnings(raw))


def test_carry_marker_is_refused_until_the_adapter_carries_markers() -> None:
    with pytest.raises(CustomSpecError) as caught:
        compile_custom(block(session={"carry": "marker"}))
    assert [str(p) for p in caught.value.problems] == [
        "session.carry: `carry: marker` is not supported yet; use `lookup` (the server finds "
        "the session by its owner) or `from_response` (remembered per worker for `cache` "
        "seconds)"
    ]


# --- text framing ---------------------------------------------------------------------------------


def test_text_framing_needs_no_rules() -> None:
    raw = block(mode="stream", stream={"framing": "text"})
    del raw["sync"]
    spec = compile_custom(raw)
    assert spec.stream is not None and spec.stream.rules[0].text is not None
