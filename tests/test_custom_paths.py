"""The custom kind's path language: compiled once, evaluated with plain indexing, never raising."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.upstreams.custom_paths import PathError, compile_path, compile_paths

DOC: dict[str, Any] = {
    "answer": "hi",
    "metadata": {"usage": {"prompt_tokens": 3, "completion_tokens": 4}},
    "outputs": [{"outputs": [{"results": {"message": {"text": "deep"}}}]}],
    "messages": [{"content": "first"}, {"content": "second"}, {"content": "last"}],
    "responses": [{"text": "a"}, {"text": "b"}, {"image": "x"}, {"text": "c"}],
    "grid": [[{"v": 1}, {"v": 2}], [{"v": 3}], []],
    "odd key": {"a.b": {"[x]": 7}},
    "quote\"key": 5,
    "zero": 0,
    "empty": "",
    "flag": False,
    "nothing": None,
}


def get(path: str, payload: Any = DOC, event: str = "message") -> Any:
    return compile_path(path).get(payload, event)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        pytest.param("answer", "hi", id="one-key"),
        pytest.param("metadata.usage.prompt_tokens", 3, id="dotted"),
        pytest.param("outputs[0].outputs[0].results.message.text", "deep", id="langflow-sync"),
        pytest.param("messages[-1].content", "last", id="negative-index"),
        pytest.param("messages[-3].content", "first", id="negative-index-at-start"),
        pytest.param("messages[1].content", "second", id="index"),
        pytest.param('["odd key"]["a.b"]["[x]"]', 7, id="quoted-keys-with-dots-and-brackets"),
        pytest.param('["quote\\"key"]', 5, id="escaped-quote-in-key"),
        pytest.param("$.answer", "hi", id="dollar-root"),
        pytest.param(".answer", "hi", id="leading-dot"),
        pytest.param("zero", 0, id="falsy-zero-kept"),
        pytest.param("empty", "", id="falsy-empty-string-kept"),
        pytest.param("flag", False, id="falsy-false-kept"),
    ],
)
def test_a_path_finds_its_value(path: str, expected: Any) -> None:
    assert get(path) == expected


def test_dollar_is_the_whole_payload_even_a_plain_string() -> None:
    assert get("$", "a LangServe chunk") == "a LangServe chunk"
    assert get("$", DOC) is DOC


def test_dollar_event_is_the_event_name() -> None:
    assert get("$event", {"event": "x"}, "messages") == "messages"


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("missing", id="missing-key"),
        pytest.param("answer.deeper", id="key-of-a-string"),
        pytest.param("messages.content", id="key-of-a-list"),
        pytest.param("metadata[0]", id="index-of-a-dict"),
        pytest.param("answer[0]", id="index-of-a-string-is-not-a-character"),
        pytest.param("messages[3]", id="index-past-the-end"),
        pytest.param("messages[-4]", id="negative-index-past-the-start"),
        pytest.param("nothing.x", id="through-null"),
        pytest.param("zero.x", id="key-of-a-number"),
        pytest.param("metadata.usage.total_tokens", id="missing-leaf"),
        pytest.param("answer[*]", id="star-over-a-string"),
    ],
)
def test_a_path_that_finds_nothing_gives_none_and_never_raises(path: str) -> None:
    assert get(path) is None


@pytest.mark.parametrize("payload", [None, 3, "text", [], {}, True, 1.5])
def test_any_payload_shape_gives_none_for_a_deep_path(payload: Any) -> None:
    assert get("a[0].b[-1]", payload) is None


def test_star_maps_over_a_list_and_drops_elements_without_the_key() -> None:
    assert get("responses[*].text") == ["a", "b", "c"]


def test_star_at_the_top_takes_the_payload_list() -> None:
    assert get("[*].text", [{"text": "x"}, {"text": "y"}]) == ["x", "y"]
    assert get("[*]", [1, None, 2]) == [1, 2]


def test_each_star_flattens_one_level() -> None:
    assert get("grid[*][*].v") == [1, 2, 3]
    assert get("grid[*]") == [[{"v": 1}, {"v": 2}], [{"v": 3}], []]
    assert get("grid[*][0].v") == [1, 3]


def test_a_list_of_paths_takes_the_first_that_is_not_null() -> None:
    first = compile_paths(["missing", "nothing", "zero", "answer"])
    assert first(DOC, "message") == 0
    assert compile_paths(["missing", "also.missing"])(DOC, "message") is None


def test_n8n_fallback_reads_a_string_content_or_its_text_chunk() -> None:
    text = compile_paths(["content.text_chunk", "content"])
    assert text({"content": "plain"}, "message") == "plain"
    assert text({"content": {"text_chunk": "chunk"}}, "message") == "chunk"


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        pytest.param("", "must not be empty", id="empty"),
        pytest.param("a..b", "expected a name at column 3", id="double-dot"),
        pytest.param("a.", "a name must follow `.` at column 2", id="trailing-dot"),
        pytest.param("a[0", "is not closed", id="unclosed-bracket"),
        pytest.param("a[x]", "[x] at column 2 is not an index", id="bare-word-index"),
        pytest.param("a['x']", "double quotes", id="single-quoted-key"),
        pytest.param('a["x', "is not closed", id="unclosed-quote"),
        pytest.param('a["x"', "expected `]` after the quoted key", id="quote-without-bracket"),
        pytest.param('a["\\q"]', "bad escape", id="bad-escape"),
        pytest.param("a[0]b", "unexpected 'b' at column 5", id="name-after-bracket"),
        pytest.param("a]", "unexpected ']' at column 2", id="stray-bracket"),
        pytest.param("a b", "quote a key with spaces", id="space"),
        pytest.param("a[1.5]", "not an index", id="float-index"),
        pytest.param("$foo", "may start with `$`", id="unknown-root"),
        pytest.param("$event.x", "nothing can follow it", id="segments-after-event"),
        pytest.param('a"b', "quote at column 2", id="quote-inside-name"),
    ],
)
def test_bad_syntax_is_an_error_that_says_where(path: str, fragment: str) -> None:
    with pytest.raises(PathError) as caught:
        compile_path(path)
    assert fragment in str(caught.value)


def test_jmespath_prefix_is_reserved_and_refused_as_not_supported_yet() -> None:
    with pytest.raises(PathError, match="not supported yet"):
        compile_path("jmespath:messages[?role=='ai'].content")


def test_a_list_of_paths_names_the_bad_item() -> None:
    with pytest.raises(PathError, match=r"^\[1\]: .*expected a name"):
        compile_paths(["ok", "a..b"])


@pytest.mark.parametrize("value", [[], 3, None, {"a": "b"}])
def test_a_path_field_must_be_a_path_or_a_non_empty_list(value: Any) -> None:
    with pytest.raises(PathError):
        compile_paths(value)


def test_keys_reach_the_getter_as_data_never_as_code() -> None:
    # Paths become generated functions: a key full of Python must stay a key.
    key = "x'); import os; os.system('true'); ('"
    path = compile_path(f'["{key}"]')
    assert path.get({key: "safe"}, "message") == "safe"
    assert path.get({"x": 1}, "message") is None
