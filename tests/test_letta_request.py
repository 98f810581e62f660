"""Building Letta requests from OpenAI chat requests, and finding a session's conversation."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.errors import InvalidRequest
from proxy.upstreams.letta_request import (
    letta_body,
    new_turn_start,
    pick_conversation,
    refuse_unserved,
    session_summary,
    to_letta_messages,
)
from tests.fake_letta import load_json

SYSTEM = {"role": "system", "content": "You are terse."}


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def bot(content: str) -> dict[str, Any]:
    return {"role": "assistant", "content": content}


# -- new_turn -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([user("hi")], [user("hi")]),
        ([SYSTEM, user("hi")], [SYSTEM, user("hi")]),
        ([SYSTEM, user("hi"), bot("hello"), user("how are you?")], [user("how are you?")]),
        (
            [user("a"), bot("b"), user("c"), bot("d"), user("e"), user("f")],
            [user("e"), user("f")],
        ),
        ([user("hi"), bot("hello")], []),
        ([], []),
    ],
    ids=[
        "first-turn",
        "first-turn-with-system",
        "resent-history",
        "two-new-users",
        "ends-with-assistant",
        "empty",
    ],
)
def test_new_turn_is_what_follows_the_last_assistant_message(
    messages: list[dict[str, Any]], expected: list[dict[str, Any]]
) -> None:
    assert messages[new_turn_start(messages) :] == expected


# -- to_letta_messages --------------------------------------------------------------------------


def test_plain_user_text() -> None:
    assert to_letta_messages([user("hello")]) == [{"role": "user", "content": "hello"}]


def test_every_new_user_message_is_sent() -> None:
    assert to_letta_messages([user("one"), user("two")]) == [
        {"role": "user", "content": "one"},
        {"role": "user", "content": "two"},
    ]


def test_user_name_is_kept() -> None:
    assert to_letta_messages([{"role": "user", "content": "hi", "name": "alice"}]) == [
        {"role": "user", "content": "hi", "name": "alice"}
    ]


def test_text_and_image_parts() -> None:
    content = [
        {"type": "text", "text": "What is in these?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "low"}},
        {
            "type": "image_url",
            "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ", "detail": "high"},
        },
        {"type": "image_url", "image_url": "http://example.com/dog.gif"},
    ]
    assert to_letta_messages([user(content)]) == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in these?"},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}},
                {
                    "type": "image",
                    "source": {
                        "type": "base64",
                        "media_type": "image/jpeg",
                        "data": "/9j/4AAQ",
                        "detail": "high",
                    },
                },
                {"type": "image", "source": {"type": "url", "url": "http://example.com/dog.gif"}},
            ],
        }
    ]


@pytest.mark.parametrize(
    ("part", "param"),
    [
        (
            {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
            "messages[3].content[1].type",
        ),
        ({"type": "file", "file": {"file_id": "f"}}, "messages[3].content[1].type"),
        (
            {"type": "image_url", "image_url": {"url": "ftp://x/y.png"}},
            "messages[3].content[1].image_url.url",
        ),
        (
            {"type": "image_url", "image_url": {"url": "data:image/png,notbase64"}},
            "messages[3].content[1].image_url.url",
        ),
        (
            {"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}},
            "messages[3].content[1].image_url.url",
        ),
        ({"type": "image_url", "image_url": {}}, "messages[3].content[1].image_url.url"),
        ({"type": "text"}, "messages[3].content[1].text"),
        ("just a string", "messages[3].content[1]"),
    ],
    ids=[
        "audio",
        "file",
        "ftp-image",
        "data-url-not-base64",
        "data-url-not-image",
        "no-url",
        "text-without-text",
        "not-an-object",
    ],
)
def test_unsupported_parts_are_rejected_with_the_clients_index(part: Any, param: str) -> None:
    messages = [user("a"), bot("b"), user("c"), user([{"type": "text", "text": "x"}, part])]
    start = new_turn_start(messages)
    with pytest.raises(InvalidRequest) as info:
        to_letta_messages(messages[start:], index_base=start)
    assert info.value.param == param
    assert info.value.status == 400


def test_system_and_developer_messages_are_dropped_by_default() -> None:
    messages = [SYSTEM, {"role": "developer", "content": "Be nice."}, user("hi")]
    assert to_letta_messages(messages) == [{"role": "user", "content": "hi"}]


def test_system_messages_are_prepended_to_the_first_user_text() -> None:
    messages = [
        SYSTEM,
        {"role": "developer", "content": [{"type": "text", "text": "Be nice."}]},
        user("hi"),
        user("again"),
    ]
    assert to_letta_messages(messages, client_system="prepend") == [
        {"role": "user", "content": "You are terse.\n\nBe nice.\n\nhi"},
        {"role": "user", "content": "again"},
    ]


def test_system_prepended_to_the_first_text_part() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    out = to_letta_messages(
        [SYSTEM, user([image, {"type": "text", "text": "what?"}])], client_system="prepend"
    )
    assert out[0]["content"][1] == {"type": "text", "text": "You are terse.\n\nwhat?"}


def test_system_prepended_as_a_text_part_when_there_is_only_an_image() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    out = to_letta_messages([SYSTEM, user([image])], client_system="prepend")
    assert out[0]["content"][0] == {"type": "text", "text": "You are terse."}


def test_tool_messages_are_dropped() -> None:
    messages = [
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
        user("and then?"),
    ]
    assert to_letta_messages(messages) == [{"role": "user", "content": "and then?"}]


def test_to_letta_messages_does_not_change_its_input() -> None:
    messages = [SYSTEM, user([{"type": "text", "text": "hi"}])]
    before = repr(messages)
    to_letta_messages(messages, client_system="prepend")
    assert repr(messages) == before


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [SYSTEM],
        [{"role": "tool", "tool_call_id": "c1", "content": "42"}],
        [user("hi"), bot("hello")],
    ],
    ids=["empty", "only-system", "only-tool", "last-is-assistant"],
)
def test_nothing_new_to_send_is_a_400(messages: list[dict[str, Any]]) -> None:
    start = new_turn_start(messages)
    with pytest.raises(InvalidRequest) as info:
        to_letta_messages(messages[start:], client_system="prepend", index_base=start)
    assert info.value.param == "messages"


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ({"role": "user"}, "messages[0].content"),
        ({"role": "user", "content": None}, "messages[0].content"),
        ({"role": "wizard", "content": "x"}, "messages[0].role"),
    ],
    ids=["no-content", "null-content", "unknown-role"],
)
def test_malformed_messages_are_a_400_naming_the_field(message: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        to_letta_messages([message])
    assert info.value.param == param


# -- letta_body ---------------------------------------------------------------------------------


def test_stream_body_asks_for_tokens_and_pings() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    assert letta_body(msgs) == {
        "messages": msgs,
        "streaming": True,
        "stream_tokens": True,
        "include_pings": True,
    }


def test_sync_body_says_streaming_false() -> None:
    # The conversations route streams by default.
    msgs = [{"role": "user", "content": "hi"}]
    assert letta_body(msgs, stream=False) == {"messages": msgs, "streaming": False}


# -- sessions -----------------------------------------------------------------------------------


def test_session_summary_is_stable_and_opaque() -> None:
    token = session_summary("keyhash-1", "chat-42")
    assert token == session_summary("keyhash-1", "chat-42")
    assert token.startswith("agentproxy-session:")
    assert len(token) == len("agentproxy-session:") + 32
    assert "keyhash-1" not in token
    assert "chat-42" not in token


def test_session_summary_is_namespaced_by_key() -> None:
    assert session_summary("keyhash-1", "chat-42") != session_summary("keyhash-2", "chat-42")
    assert session_summary("keyhash-1", "chat-42") != session_summary("keyhash-1", "chat-43")


def test_session_summary_does_not_confuse_key_and_hint_boundaries() -> None:
    assert session_summary("ab", "c") != session_summary("a", "bc")


def conv(conv_id: str, summary: str | None, created_at: str | None) -> dict[str, Any]:
    return {"id": conv_id, "summary": summary, "created_at": created_at}


def test_pick_conversation_takes_the_oldest_exact_match() -> None:
    token = session_summary("k", "h")
    listing = [
        conv("conv-new", token, "2026-11-22T02:15:47.100000Z"),
        conv("conv-longer", token + "x", "2026-11-22T02:15:40Z"),
        conv("conv-old", token, "2026-11-22T02:15:46.608858Z"),
        conv("conv-other", "something else", "2026-11-22T02:15:00Z"),
    ]
    assert pick_conversation(listing, token) == "conv-old"


def test_pick_conversation_compares_times_not_strings() -> None:
    token = "agentproxy-session:t"
    listing = [
        conv("conv-later", token, "2026-11-22T02:15:46.600000Z"),
        conv("conv-earlier", token, "2026-11-22T02:15:46Z"),
    ]
    assert pick_conversation(listing, token) == "conv-earlier"


def test_pick_conversation_without_match_or_dates() -> None:
    token = "agentproxy-session:t"
    assert pick_conversation([], token) is None
    assert pick_conversation([conv("conv-x", "other", None)], token) is None
    assert (
        pick_conversation([conv("conv-b", token, None), conv("conv-a", token, "bad")], token)
        == "conv-a"
    )
    assert pick_conversation([{"summary": token}], token) is None


def test_pick_conversation_reads_lettas_listing() -> None:
    listing = load_json("conversation_list_by_summary.json")
    assert (
        pick_conversation(listing, "openai-user:alice")
        == "conv-95936ab4-348b-4a75-a4d8-29889f1a0a8f"
    )
    assert pick_conversation(listing, "openai-user:ali") is None


@pytest.mark.parametrize("fields", [
    {"n": 1, "logprobs": False, "top_logprobs": 0, "response_format": {"type": "text"},
     "tool_choice": "none", "function_call": "auto", "modalities": ["text"], "audio": None},
    {"tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}}},
    {"n": None, "web_search_options": None, "moderation": None},
])
def test_parameter_values_that_ask_for_one_text_choice_pass(fields: dict[str, Any]) -> None:
    refuse_unserved(fields)


@pytest.mark.parametrize(("fields", "param"), [
    ({"n": True}, "n"),
    ({"n": "2"}, "n"),
    ({"response_format": "json"}, "response_format"),
    ({"tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "required"}}},
     "tool_choice"),
    ({"tool_choice": [None]}, "tool_choice"),
    ({"modalities": "audio"}, "modalities"),
])
def test_odd_values_of_a_parameter_agents_cannot_honour_are_refused_by_name(
    fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        refuse_unserved(fields)
    assert caught.value.param == param
