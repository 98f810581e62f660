"""`namespace` tools (function tools grouped under a name, as Codex CLI sends its sub-agent
tools): offered to a chat model as `<namespace>__<name>`, a call of that name answered as the
function's own name with its `namespace`, and sent back in `input` the same way. Codex CLI's
own first request (tests/fixtures/codex/, captured from a real run) is served as it is.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.errors import InvalidRequest
from proxy.ingress.responses_request import parse_responses_request
from tests.conftest import ProxyFactory
from tests.fake_openai import FakeOpenAI
from tests.responses_client import WEATHER, post_raw
from tests.test_e2e_responses import routes_for
from tests.test_responses_strict import scripted_proxy, stream_and_sync

CODEX = orjson.loads((Path(__file__).parent / "fixtures" / "codex" / "first-request.json")
                     .read_bytes())
CRM = {"type": "namespace", "name": "crm", "description": "The customer records.", "tools": [
    {"type": "function", "name": "lookup", "description": "Find a customer.",
     "parameters": {"type": "object", "properties": {"id": {"type": "integer"}}}},
]}


def parsed(body: dict[str, Any]) -> Any:
    return parse_responses_request(orjson.dumps({"model": "m", "input": "hi", **body}))


def test_a_namespaced_function_is_offered_under_its_qualified_name_and_echoed_as_sent() -> None:
    request = parsed({"tools": [WEATHER, CRM]})
    offered = [t["function"] for t in request.chat["tools"]]
    assert [f["name"] for f in offered] == ["get_weather", "crm__lookup"]
    assert offered[1]["description"] == "The customer records.\n\nFind a customer."
    assert offered[1]["parameters"] == CRM["tools"][0]["parameters"]  # type: ignore[index]
    [_, echoed] = request.echo["tools"]
    assert echoed["type"] == "namespace" and echoed["name"] == "crm"
    assert [t["name"] for t in echoed["tools"]] == ["lookup"]


@pytest.mark.parametrize(("tool", "param"), [
    ({**CRM, "description": None}, "tools[0].description"),
    ({**CRM, "name": "a__b"}, "tools[0].name"),
    ({**CRM, "tools": []}, "tools[0].tools"),
    ({**CRM, "tools": [{"type": "custom", "name": "patch"}]}, "tools[0].tools[0].type"),
    ({**CRM, "tools": [{"type": "function", "name": ""}]}, "tools[0].tools[0].name"),
])
def test_a_namespace_tool_that_is_not_well_formed_is_a_400_naming_the_field(
    tool: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequest) as refused:
        parsed({"tools": [tool]})
    assert refused.value.param == param


def test_a_namespaced_function_whose_qualified_name_is_taken_is_a_400() -> None:
    taken = {"type": "function", "name": "crm__lookup"}
    with pytest.raises(InvalidRequest) as refused:
        parsed({"tools": [taken, CRM]})
    assert refused.value.param == "tools[1].tools[0].name"


def test_a_hosted_web_search_tells_codex_users_how_to_leave_it_out() -> None:
    with pytest.raises(InvalidRequest) as refused:
        parsed({"tools": [{"type": "web_search", "external_web_access": False}]})
    assert refused.value.param == "tools[0].type"
    assert 'web_search = "disabled"' in refused.value.message


async def test_a_namespaced_call_is_the_functions_name_with_its_namespace_streamed_and_sync(
    make_proxy: ProxyFactory,
) -> None:
    async with scripted_proxy(make_proxy, "namespaced-call") as proxy:
        final = await stream_and_sync(proxy, {"model": "m", "input": "hi", "tools": [CRM]})
        status, _, raw = await post_raw(proxy, {"model": "m", "input": "hi", "tools": [CRM]})
    [call] = final["output"]
    assert (call["type"], call["name"], call["namespace"]) == ("function_call", "lookup", "crm")
    assert call["arguments"] == '{"id":7}'
    assert status == 200
    [sync_call] = orjson.loads(raw)["output"]
    assert (sync_call["name"], sync_call["namespace"]) == ("lookup", "crm")


async def test_a_call_of_an_unknown_qualified_name_keeps_it_whole(
    make_proxy: ProxyFactory,
) -> None:
    # Without the namespace among the tools the name is no namespaced function's.
    async with scripted_proxy(make_proxy, "namespaced-call") as proxy:
        final = await stream_and_sync(proxy, {"model": "m", "input": "hi", "tools": [WEATHER]})
    [call] = final["output"]
    assert call["name"] == "crm__lookup" and "namespace" not in call


async def test_a_namespaced_call_sent_back_reaches_the_model_under_its_qualified_name(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    proxy = await make_proxy(routes_for(fake_openai))
    status, _, raw = await post_raw(proxy, {"model": "mistral", "tools": [CRM], "input": [
        {"role": "user", "content": "who is 7?"},
        {"type": "function_call", "call_id": "call_1", "name": "lookup", "namespace": "crm",
         "arguments": '{"id":7}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "Ada"},
    ]})
    assert status == 200, raw
    sent = fake_openai.received[-1].body
    assert sent is not None
    assert sent["messages"][1]["tool_calls"][0]["function"]["name"] == "crm__lookup"
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": "call_1", "content": "Ada"}


async def test_codex_clis_first_request_is_served_with_its_tools_offered(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    proxy = await make_proxy(routes_for(fake_openai))
    body = copy.deepcopy(CODEX)
    body["model"] = "mistral"
    status, _, raw = await post_raw(proxy, body)
    assert status == 200, raw
    assert b"response.completed" in raw
    sent = fake_openai.received[-1].body
    assert sent is not None
    names = [t["function"]["name"] for t in sent["tools"]]
    assert "exec_command" in names and "multi_agent_v1__spawn_agent" in names
    # Its developer messages became one system message, its user messages the turn.
    assert [m["role"] for m in sent["messages"]] == ["system", "user", "user"]


async def test_codex_clis_request_after_a_tool_call_sends_the_call_and_its_output_back(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    second = orjson.loads((Path(__file__).parent / "fixtures" / "codex" / "second-request.json")
                          .read_bytes())
    proxy = await make_proxy(routes_for(fake_openai))
    status, _, raw = await post_raw(proxy, {**second, "model": "mistral"})
    assert status == 200, raw
    sent = fake_openai.received[-1].body
    assert sent is not None
    *_, called, answered = sent["messages"]
    assert called["role"] == "assistant"
    assert [(c["id"], c["function"]["name"]) for c in called["tool_calls"]] == [
        ("call_1", "exec_command")]
    assert answered["role"] == "tool" and answered["tool_call_id"] == "call_1"
    assert answered["content"].endswith("hello-from-codex\n")
