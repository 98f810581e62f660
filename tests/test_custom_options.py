"""`kind: custom` in routes.yaml: the five worked configs load, and `check` reports every
problem of a custom block as `routes.yaml:LINE path: message`."""

from __future__ import annotations

import pytest

from proxy.config import ConfigError, parse_config
from proxy.upstreams.custom_options import CustomRoute
from proxy.upstreams.custom_spec import CustomSpec
from tests import custom_configs

ENV = {
    "DIFY_SUPPORT_APP_KEY": "app-key",
    "FLOWISE_FLOW_KEY": "",
    "LANGFLOW_API_KEY": "lf-key",
    "N8N_CHAT_BASIC_B64": "dXNlcjpwYXNz",
    "LANGSMITH_API_KEY": "",
}

# The §7 snippets that show only the upstream get a route here.
ROUTES = {
    "DIFY": "",
    "FLOWISE": "",
    "LANGFLOW": "models:\n  flow: {upstream: langflow, model: 0b7d6c2e-flow}\n",
    "N8N": "models:\n  agent: {upstream: n8n-agent, model: 7f3e-webhook}\n",
    "LANGGRAPH": "models:\n  agent: {upstream: langgraph, model: agent}\n",
}


def problems(text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, environ=ENV if environ is None else environ)
    return [str(p) for p in caught.value.problems]


@pytest.mark.parametrize("name", list(ROUTES))
def test_each_worked_config_loads_with_its_compiled_spec(name: str) -> None:
    config = parse_config(getattr(custom_configs, name) + ROUTES[name], environ=ENV)
    (upstream,) = config.upstreams.values()
    assert upstream.kind == "custom"
    assert isinstance(upstream.options_as(CustomSpec), CustomSpec)
    assert config.warnings == ()
    assert all(isinstance(m.options, CustomRoute) for m in config.models)


BROKEN = """\
upstreams:
  bot:
    kind: custom
    url: http://127.0.0.1:9000
    mode: steam
    request:
      path: /chat
      body:
        q: "{{ inptu }}"
        s: "{{ session.key }}"
    sync: {join: ""}
    stream:
      framing: sse
      rules:
        - when: {event: token}
          text: data..x
        - when: {event: end}
          end: yes
    cancel:
      path: "/stop/{{ captured.task }}"
models:
  m: {upstream: bot}
"""


def test_every_problem_of_a_custom_block_is_reported_on_its_line() -> None:
    assert problems(BROKEN) == [
        "routes.yaml:5 upstreams.bot.mode: 'steam' is not one of client, stream, sync; "
        "did you mean 'stream'?",
        "routes.yaml:9 upstreams.bot.request.body.q: unknown placeholder `{{ inptu }}`; "
        "did you mean `{{ input }}`?",
        "routes.yaml:11 upstreams.bot.sync: missing required key 'text' (the path of the "
        "answer's text in the JSON body)",
        "routes.yaml:16 upstreams.bot.stream.rules[0].text: 'data..x': expected a name at "
        "column 6, found '.'",
        "routes.yaml:20 upstreams.bot.cancel.path: `{{ captured.task }}`: no stream rule "
        "captures `task` (add `capture: {task: <path>}` to a rule)",
    ]


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        pytest.param("    stream: {framing: sse, rules: [{text: t}]}\n",
                     "routes.yaml:2 upstreams.bot: missing required key 'request' (the path and "
                     "body of the chat call)", id="no-request"),
        pytest.param("    request: {path: /x, body: {q: '{{ input }}'}}\n"
                     "    stream: {rules: [{text: t}]}\n    mode: stream\n",
                     "routes.yaml:6 upstreams.bot.stream: missing required key 'framing'",
                     id="no-framing"),
        pytest.param("    request: {path: /x}\n    mode: stream\n    stream:\n      framing: sse\n"
                     "      rules:\n        - {when: {event: x}, end: true}\n",
                     "routes.yaml:10 upstreams.bot.stream.rules: no rule has `text`",
                     id="no-text-rule"),
        pytest.param("    request: {path: /x}\n    mode: sync\n    sync: {text: 'jmespath:a.b'}\n",
                     "routes.yaml:7 upstreams.bot.sync.text: 'jmespath:a.b': `jmespath:` paths "
                     "are not supported yet", id="jmespath"),
        pytest.param("    request: {path: /x}\n    mode: sync\n    sync: {text: a}\n"
                     "    sesion: {}\n",
                     "routes.yaml:8 upstreams.bot.sesion: unknown key 'sesion'; did you mean "
                     "'session'?", id="unknown-key"),
    ],
)
def test_a_broken_custom_block_is_reported(block: str, expected: str) -> None:
    text = ("upstreams:\n  bot:\n    kind: custom\n    url: http://127.0.0.1:9000\n" + block
            + "models:\n  m: {upstream: bot}\n")
    found = problems(text)
    assert any(p.startswith(expected) for p in found), found


