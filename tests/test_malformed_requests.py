"""Bad input gets an exact OpenAI-shaped error, and the proxy keeps serving."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import KEY, ProxyFactory
from tests.fake_openai import FakeOpenAI

ECHO_FIRST = """
upstreams:
  demo: {kind: echo}
  up: {kind: openai, url: "http://127.0.0.1:9/v1"}
models:
  echo: {upstream: demo}
"""

WILDCARD_FIRST = """
upstreams:
  demo: {kind: echo}
  up: {kind: openai, url: "http://127.0.0.1:9/v1"}
models:
  "local/*": {upstream: up}
  echo: {upstream: demo}
"""

MSG = [{"role": "user", "content": "hi"}]
JSON = "application/json"


def case(
    id: str, body: Any, status: int, param: str | None, *,
    ctype: str = JSON, routes: str = ECHO_FIRST, etype: str = "invalid_request_error",
) -> Any:
    raw = body if isinstance(body, bytes) else None
    return pytest.param(raw, body if raw is None else None, ctype, routes, status, etype,
                        param, id=id)


CASES = [
    case("bad-json", b'{"model": "echo", "messages": [', 400, None),
    case("not-utf8", b'{"model": "\xff"}', 400, None),
    case("array-body", [], 400, None),
    case("string-body", "hello", 400, None),
    case("missing-messages", {"model": "echo"}, 400, "messages"),
    case("messages-not-array", {"model": "echo", "messages": "hi"}, 400, "messages"),
    case("empty-messages", {"model": "echo", "messages": []}, 400, "messages"),
    case("message-not-object", {"model": "echo", "messages": ["hi"]}, 400, "messages[0]"),
    case("message-without-role", {"model": "echo", "messages": [{"content": "x"}]}, 400,
         "messages[0].role"),
    case("unknown-role", {"model": "echo", "messages": [{"role": "robot", "content": "x"}]},
         400, "messages[0].role"),
    case("content-a-number", {"model": "echo", "messages": [{"role": "user", "content": 5}]},
         400, "messages[0].content"),
    case("stream-yes", {"model": "echo", "messages": MSG, "stream": "yes"}, 400, "stream"),
    case("stream-string-true", {"model": "echo", "messages": MSG, "stream": "true"}, 400,
         "stream"),
    case("stream-options-not-object",
         {"model": "echo", "messages": MSG, "stream_options": True}, 400, "stream_options"),
    case("include-usage-not-bool",
         {"model": "echo", "messages": MSG, "stream_options": {"include_usage": 1}}, 400,
         "stream_options.include_usage"),
    case("model-not-string", {"model": 7, "messages": MSG}, 400, "model"),
    case("model-empty", {"model": "", "messages": MSG}, 400, "model"),
    case("wrong-content-type", {"model": "echo", "messages": MSG}, 415, None,
         ctype="text/plain"),
    case("missing-model-without-default", {"messages": MSG}, 400, "model",
         routes=WILDCARD_FIRST),
    case("unknown-model", {"model": "gpt-9", "messages": MSG}, 404, "model"),
]


@pytest.mark.parametrize(
    ("raw", "body", "ctype", "routes", "status", "etype", "param"), CASES
)
async def test_malformed_request_gets_exact_openai_error(
    make_proxy: ProxyFactory,
    raw: bytes | None,
    body: Any,
    ctype: str,
    routes: str,
    status: int,
    etype: str,
    param: str | None,
) -> None:
    proxy = await make_proxy(routes)
    data = raw if raw is not None else json.dumps(body).encode()
    async with aiohttp.ClientSession() as http:
        async with http.post(
            proxy.url + "/v1/chat/completions",
            data=data,
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": ctype},
        ) as resp:
            got = await resp.json()
            assert resp.status == status, got
        err = got["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["type"] == etype
        assert err["param"] == param
        assert err["message"] and "Traceback" not in err["message"]
        # The proxy is undisturbed: the next good request is served.
        async with http.post(
            proxy.url + "/v1/chat/completions",
            json={"model": "echo", "messages": MSG},
            headers={"Authorization": f"Bearer {KEY}"},
        ) as resp:
            assert resp.status == 200


async def test_missing_model_uses_the_first_model_as_default(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(ECHO_FIRST)
    async with aiohttp.ClientSession() as http, http.post(
        proxy.url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "default please"}]},
        headers={"Authorization": f"Bearer {KEY}"},
    ) as resp:
        body = await resp.json()
    assert resp.status == 200
    assert body["model"] == "echo"
    assert body["choices"][0]["message"]["content"] == "default please"


async def test_missing_content_type_is_read_as_json(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(ECHO_FIRST)
    async with aiohttp.ClientSession(skip_auto_headers=["Content-Type"]) as http, http.post(
        proxy.url + "/v1/chat/completions",
        data=b'{"model": "echo", "messages": [{"role": "user", "content": "x"}]}',
        headers={"Authorization": f"Bearer {KEY}"},
    ) as resp:
        assert resp.status == 200


async def test_body_over_the_limit_is_413(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(ECHO_FIRST)
    big = b'{"model": "echo", "messages": [{"role": "user", "content": "' + b"x" * (17 << 20)
    async with aiohttp.ClientSession() as http, http.post(
        proxy.url + "/v1/chat/completions",
        data=big + b'"}]}',
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": JSON},
    ) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"]["code"] == "request_too_large"


async def test_wrong_method_is_405_with_allow(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(ECHO_FIRST)
    async with aiohttp.ClientSession() as http, http.get(
        proxy.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}
    ) as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "POST"
        assert (await resp.json())["error"]["type"] == "invalid_request_error"


async def test_unknown_path_is_an_openai_shaped_404(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(ECHO_FIRST)
    async with aiohttp.ClientSession() as http, http.get(proxy.url + "/v1/nothing-here") as resp:
        assert resp.status == 404
        body = await resp.json()
    assert body["error"]["message"] == "Invalid URL (GET /v1/nothing-here)."


async def test_health_probes_need_no_key(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(ECHO_FIRST)
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.url + "/healthz") as resp:
            assert resp.status == 200
        async with http.get(proxy.url + "/readyz") as resp:
            body = await resp.json()
            assert resp.status == 200
            assert body["status"] == "ready"
            assert body["version"] == proxy.holder.current.version


RESPONSES_OUT_OF_BOUNDS = [
    pytest.param({"temperature": 2.5}, "temperature", id="temperature"),
    pytest.param({"top_p": 1.5}, "top_p", id="top-p"),
    pytest.param({"top_logprobs": 21}, "top_logprobs", id="top-logprobs"),
    pytest.param({"service_tier": "turbo"}, "service_tier", id="service-tier"),
    pytest.param({"metadata": {str(i): "v" for i in range(17)}}, "metadata", id="metadata"),
    pytest.param({"tools": [{"type": "function", "name": "f"}] * 2}, "tools[1].name",
                 id="duplicate-tool"),
    pytest.param({"tool_choice": "required"}, "tool_choice", id="required-without-tools"),
    pytest.param({"text": {"format": "json_object"}}, "text.format", id="text-format"),
]


@pytest.mark.parametrize("model", ["plain", "native"])
@pytest.mark.parametrize(("fields", "param"), RESPONSES_OUT_OF_BOUNDS)
async def test_responses_fields_out_of_openai_bounds_are_a_400_before_any_upstream_call(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI, model: str, fields: dict[str, Any],
    param: str,
) -> None:
    proxy = await make_proxy(f"""
