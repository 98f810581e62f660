"""Turn placeholders (input, history, messages, system, transcript), derived session ids, and
the placeholder values of a whole request."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import yaml

from proxy.errors import InvalidRequest
from proxy.session_keys import (
    caller_id,
    session_key,
    session_keys,
    session_uuid,
)
from proxy.upstreams.custom_spec import compile_custom
from proxy.upstreams.custom_turn import TURN_PLACEHOLDERS, MessageFormat, turn_values
from proxy.upstreams.custom_values import request_values, session_id, with_captured

CHAT: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!", "tool_calls": [{"id": "c1"}]},
    {"role": "tool", "tool_call_id": "c1", "content": "tool output"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "c2"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "Done."}]},
    {"role": "developer", "content": "Answer in French."},
    {"role": "user", "content": [{"type": "text", "text": "Part one"},
                                 {"type": "image_url", "image_url": {"url": "http://x/i.png"}},
                                 {"type": "text", "text": "part two"}]},
    {"role": "user", "content": "And more"},
]


def values(messages: list[dict[str, Any]] = CHAT, **options: Any) -> dict[str, Any]:
    return turn_values(messages, TURN_PLACEHOLDERS, **options)


def test_input_is_the_user_text_after_the_last_assistant_message_joined_by_blank_lines() -> None:
    assert values()["input"] == "Part one\n\npart two\n\nAnd more"


def test_prepend_puts_the_new_turns_system_text_before_the_input() -> None:
    assert values(client_system="prepend")["input"] == (
        "Answer in French.\n\nPart one\n\npart two\n\nAnd more"
    )


def test_history_and_new_messages_split_at_the_new_turn_without_tool_messages() -> None:
    v = values()
    assert v["history"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "assistant", "content": "Done."},
    ]
    assert v["new_messages"] == [
        {"role": "user", "content": "Part one\n\npart two"},
        {"role": "user", "content": "And more"},
    ]
    assert v["messages"] == v["history"] + v["new_messages"]


def test_drop_leaves_the_client_system_prompt_out_everywhere() -> None:
    v = values(client_system="drop")
    assert v["system"] is None
    assert all(m["role"] != "system" for m in v["messages"])
    assert "Be brief" not in v["transcript"]


def test_keep_sends_system_and_developer_text_where_the_template_asks() -> None:
    v = values(client_system="keep")
    assert v["system"] == "Be brief.\n\nAnswer in French."
    assert v["messages"][0] == {"role": "system", "content": "Be brief."}
    assert {"role": "system", "content": "Answer in French."} in v["new_messages"]
    assert v["input"] == "Part one\n\npart two\n\nAnd more"


def test_message_format_renames_keys_and_roles_and_null_drops_a_role() -> None:
    fmt = MessageFormat("type", "text", {"system": None, "user": "userMessage",
                                         "assistant": "apiMessage"})
    v = values(client_system="keep", message_format=fmt)
    assert v["history"] == [
        {"type": "userMessage", "text": "Hi"},
        {"type": "apiMessage", "text": "Hello!"},
        {"type": "apiMessage", "text": "Done."},
    ]


def test_transcript_is_plain_text_lines_by_role() -> None:
    assert values(client_system="keep")["transcript"] == (
        "System: Be brief.\nUser: Hi\nAssistant: Hello!\nAssistant: Done.\n"
        "System: Answer in French.\nUser: Part one\n\npart two\nUser: And more"
    )


def test_only_the_needed_placeholders_are_computed() -> None:
    assert set(turn_values(CHAT, {"input", "model"})) == {"input"}


def test_a_first_turn_has_no_history() -> None:
    v = values([{"role": "user", "content": "Only"}])
    assert v["history"] == [] and v["input"] == "Only"


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        pytest.param([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                     "no new user message", id="ends-with-assistant"),
        pytest.param([{"role": "system", "content": "s"}], "no new user message",
                     id="only-system"),
        pytest.param([{"role": "user", "content": [{"type": "image_url",
                                                   "image_url": {"url": "http://x"}}]}],
                     "no text", id="image-only"),
    ],
)
def test_a_chat_without_a_new_user_text_is_a_400(
    messages: list[dict[str, Any]], fragment: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        turn_values(messages, {"input"})
    assert fragment in caught.value.message
    assert caught.value.param == "messages"


# --- session ids ---------------------------------------------------------------------------------


def test_session_key_is_deterministic_and_namespaced_by_api_key() -> None:
    key = session_key("keyid-a", "session:chat-1")
    assert key == session_key("keyid-a", "session:chat-1")
    assert key != session_key("keyid-b", "session:chat-1")
    assert key != session_key("keyid-a", "session:chat-2")
    assert key.startswith("ap-") and len(key) == 35
    int(key[3:], 16)


def test_session_key_hashes_the_whole_hint() -> None:
    base = "session:" + "x" * 5000
    assert session_key("k", base + "a") != session_key("k", base + "b")


def test_session_key_accepts_hints_that_were_not_utf8() -> None:
    assert session_key("k", "session:\udcff").startswith("ap-")


def test_session_uuid_is_a_stable_version_4_uuid() -> None:
    key = session_key("k", "session:1")
    value = session_uuid(key)
    parsed = uuid.UUID(value)
    assert parsed.version == 4 and str(parsed) == value
    assert value == session_uuid(key)
    assert value != session_uuid(session_key("k", "session:2"))


def test_without_a_hint_new_gives_a_fresh_key_each_request() -> None:
    first, second = session_keys("k", None, "new"), session_keys("k", None, "new")
    assert first.key != second.key and not first.stateless


def test_without_a_hint_per_key_gives_one_key_per_api_key() -> None:
    assert session_keys("k", None, "per_key") == session_keys("k", None, "per_key")
    assert session_keys("k", None, "per_key").key != session_keys("j", None, "per_key").key
    assert session_keys("k", None, "per_key").key != session_key("k", "")


def test_without_a_hint_stateless_marks_the_request_stateless() -> None:
    assert session_keys("k", None, "stateless").stateless
    assert not session_keys("k", "session:1", "stateless").stateless


def test_caller_id_is_stable_per_key_and_unlike_any_session_key() -> None:
    assert caller_id("k") == caller_id("k") != caller_id("j")
    assert caller_id("k") != session_keys("k", None, "per_key").key


# --- a request's values -----------------------------------------------------------------------

VALUES_SPEC = """
mode: sync
request:
  path: "/a/{{ model }}"
  body: {q: "{{ input }}", who: "{{ caller }}", u: "{{ user? }}", id: "{{ session.id? }}"}
