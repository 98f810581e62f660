"""Request templates of the custom kind: typed substitution, `?`, URL-encoding, compile errors."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

import pytest

from proxy.errors import UpstreamFailed
from proxy.upstreams.custom_spec import RequestSpec
from proxy.upstreams.custom_template import (
    TemplateError,
    compile_body,
    compile_path_template,
    compile_query,
    deep_merge,
)

VALUES: dict[str, Any] = {
    "input": "hello",
    "messages": [{"role": "user", "content": "hello"}],
    "history": [],
    "model": "flow-1",
    "session.id": None,
    "session.key": "ap-0123456789abcdef0123456789abcdef",
    "stream": True,
    "user": None,
    "system": "",
    "request_id": "req-1",
}


def render(template: Any, values: dict[str, Any] = VALUES) -> Any:
    return compile_body(template).render(values)


# --- typed substitution ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        pytest.param("{{ messages }}", [{"role": "user", "content": "hello"}], id="list"),
        pytest.param("{{ stream }}", True, id="bool"),
        pytest.param("{{ user }}", None, id="null"),
        pytest.param("{{input}}", "hello", id="no-spaces"),
        pytest.param("{{   input   }}", "hello", id="many-spaces"),
    ],
)
def test_a_string_that_is_one_placeholder_keeps_the_values_json_type(
    template: str, expected: Any
) -> None:
    assert render({"x": template}) == {"x": expected}


def test_other_strings_interpolate_stringified_values() -> None:
    body = {
        "text": "Q: {{ input }} (streaming: {{ stream }}, user: {{ user }})",
        "list": "{{ history }} / {{ messages }}",
    }
    assert render(body) == {
        "text": "Q: hello (streaming: true, user: )",
        "list": '[] / [{"role":"user","content":"hello"}]',
    }


def test_static_parts_and_nesting_are_kept() -> None:
    body = {"inputs": {}, "n": 1, "f": 0.5, "flag": False, "nested": {"a": ["{{ model }}", 2]}}
    assert render(body) == {"inputs": {}, "n": 1, "f": 0.5, "flag": False,
                            "nested": {"a": ["flow-1", 2]}}


def test_rendering_twice_gives_independent_containers_where_placeholders_sit() -> None:
    template = compile_body({"a": ["{{ input }}"]})
    first = template.render(VALUES)
    first["a"].append("mutated")
    assert template.render(VALUES) == {"a": ["hello"]}


# --- `?` ----------------------------------------------------------------------------------------


def test_optional_placeholder_removes_its_key_when_null() -> None:
    body = {"query": "{{ input }}", "conversation_id": "{{ session.id? }}"}
    assert render(body) == {"query": "hello"}
    assert render(body, {**VALUES, "session.id": "c-1"}) == {"query": "hello",
                                                             "conversation_id": "c-1"}


def test_optional_placeholder_removes_its_key_when_empty_string() -> None:
    assert render({"system": "{{ system? }}", "q": 1}) == {"q": 1}


def test_optional_placeholder_keeps_falsy_values_that_are_not_null_or_empty() -> None:
    values = {**VALUES, "stream": False, "history": []}
    assert render({"s": "{{ stream? }}", "h": "{{ history? }}"}, values) == {"s": False, "h": []}


def test_optional_placeholder_removes_a_list_item() -> None:
    assert render(["{{ system? }}", "{{ input }}", "{{ user? }}"]) == ["hello"]


def test_optional_placeholder_inside_a_longer_string_removes_the_whole_key() -> None:
    body = {"thread": "thread-{{ session.id? }}", "q": "{{ input }}"}
    assert render(body) == {"q": "hello"}
    assert render(body, {**VALUES, "session.id": "7"}) == {"thread": "thread-7", "q": "hello"}


def test_optional_placeholder_without_an_enclosing_key_is_a_compile_error() -> None:
    with pytest.raises(TemplateError, match="enclosing key or list item"):
        compile_body("{{ session.id? }}")


# --- paths and queries ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("../../admin", id="dot-dot-slash"),
        pytest.param("x?y=1#frag", id="query-and-fragment"),
        pytest.param("a/b", id="slash"),
        pytest.param("%2e%2e", id="pre-encoded-dots"),
        pytest.param("space and ünïcode", id="space-and-unicode"),
    ],
)
def test_a_path_value_is_one_encoded_segment_that_cannot_change_the_path(value: str) -> None:
    path = compile_path_template("/threads/{{ session.id }}/runs").render(
        {**VALUES, "session.id": value}
    )
    prefix, segment, suffix = path.split("/")[1], path.split("/")[2], path.split("/")[3:]
    assert prefix == "threads" and suffix == ["runs"]
    assert not set(segment) & set("/?#") and " " not in segment
    assert unquote(segment) == value


@pytest.mark.parametrize("value", ["", ".", "..", None])
def test_a_path_value_that_is_empty_or_a_dot_segment_is_refused(value: Any) -> None:
    template = compile_path_template("/threads/{{ session.id }}/runs")
    with pytest.raises(UpstreamFailed, match=r"session\.id"):
        template.render({**VALUES, "session.id": value})


def test_path_literals_are_kept_as_written() -> None:
    template = compile_path_template("/prediction/{{ model }}")
    assert template.render(VALUES) == "/prediction/flow-1"
    assert compile_path_template("").render(VALUES) == ""


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        pytest.param("chat", "starts with `/`", id="relative"),
        pytest.param("/a/{{ session.id? }}", "cannot drop a part of a path", id="optional"),
        pytest.param("/a/../b", "`..` segments", id="literal-dot-dot"),
        pytest.param("/a#x", "fragment", id="fragment"),
        pytest.param("/a b", "spaces", id="space"),
        pytest.param("/a/{{ modle }}", "did you mean `{{ model }}`", id="unknown"),
    ],
)
def test_bad_path_templates_are_compile_errors(text: str, fragment: str) -> None:
    with pytest.raises(TemplateError) as caught:
        compile_path_template(text)
    assert fragment in caught.value.message


def test_query_values_are_encoded_whole_and_optional_ones_dropped() -> None:
    query = compile_query(
        {"user": "{{ session.key }}", "limit": 1, "q": "a&b=c #{{ input }}",
         "c": "{{ session.id? }}", "stream": True}
    )
    assert query.render(VALUES) == (
        "user=ap-0123456789abcdef0123456789abcdef&limit=1&q=a%26b%3Dc%20%23hello&stream=true"
    )


def test_a_query_value_cannot_be_a_container() -> None:
    with pytest.raises(TemplateError, match="not a mapping"):
        compile_query({"filter": {"a": 1}})


def test_target_joins_path_and_query() -> None:
    spec = RequestSpec("GET", compile_path_template("/conversations"),
                       compile_query({"user": "{{ session.key }}", "limit": "1"}), None,
                       frozenset())
    assert spec.target(VALUES) == (
        "/conversations?user=ap-0123456789abcdef0123456789abcdef&limit=1"
    )
    with_query = RequestSpec("POST", compile_path_template("/run?stream=true"),
                             compile_query({"x": "{{ input }}"}), None, frozenset())
    assert with_query.target(VALUES) == "/run?stream=true&x=hello"
    empty = RequestSpec("POST", compile_path_template("/run"),
                        compile_query({"x": "{{ user? }}"}), None, frozenset())
    assert empty.target(VALUES) == "/run"


# --- compile errors ----------------------------------------------------------------------------


def test_an_unknown_placeholder_is_named_with_a_suggestion() -> None:
    with pytest.raises(TemplateError) as caught:
        compile_body({"a": {"b": ["{{ inptu }}"]}})
    assert caught.value.message == "unknown placeholder `{{ inptu }}`; did you mean `{{ input }}`?"
    assert caught.value.where == ("a", "b", 0)


def test_an_unknown_placeholder_without_a_close_match_lists_the_known_ones() -> None:
    with pytest.raises(TemplateError, match="placeholders are: caller, history, input"):
        compile_body("{{ zzz }}")


def test_captured_values_only_where_allowed() -> None:
    with pytest.raises(TemplateError, match="only in `cancel` and `session`"):
        compile_body({"id": "{{ captured.task_id }}"})
    body = compile_body({"id": "{{ captured.task_id }}"}, captured={"task_id"})
    assert body.render({"captured.task_id": "t-1"}) == {"id": "t-1"}
    with pytest.raises(TemplateError, match=r"did you mean `captured\.task_id`"):
        compile_body({"id": "{{ captured.taskid }}"}, captured={"task_id"})


def test_the_allowed_set_is_the_callers() -> None:
    with pytest.raises(TemplateError, match="unknown placeholder"):
        compile_body("{{ input }}", allowed={"model"})


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        pytest.param({"a": "{{ input"}, "not closed", id="unclosed"),
        pytest.param({"a": "{{ }}"}, "is not a placeholder", id="empty"),
        pytest.param({"a": "{{ in put }}"}, "is not a placeholder", id="space-inside"),
        pytest.param({"{{ input }}": 1}, "not in keys", id="placeholder-in-key"),
        pytest.param({"a": {1, 2}}, "not a JSON value", id="set"),
    ],
)
def test_malformed_templates_are_compile_errors(template: Any, fragment: str) -> None:
    with pytest.raises(TemplateError) as caught:
        compile_body(template)
    assert fragment in caught.value.message


def test_placeholders_used_are_reported() -> None:
    assert compile_body({"a": "{{ input }}", "b": ["x {{ model }}"]}).names == {"input", "model"}


# --- deep merge ---------------------------------------------------------------------------------


def test_overrides_merge_maps_and_replace_lists_and_scalars() -> None:
    base = {"path": "/a", "body": {"x": 1, "input": {"messages": "{{ new_messages }}",
                                                     "keep": True}, "modes": ["a", "b"]}}
    override = {"path": "/b", "body": {"input": {"messages": "{{ messages }}"}, "modes": ["c"],
                                       "y": None}}
    assert deep_merge(base, override) == {
        "path": "/b",
        "body": {"x": 1, "input": {"messages": "{{ messages }}", "keep": True}, "modes": ["c"],
                 "y": None},
    }
    assert base["body"]["input"]["messages"] == "{{ new_messages }}"  # inputs untouched