def test_warnings_come_with_their_line() -> None:
    text = """\
upstreams:
  bot:
    kind: custom
    url: http://127.0.0.1:9000
    mode: sync
    request:
      path: /chat
      body: {q: "{{ input }}"}
    sync: {text: answer}
models:
  m: {upstream: bot}
"""
    config = parse_config(text, environ={})
    assert [str(w) for w in config.warnings] == [
        "routes.yaml:7 upstreams.bot.request: the request sends no session placeholder and no "
        "`{{ history }}`/`{{ messages }}`: the agent sees each message without the ones before "
        "it (no memory)",
    ]


def test_a_route_needs_model_when_the_requests_use_it() -> None:
    text = custom_configs.LANGFLOW + "models:\n  flow: {upstream: langflow}\n"
    assert problems(text) == [
        "routes.yaml:28 models.flow: missing required key 'model' (the upstream's requests use "
        "{{ model }}: the id of the flow, app, assistant or webhook to call)"
    ]


def test_a_wildcard_route_needs_the_upstreams_models_request() -> None:
    text = custom_configs.LANGFLOW + "models:\n  'flows/*': {upstream: langflow}\n"
    assert problems(text) == [
        "routes.yaml:28 models.flows/*: a wildcard route publishes the upstream's models, but "
        "upstream 'langflow' has no `models` request to list them"
    ]


def test_route_keys_client_system_keep_show_and_session() -> None:
    text = custom_configs.DIFY.replace(
        "support: {upstream: dify-support}",
        "support: {upstream: dify-support, client_system: keep, show: [reasoning], "
        "session: {from_user: true, busy_timeout: 5}}")
    (model,) = parse_config(text, environ=ENV).models
    assert model.options == CustomRoute("keep")
    assert model.client_system == "drop"
    assert model.show == ("reasoning",)
    assert model.session.from_user and model.session.busy_timeout == 5


def test_without_hint_is_an_upstream_key_for_custom_routes() -> None:
    text = custom_configs.DIFY.replace(
        "support: {upstream: dify-support}",
        "support: {upstream: dify-support, session: {without_hint: per_key}}")
    assert any("models.support.session.without_hint: unknown key 'without_hint'" in p
               for p in problems(text))


def test_environment_references_in_a_body_are_interpolated() -> None:
    text = """\
upstreams:
  bot:
    kind: custom
    url: http://127.0.0.1:9000
    mode: sync
    request:
      path: /chat
      body: {tenant: "${TENANT}", q: "{{ input }}", s: "{{ session.key }}"}
    sync: {text: answer}
models:
  m: {upstream: bot}
"""
    spec = parse_config(text, environ={"TENANT": "acme"}).upstreams["bot"].options_as(CustomSpec)
    body = spec.call(stream=False).render_body({"input": "hi", "session.key": "ap-1"})
    assert body == {"tenant": "acme", "q": "hi", "s": "ap-1"}
    assert problems(text, environ={}) == [
        "routes.yaml:8 upstreams.bot.request.body.tenant: environment variable TENANT is not set"
    ]


def test_show_tools_warns_that_it_does_nothing_on_a_custom_route() -> None:
    text = custom_configs.DIFY.replace(
        "support: {upstream: dify-support}",
        "support: {upstream: dify-support, show: [reasoning, tools]}")
    config = parse_config(text, environ=ENV)
    assert [str(w) for w in config.warnings] == [
        "routes.yaml:45 models.support.show: `tools` has no effect on a route to a custom "
        "upstream (its mapping reads no tool calls); `reasoning` does"
    ]