sync: {text: answer}
session: {id: "thread-{{ session.uuid }}"}
cancel: {path: "/stop/{{ captured.run }}"}
stream: {framing: sse, rules: [{text: t, capture: {run: run_id}}]}
"""


def test_request_values_fill_what_the_templates_use() -> None:
    spec = compile_custom(yaml.safe_load(VALUES_SPEC))
    keys = session_keys("key-id", "session:1", "new")
    values = request_values(spec, CHAT, session=keys, key_id="key-id", model="m1", stream=False,
                            request_id="r1", user="alice")
    assert values["input"] == "Part one\n\npart two\n\nAnd more"
    assert values["caller"] == caller_id("key-id")
    assert values["user"] == "alice" and values["session.id"] is None
    assert "transcript" not in values  # not used by any template
    values["session.id"] = session_id(spec, values, keys, stream=False)
    assert values["session.id"] == "thread-" + keys.uuid
    body = spec.call(stream=False).render_body(values)
    assert body == {"q": values["input"], "who": values["caller"], "u": "alice",
                    "id": "thread-" + keys.uuid}
    assert spec.cancel is not None
    assert spec.cancel.target(with_captured(values, {"run": "r/9"})) == "/stop/r%2F9"


def test_a_stateless_request_has_no_session_id_and_a_non_string_user_is_null() -> None:
    spec = compile_custom(yaml.safe_load(VALUES_SPEC))
    keys = session_keys("key-id", None, "stateless")
    values = request_values(spec, CHAT, session=keys, key_id="key-id", model="m1", stream=True,
                            request_id="r1", user={"id": 1})
    assert session_id(spec, values, keys, stream=False) is None
    assert values["user"] is None