upstreams:
  up: {{kind: openai, url: "{fake_openai.url}/v1"}}
  native: {{kind: openai, url: "{fake_openai.url}/v1", responses: native}}
models:
  plain: {{upstream: up}}
  native: {{upstream: native}}
""")
    with pytest.raises(openai.BadRequestError) as caught:
        await proxy.client().responses.create(model=model, input="hi", **fields)
    err = caught.value
    assert (err.status_code, err.type, err.param, err.code) == (
        400, "invalid_request_error", param, "invalid_request_error")
    assert f"'{param}'" in err.message
    assert fake_openai.received == []


# Each asks for another kind of answer than echo's one choice of text (docs/http.md).
UNSERVED = [
    pytest.param({"n": 3}, "n", id="n"),
    pytest.param({"logprobs": True}, "logprobs", id="logprobs"),
    pytest.param({"top_logprobs": 2}, "top_logprobs", id="top_logprobs"),
    pytest.param({"response_format": {"type": "json_object"}}, "response_format",
                 id="json_object"),
    pytest.param({"response_format": {"type": "json_schema", "json_schema": {
        "name": "answer", "schema": {"type": "object"}}}}, "response_format", id="json_schema"),
    pytest.param({"tools": [{"type": "function", "function": {"name": "f"}}],
                  "tool_choice": "required"}, "tool_choice", id="tool_choice-required"),
    pytest.param({"tools": [{"type": "function", "function": {"name": "f"}}],
                  "tool_choice": {"type": "function", "function": {"name": "f"}}},
                 "tool_choice", id="tool_choice-named"),
    pytest.param({"functions": [{"name": "f"}], "function_call": {"name": "f"}},
                 "function_call", id="function_call"),
    pytest.param({"modalities": ["text", "audio"]}, "modalities", id="modalities"),
    pytest.param({"audio": {"voice": "alloy", "format": "wav"}}, "audio", id="audio"),
    pytest.param({"web_search_options": {}}, "web_search_options", id="web_search"),
    pytest.param({"moderation": {"input": {"mode": "block"}}}, "moderation", id="moderation"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["sync", "stream"])
@pytest.mark.parametrize(("fields", "param"), UNSERVED)
async def test_a_parameter_echo_cannot_honour_is_a_400_naming_it(
    make_proxy: ProxyFactory, fields: dict[str, Any], param: str, stream: bool
) -> None:
    proxy = await make_proxy(ECHO_FIRST)
    with pytest.raises(openai.BadRequestError) as caught:
        await proxy.client().chat.completions.create(
            model="echo", messages=MSG, stream=stream, extra_body=fields)
    err = caught.value
    assert (err.status_code, err.type, err.param, err.code) == (
        400, "invalid_request_error", param, "invalid_request_error")


# Parameters whose answer is still the one asked for: served as if absent.
IGNORED: dict[str, Any] = {
    "n": 1, "logprobs": False, "top_logprobs": 0, "response_format": {"type": "text"},
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    "tool_choice": "auto", "parallel_tool_calls": True, "stop": ["\n\n"], "seed": 7,
    "max_tokens": 5, "max_completion_tokens": 5, "temperature": 0.2, "top_p": 0.9,
    "presence_penalty": 1.0, "frequency_penalty": 1.0, "logit_bias": {"50256": -100},
    "modalities": ["text"], "prediction": {"type": "content", "content": "hi"},
    "store": True, "metadata": {"team": "a"}, "reasoning_effort": "low",
    "service_tier": "auto", "user": "u-1", "verbosity": "low",
}


async def test_parameters_echo_ignores_on_purpose_are_still_served(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy(ECHO_FIRST)
    reply = await proxy.client().chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "same answer please"}],
        extra_body=IGNORED)
    assert reply.choices[0].message.content == "same answer please"
    assert len(reply.choices) == 1
