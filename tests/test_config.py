"""routes.yaml validation: every problem is reported as `file:line path: message`."""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import pytest

from proxy.config import (
    MAX_BYTES,
    AuthSpec,
    Circuit,
    Config,
    ConfigError,
    KeySpec,
    ModelSpec,
    Problem,
    Timeouts,
    TooLarge,
    UpstreamSpec,
    load_config,
    parse_config,
    read_source,
)
from proxy.upstreams.openai_options import OpenAIOptions

INLINE = "secret written inline; use ${VAR} so it comes from the environment"
ECHO_ONLY = "upstreams:\n  demo: {kind: echo}\nmodels:\n  echo: {upstream: demo}\n"


def problems(text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "routes.yaml", environ or {})
    return [str(p) for p in info.value.problems]


INVALID = [
    pytest.param(
        "upstreams:\n  demo:\n    kind: echo\n   url: x\n",
        [
            "routes.yaml:4 (file): invalid YAML: expected <block end>, "
            "but found '<block mapping start>'"
        ],
        id="invalid-yaml",
    ),
    pytest.param(
        "upstreams:\n\tdemo: {kind: echo}\n",
        ["routes.yaml:2 (file): invalid YAML: found character '\\t' that cannot start any token"],
        id="invalid-yaml-tab",
    ),
    pytest.param(
        "# nothing here yet\n\n",
        ["routes.yaml:1 (file): the file is empty"],
        id="empty-file",
    ),
    pytest.param(
        "",
        ["routes.yaml:1 (file): the file is empty"],
        id="zero-bytes",
    ),
    pytest.param(
        "- upstreams\n- models\n",
        ["routes.yaml:1 (file): expected a mapping with upstreams, models and auth, got a list"],
        id="top-level-list",
    ),
    pytest.param(
        ECHO_ONLY + "authh: {}\n",
        ["routes.yaml:5 authh: unknown key 'authh'; did you mean 'auth'?"],
        id="unknown-top-level-key",
    ),
    pytest.param(
        "upstreams:\n  demo: {kind: echo}\n",
        ["routes.yaml:1 (file): missing required key 'models'"],
        id="missing-models",
    ),
    pytest.param(
        "upstreams:\nmodels: {}\n",
        [
            "routes.yaml:1 upstreams: no upstreams defined; at least one is required",
            "routes.yaml:2 models: no models defined; at least one is required",
        ],
        id="empty-sections",
    ),
    pytest.param(
        "upstreams:\n  vllm:\n    kind: openai\n    urll: http://127.0.0.1:8000/v1\n"
        "models:\n  m: {upstream: vllm}\n",
        [
            "routes.yaml:2 upstreams.vllm: missing required key 'url' (the server's base URL, "
            "e.g. http://127.0.0.1:8000/v1)",
            "routes.yaml:4 upstreams.vllm.urll: unknown key 'urll'; did you mean 'url'?",
        ],
        id="unknown-upstream-key-with-suggestion",
    ),
    pytest.param(
        "upstreams:\n  vllm:\n    url: http://127.0.0.1:8000/v1\nmodels:\n  m: {upstream: vllm}\n",
        [
            "routes.yaml:2 upstreams.vllm: missing required key 'kind' (openai, letta, custom "
            "or echo)"
        ],
        id="missing-kind",
    ),
    pytest.param(
        "upstreams:\n  vllm: {kind: vllm, url: 'http://h/v1'}\nmodels:\n  m: {upstream: vllm}\n",
        [
            "routes.yaml:2 upstreams.vllm.kind: unknown kind 'vllm'; expected one of: openai, "
            "letta, custom, echo"
        ],
        id="bad-kind",
    ),
    pytest.param(
        "upstreams:\n  vllm: {kind: opnai, url: 'http://h/v1'}\nmodels:\n  m: {upstream: vllm}\n",
        ["routes.yaml:2 upstreams.vllm.kind: unknown kind 'opnai'; did you mean 'openai'?"],
        id="misspelt-kind",
    ),
    pytest.param(
        "upstreams:\n  letta: {kind: letta, url: 'http://h:8283'}\n  demo: {kind: echo}\n"
        "models:\n  a: {upstream: letta}\n  b: {upstream: demo, agent: x, show: [tools]}\n"
        "  c: {upstream: letta, agent: x, model: y}\n  'l/*': {upstream: letta, agent: x}\n"
        "  d: {upstream: [letta, demo], agent: x}\n"
        "  e: {upstream: letta, agent: x, show: [thoughts], client_system: keep}\n"
        "  f: {upstream: letta, agent: x, session: {without_hint: nobody, colour: 1}}\n",
        [
            "routes.yaml:5 models.a: missing required key 'agent' (the Letta agent's id or name)",
            "routes.yaml:6 models.b.agent: 'agent' is only for routes to letta upstreams",
            "routes.yaml:6 models.b.show: 'show' is only for routes to letta or custom "
            "upstreams",
            "routes.yaml:7 models.c.model: a letta route names its agent with 'agent', not "
            "'model'",
            "routes.yaml:8 models.l/*.agent: a wildcard serves every agent of the server; "
            "'agent' cannot be set",
            "routes.yaml:9 models.d.upstream: a route to letta upstreams cannot also list "
            "upstreams of another kind",
            "routes.yaml:10 models.e.client_system: expected drop or prepend, got 'keep'",
            "routes.yaml:10 models.e.show[0]: unknown value 'thoughts'; expected one of: "
            "reasoning, tools",
            "routes.yaml:11 models.f.session.colour: unknown key 'colour'; expected one of: "
            "without_hint, from_user, busy_timeout",
            "routes.yaml:11 models.f.session.without_hint: expected agent or per_key, got "
            "'nobody'",
        ],
        id="letta-route-options",
    ),
    pytest.param(
        "upstreams:\n  vllm:\n    kind: openai\nmodels:\n  m: {upstream: vllm}\n",
        [
            "routes.yaml:2 upstreams.vllm: missing required key 'url' (the server's base URL, "
            "e.g. http://127.0.0.1:8000/v1)"
        ],
        id="openai-without-url",
    ),
    pytest.param(
        "upstreams:\n  vllm:\n    kind: openai\n    url: ftp://127.0.0.1/v1\n"
        "models:\n  m: {upstream: vllm}\n",
        [
            "routes.yaml:4 upstreams.vllm.url: expected an absolute http:// or https:// URL, "
            "e.g. http://127.0.0.1:8000/v1"
        ],
        id="bad-url-scheme",
    ),
    pytest.param(
        "upstreams:\n  vllm:\n    kind: openai\n    url: 127.0.0.1:8000/v1\n"
        "models:\n  m: {upstream: vllm}\n",
        [
            "routes.yaml:4 upstreams.vllm.url: expected an absolute http:// or https:// URL, "
            "e.g. http://127.0.0.1:8000/v1"
        ],
        id="url-without-scheme",
    ),
    pytest.param(
        "upstreams:\n  vllm:\n    kind: openai\n    url: http://127.0.0.1:80000/v1\n"
        "models:\n  m: {upstream: vllm}\n",
        ["routes.yaml:4 upstreams.vllm.url: the port is not a number from 0 to 65535"],
        id="url-bad-port",
    ),
    pytest.param(
        "upstreams:\n  demo:\n    kind: echo\n    url: http://127.0.0.1:8000/v1\n"
        "    api_key: ${KEY}\nmodels:\n  m: {upstream: demo}\n",
        [
            "routes.yaml:4 upstreams.demo.url: not used by kind echo",
            "routes.yaml:5 upstreams.demo.api_key: not used by kind echo",
        ],
        id="url-on-echo",
    ),
    pytest.param(
        "upstreams:\n  bad name: {kind: echo}\nmodels:\n  m: {upstream: bad name}\n",
        [
            "routes.yaml:2 upstreams.bad name: an upstream name may only contain letters, "
            "digits, '_', '.' and '-'"
        ],
        id="bad-upstream-name",
    ),
    pytest.param(
        "upstreams:\n  demo: {kind: echo}\nmodels:\n  m:\n    upstream: dmeo\n",
        ["routes.yaml:5 models.m.upstream: unknown upstream 'dmeo'; did you mean 'demo'?"],
        id="dangling-upstream",
    ),
    pytest.param(
        "upstreams:\n  vllm: {kind: openai, url: 'http://h/v1'}\n  demo: {kind: echo}\n"
        "models:\n  m:\n    upstream:\n      - vllm\n      - elsewhere\n",
        [
            "routes.yaml:8 models.m.upstream[1]: unknown upstream 'elsewhere'; "
            "expected one of: vllm, demo"
        ],
        id="dangling-upstream-in-list",
    ),
    pytest.param(
        "upstreams:\n  demo: {kind: echo}\nmodels:\n  m:\n    upstream: [demo, demo]\n",
        ["routes.yaml:5 models.m.upstream[1]: upstream 'demo' is listed twice"],
        id="upstream-listed-twice",
    ),
    pytest.param(
        "upstreams:\n  demo: {kind: echo}\nmodels:\n  m:\n    upstream: []\n",
        ["routes.yaml:5 models.m.upstream: the list is empty; name at least one upstream"],
        id="empty-upstream-list",
    ),
    pytest.param(
        ECHO_ONLY + "  echo:\n    upstream: demo\n",
        ["routes.yaml:5 models.echo: duplicate model name 'echo' (first on line 4)"],
        id="duplicate-model-name",
    ),
    pytest.param(
        "upstreams:\n  demo:\n    kind: echo\n    kind: echo\nmodels:\n  m: {upstream: demo}\n",
        ["routes.yaml:4 upstreams.demo.kind: duplicate key 'kind' (first on line 3)"],
        id="duplicate-key",
    ),
    pytest.param(
        "upstreams:\n  lm: {kind: openai, url: 'http://h/v1'}\n"
        "models:\n  local/*:\n    upstream: lm\n    model: qwen\n",
        [
            "routes.yaml:6 models.local/*.model: a wildcard forwards the upstream's own model "
            "ids; 'model' cannot be set"
        ],
        id="wildcard-with-model",
    ),
    pytest.param(
        "upstreams:\n  demo: {kind: echo}\nmodels:\n  demo/*:\n    upstream: demo\n",
        [
            "routes.yaml:5 models.demo/*.upstream: 'demo' is kind echo, which has no model list "
            "for a wildcard to expand"
        ],
        id="wildcard-on-echo",
    ),
    pytest.param(
        "upstreams:\n  demo: {kind: echo}\nmodels:\n  '*':\n    upstream: demo\n",
        ["routes.yaml:4 models.*: a wildcard model must have the form 'prefix/*'"],
        id="wildcard-star-alone",
    ),
    pytest.param(
        "upstreams:\n  demo: {kind: echo}\nmodels:\n  a*:\n    upstream: demo\n",
        ["routes.yaml:4 models.a*: a wildcard model must have the form 'prefix/*'"],
        id="wildcard-without-slash",
    ),
    pytest.param(
        "upstreams:\n  demo: {kind: echo}\nmodels:\n  a/*/b:\n    upstream: demo\n",
        ["routes.yaml:4 models.a/*/b: a wildcard model must have the form 'prefix/*'"],
        id="wildcard-in-the-middle",
    ),
    pytest.param(
        "upstreams:\n  demo: {kind: echo}\nmodels:\n  /*:\n    upstream: demo\n",
        ["routes.yaml:4 models./*: a wildcard model must have the form 'prefix/*'"],
        id="wildcard-empty-prefix",
    ),
    pytest.param(
        "upstreams:\n  demo: {kind: echo}\nmodels:\n  m:\n    upstream: 3\n",
        [
            "routes.yaml:5 models.m.upstream: expected an upstream name or a list of names, "
            "got a number"
        ],
        id="upstream-is-a-number",
    ),
    pytest.param(
        "upstreams:\n  vllm:\n    kind: openai\n    url: http://h/v1\n    timeouts:\n"
        "      connect: fast\n      idle: -1\nmodels:\n  m: {upstream: vllm}\n",
        [
            "routes.yaml:6 upstreams.vllm.timeouts.connect: expected a number of seconds, "
            "got a string",
            "routes.yaml:7 upstreams.vllm.timeouts.idle: must be a positive number of seconds",
        ],
        id="timeouts-wrong-type-and-negative",
    ),
    pytest.param(
        "upstreams:\n  vllm:\n    kind: openai\n    url: http://h/v1\n    timeouts:\n"
        "      total: -5\n      connnect: 3\nmodels:\n  m: {upstream: vllm}\n",
        [
            "routes.yaml:6 upstreams.vllm.timeouts.total: must be a positive number of seconds, "
            "or 0 or null for no limit",
            "routes.yaml:7 upstreams.vllm.timeouts.connnect: unknown key 'connnect'; "
            "did you mean 'connect'?",
        ],
        id="timeouts-total-negative-and-typo",
    ),
    pytest.param(
        "upstreams:\n  vllm:\n    kind: openai\n    url: http://h/v1\n    keepalive: 0\n"
        "    max_concurrency: 2.5\n    queue_timeout: -1\n"
        "    circuit: {failures: 0, cooldown: soon, after: 3}\nmodels:\n  m: {upstream: vllm}\n",
        [
            "routes.yaml:5 upstreams.vllm.keepalive: must be a positive number of seconds",
            "routes.yaml:6 upstreams.vllm.max_concurrency: expected a whole number, got a number",
            "routes.yaml:7 upstreams.vllm.queue_timeout: must be a finite number of seconds, "
            "0 or more (0: do not wait)",
            "routes.yaml:8 upstreams.vllm.circuit.after: unknown key 'after'; expected one of: "
            "failures, cooldown",
            "routes.yaml:8 upstreams.vllm.circuit.failures: must be a positive whole number",
            "routes.yaml:8 upstreams.vllm.circuit.cooldown: expected a number of seconds, "
            "got a string",
        ],
        id="resilience-keys-wrong",
    ),
    pytest.param(
        "upstreams:\n  demo:\n    kind: echo\n    keepalive: 5\n    max_concurrency: 1\n"
        "models:\n  m: {upstream: demo}\n",
        [
            "routes.yaml:4 upstreams.demo.keepalive: not used by kind echo",
            "routes.yaml:5 upstreams.demo.max_concurrency: not used by kind echo",
        ],
        id="resilience-keys-on-echo",
    ),
    pytest.param(
        "upstreams:\n  vllm:\n    kind: openai\n    url: http://h/v1\n    headers: [X-A]\n"
        "    forward_headers: X-Session-Id\nmodels:\n  m: {upstream: vllm}\n",
        [
            "routes.yaml:5 upstreams.vllm.headers: expected a mapping, got a list",
            "routes.yaml:6 upstreams.vllm.forward_headers: expected a list of header names, "
            "got a string",
        ],
        id="headers-wrong-types",
    ),
    pytest.param(
        "upstreams:\n  vllm:\n    kind: openai\n    url: http://h/v1\n    headers:\n"
        "      X Bad: v\n      X-Team: 7\n    forward_headers: [Authorization, X-Api-Key]\n"
        "models:\n  m: {upstream: vllm}\n",
        [
            "routes.yaml:6 upstreams.vllm.headers.X Bad: not a valid header name",
            "routes.yaml:7 upstreams.vllm.headers.X-Team: expected a string, got a number",
            "routes.yaml:8 upstreams.vllm.forward_headers[0]: 'Authorization' cannot be "
            "forwarded: the proxy sets it or it carries the client's key for this proxy",
            "routes.yaml:8 upstreams.vllm.forward_headers[1]: 'X-Api-Key' cannot be "
            "forwarded: the proxy sets it or it carries the client's key for this proxy",
        ],
        id="bad-headers",
    ),
    pytest.param(
        ECHO_ONLY + "auth:\n  allow_unauthenticated: 'yes'\n",
        ["routes.yaml:6 auth.allow_unauthenticated: expected true or false, got a string"],
        id="allow-unauthenticated-string",
    ),
    pytest.param(
        ECHO_ONLY + "auth:\n  keys:\n    - key: ${OPENWEBUI_KEY}\n",
        ["routes.yaml:7 auth.keys[0].key: environment variable OPENWEBUI_KEY is not set"],
        id="missing-env-var",
    ),
    pytest.param(
        "upstreams:\n  vllm:\n    kind: openai\n    url: ${VLLM_URL}\n"
        "models:\n  m: {upstream: vllm}\n",
        ["routes.yaml:4 upstreams.vllm.url: environment variable VLLM_URL is not set"],
        id="missing-env-var-in-url",
    ),
    pytest.param(
        ECHO_ONLY + "auth:\n  keys:\n    - key: ${OPENWEBUI_KEY:-}\n",
        ["routes.yaml:7 auth.keys[0].key: empty API key"],
        id="empty-key",
    ),
    pytest.param(
        ECHO_ONLY + "auth:\n  keys:\n    - key: ${K\n",
        [
            "routes.yaml:7 auth.keys[0].key: malformed ${...}: expected ${VAR} or "
            "${VAR:-default} (write $${ for a literal ${)"
        ],
        id="malformed-reference",
    ),
    pytest.param(
        ECHO_ONLY + "auth:\n  keys:\n    - key: ${A}\n    - name: laptop\n      key: ${B}\n",
        ["routes.yaml:9 auth.keys[1].key: same key as auth.keys[0].key"],
        id="duplicate-auth-keys",
    ),
    pytest.param(
        ECHO_ONLY + "auth:\n  keys:\n    - key: '${A} ${B}'\n",
        ["routes.yaml:7 auth.keys[0].key: an API key cannot contain whitespace"],
        id="key-with-whitespace",
    ),
    pytest.param(
        ECHO_ONLY + "auth:\n  keys:\n    - name: laptop\n    - key: ${A}\n      models: []\n"
        "      scope: all\n",
        [
            "routes.yaml:7 auth.keys[0]: missing required key 'key'",
            "routes.yaml:9 auth.keys[1].models: the list is empty, so this key would grant "
            "no model",
            "routes.yaml:10 auth.keys[1].scope: unknown key 'scope'; expected one of: key, "
            "models, name",
        ],
        id="bad-key-entries",
    ),
    pytest.param(
        "upstreams:\n"
        "  vllm:\n"
        "    kind: openai\n"
        "    url: http://127.0.0.1:8000/v1\n"
        "    timeouts: {connect: fast}\n"
        "  demo:\n"
        "    kind: echo\n"
        "    api_key: x\n"
        "models:\n"
        "  mistral:\n"
        "    upstream: [vllm, lmstudio]\n"
        "  local/*:\n"
        "    upstream: demo\n"
        "auth:\n"
        "  keys:\n"
        "    - key: ${MISSING}\n",
        [
            "routes.yaml:5 upstreams.vllm.timeouts.connect: expected a number of seconds, "
            "got a string",
            "routes.yaml:8 upstreams.demo.api_key: not used by kind echo",
            "routes.yaml:11 models.mistral.upstream[1]: unknown upstream 'lmstudio'; "
            "expected one of: vllm, demo",
            "routes.yaml:13 models.local/*.upstream: 'demo' is kind echo, which has no model "
            "list for a wildcard to expand",
            "routes.yaml:16 auth.keys[0].key: environment variable MISSING is not set",
        ],
        id="several-problems-together",
    ),
]


@pytest.mark.parametrize(("text", "expected"), INVALID)
def test_invalid_file_reports_every_problem(text: str, expected: list[str]) -> None:
    assert problems(text, {"A": "sk-same", "B": "sk-same", "KEY": "k"}) == expected


def test_a_reserved_kind_is_not_yet_supported(monkeypatch: pytest.MonkeyPatch) -> None:
    # A kind being built is refused as such, not as a typo with a did-you-mean.
    from proxy.upstreams import kinds

    monkeypatch.setattr(kinds, "RESERVED", ("future",))
    text = "upstreams:\n  x: {kind: future}\nmodels:\n  m: {upstream: x}\n"
    assert problems(text) == [
        "routes.yaml:2 upstreams.x.kind: upstream kind 'future' is not yet supported"
    ]


def test_problem_str_is_file_line_path_message() -> None:
    problem = Problem("routes.yaml", 12, "models.support.upstream", "what is wrong")
    assert str(problem) == "routes.yaml:12 models.support.upstream: what is wrong"
    error = ConfigError([problem, Problem("routes.yaml", 1, "(file)", "other")])
    assert str(error) == f"{problem}\nroutes.yaml:1 (file): other"


def test_no_message_contains_a_secret() -> None:
    text = ECHO_ONLY + "auth:\n  keys:\n    - key: sk-topsecret-1\n    - key: sk-topsecret-1\n"
    found = problems(text)
    assert found == ["routes.yaml:8 auth.keys[1].key: same key as auth.keys[0].key"]
    assert "topsecret" not in "".join(found)


FULL = """\
upstreams:
  vllm:
    kind: openai
    url: http://127.0.0.1:8000/v1/
    api_key: ${VLLM_API_KEY:-}
  lmstudio:
    kind: openai
    url: http://127.0.0.1:1234/v1
    api_key: ${LMSTUDIO_KEY}
    headers:
      X-Team: research
    forward_headers: [X-Session-Id]
    timeouts:
      connect: 2
      first_event: 60
      idle: 30.5
      total: 600
  demo:
    kind: echo
models:
  mistral:
    upstream: [vllm, lmstudio]
    model: mistralai/Mistral-7B-Instruct-v0.2
  "local/*":
    upstream: lmstudio
    owned_by: lab
  echo:
    upstream: demo
auth:
  keys:
    - key: ${OPENWEBUI_KEY}
      models: ["mistral", "local/*"]
      name: open-webui
    - key: ${ADMIN_KEY}
  allow_unauthenticated: false
"""


def test_full_example_parses_to_dataclasses() -> None:
    env = {"LMSTUDIO_KEY": "lm-key", "OPENWEBUI_KEY": "sk-webui", "ADMIN_KEY": "sk-admin"}
    config = parse_config(FULL, "routes.yaml", env)
    assert config == Config(
        source="routes.yaml",
        version=config.version,
        upstreams={
            "vllm": UpstreamSpec(
                name="vllm",
                kind="openai",
                line=2,
                url="http://127.0.0.1:8000/v1",
                api_key=None,
                options=OpenAIOptions(),
            ),
            "lmstudio": UpstreamSpec(
                name="lmstudio",
                kind="openai",
                line=6,
                url="http://127.0.0.1:1234/v1",
                api_key="lm-key",
                headers={"X-Team": "research"},
                forward_headers=("x-session-id",),
                timeouts=Timeouts(connect=2, first_event=60, idle=30.5, total=600),
                options=OpenAIOptions(),
            ),
            "demo": UpstreamSpec(name="demo", kind="echo", line=18),
        },
        models=(
            ModelSpec(
                name="mistral",
                upstreams=("vllm", "lmstudio"),
                line=21,
                model="mistralai/Mistral-7B-Instruct-v0.2",
            ),
            ModelSpec(name="local/*", upstreams=("lmstudio",), line=24, owned_by="lab"),
            ModelSpec(name="echo", upstreams=("demo",), line=27),
        ),
        auth=AuthSpec(
            keys=(
                KeySpec(key="sk-webui", line=31, models=("mistral", "local/*"), name="open-webui"),
                KeySpec(key="sk-admin", line=34),
            ),
        ),
        warnings=(),
    )
    assert [m.wildcard_prefix for m in config.models] == [None, "local/", None]
    assert list(config.upstreams) == ["vllm", "lmstudio", "demo"]


def test_defaults() -> None:
    config = parse_config(
        "upstreams:\n  v: {kind: openai, url: 'https://api.example.com/v1'}\n"
        "models:\n  m: {upstream: v}\n",
        environ={},
    )
    spec = config.upstreams["v"]
    assert spec.timeouts == Timeouts(connect=10.0, first_event=300.0, idle=300.0, total=None)
    assert (spec.api_key, dict(spec.headers), spec.forward_headers) == (None, {}, ())
    assert config.auth == AuthSpec(keys=(), allow_unauthenticated=False)


def test_resilience_keys_parse_for_openai_and_letta() -> None:
    text = (
        "upstreams:\n"
        "  v:\n    kind: openai\n    url: http://h/v1\n    keepalive: 5\n"
        "    max_concurrency: 8\n    queue_timeout: 0\n"
        "    circuit: {failures: 5, cooldown: 2.5}\n"
        "  l: {kind: letta, url: 'http://h:8283', max_concurrency: 0, circuit: {}}\n"
        "models:\n  m: {upstream: v}\n  a: {upstream: l, agent: bot}\n"
    )
    upstreams = parse_config(text, environ={}).upstreams
    v, letta = upstreams["v"], upstreams["l"]
    assert (v.keepalive, v.max_concurrency, v.queue_timeout) == (5.0, 8, 0.0)
    assert v.circuit == Circuit(failures=5, cooldown=2.5)
    # 0 means no limit, like the default; an empty circuit mapping keeps the defaults.
    assert (letta.keepalive, letta.max_concurrency, letta.queue_timeout) == (15.0, None, 10.0)
    assert letta.circuit == Circuit(failures=3, cooldown=30.0)


@pytest.mark.parametrize(
    ("total", "expected"),
    [("0", None), ("null", None), ("", None), ("1.5", 1.5)],
    ids=["zero", "null", "empty", "number"],
)
def test_total_timeout_zero_or_null_means_no_limit(total: str, expected: float | None) -> None:
    text = (
        "upstreams:\n  v:\n    kind: openai\n    url: http://h/v1\n"
        f"    timeouts:\n      total: {total}\nmodels:\n  m: {{upstream: v}}\n"
    )
    assert parse_config(text, environ={}).upstreams["v"].timeouts.total == expected


@pytest.mark.parametrize(
    ("written", "environ", "expected"),
    [
        ("${NAME}", {"NAME": "value"}, "value"),
        ("${NAME:-fallback}", {}, "fallback"),
        ("${NAME:-fallback}", {"NAME": "set"}, "set"),
        ("${NAME:-fallback}", {"NAME": ""}, "fallback"),
        ("${NAME:-}", {}, ""),
        ("${NAME}", {"NAME": ""}, ""),
        ("pre-${A}-${B:-b}-post", {"A": "a"}, "pre-a-b-post"),
        ("$${NAME}", {}, "${NAME}"),
        ("cost $5 {x}", {}, "cost $5 {x}"),
        ("${A}$${A}", {"A": "a"}, "a${A}"),
    ],
    ids=[
        "set", "default", "set-beats-default", "empty-takes-default", "empty-default",
        "set-but-empty", "several", "escape", "lone-dollar", "value-then-escape",
    ],
)
def test_interpolation(written: str, environ: dict[str, str], expected: str) -> None:
    text = (
        "upstreams:\n  d: {kind: echo}\nmodels:\n  m:\n    upstream: d\n"
        f"    owned_by: '{written}x'\n"
    )
    assert parse_config(text, environ=environ).models[0].owned_by == expected + "x"


def test_interpolation_works_in_any_string() -> None:
    text = (
        "upstreams:\n  ${KIND_IS_NOT_A_KEY}:\n    kind: ${KIND}\n    url: ${BASE}/v1\n"
        "    headers: {X-Org: '${ORG}'}\nmodels:\n  m:\n    upstream: [\"${UP}\"]\n"
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, environ={"KIND": "openai", "BASE": "http://h", "ORG": "o", "UP": "u"})
    # Keys are names, not values: they are never interpolated.
    assert [str(p) for p in info.value.problems] == [
        "routes.yaml:2 upstreams.${KIND_IS_NOT_A_KEY}: an upstream name may only contain "
        "letters, digits, '_', '.' and '-'",
        "routes.yaml:8 models.m.upstream[0]: unknown upstream 'u'; "
        "expected one of: ${KIND_IS_NOT_A_KEY}",
    ]
    ok = text.replace("${KIND_IS_NOT_A_KEY}", "u")
    spec = parse_config(ok, environ={"KIND": "openai", "BASE": "http://h", "ORG": "o", "UP": "u"})
    assert spec.upstreams["u"].url == "http://h/v1"
    assert spec.upstreams["u"].headers == {"X-Org": "o"}


def test_parse_config_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTPROXY_TEST_KEY", "sk-from-env")
    text = ECHO_ONLY + "auth:\n  keys:\n    - key: ${AGENTPROXY_TEST_KEY}\n"
    assert parse_config(text).auth.keys[0].key == "sk-from-env"


def test_list_upstream_order_is_kept() -> None:
    text = (
        "upstreams:\n  a: {kind: echo}\n  b: {kind: echo}\n  c: {kind: echo}\n"
        "models:\n  m: {upstream: [c, a, b]}\n  n: {upstream: b}\n"
    )
    models = parse_config(text, environ={}).models
    assert [m.upstreams for m in models] == [("c", "a", "b"), ("b",)]


def test_models_order_is_kept() -> None:
    names = ["zeta", "alpha", "x/*", "mid", "beta"]
    text = "upstreams:\n  v: {kind: openai, url: 'http://h/v1'}\nmodels:\n" + "".join(
        f"  {name}: {{upstream: v}}\n" for name in names
    )
    assert [m.name for m in parse_config(text, environ={}).models] == names


def test_inline_secrets_warn_without_failing() -> None:
    text = (
        "upstreams:\n  v:\n    kind: openai\n    url: http://h/v1\n    api_key: sk-upstream\n"
        "models:\n  m: {upstream: v}\n"
        "auth:\n  keys:\n    - key: sk-client\n    - key: ${FROM_ENV}\n"
        "    - key: 'prefix-${FROM_ENV}'\n"
    )
    config = parse_config(text, environ={"FROM_ENV": "sk-env"})
    assert [str(w) for w in config.warnings] == [
        f"routes.yaml:5 upstreams.v.api_key: {INLINE}",
        f"routes.yaml:10 auth.keys[0].key: {INLINE}",
    ]
    assert config.upstreams["v"].api_key == "sk-upstream"
    assert [k.key for k in config.auth.keys] == ["sk-client", "sk-env", "prefix-sk-env"]


def test_empty_api_key_means_none_and_does_not_warn() -> None:
    text = (
        "upstreams:\n  v: {kind: openai, url: 'http://h/v1', api_key: ''}\n"
        "models:\n  m: {upstream: v}\n"
    )
    config = parse_config(text, environ={})
    assert config.upstreams["v"].api_key is None
    assert config.warnings == ()


def test_forward_headers_are_lowercased_once() -> None:
    text = (
        "upstreams:\n  v:\n    kind: openai\n    url: http://h/v1\n"
        "    forward_headers: [X-Session-Id, x-session-id, X-User]\nmodels:\n  m: {upstream: v}\n"
    )
    assert parse_config(text, environ={}).upstreams["v"].forward_headers == (
        "x-session-id",
        "x-user",
    )


def test_version_is_stable_and_follows_content() -> None:
    first = parse_config(ECHO_ONLY, environ={})
    again = parse_config(ECHO_ONLY, "other.yaml", environ={"UNRELATED": "1"})
    changed = parse_config(ECHO_ONLY + "# a comment changes the text\n", environ={})
    assert first.version == again.version
    # 12 lower-case hex digits: what `check`, /readyz and the metrics label show.
    assert re.fullmatch(r"[0-9a-f]{12}", first.version), first.version
    assert changed.version != first.version


def test_version_is_the_same_whatever_the_line_endings(tmp_path: Path) -> None:
    # The watcher and `agentproxy check` read the same file and must print the same version.
    path = tmp_path / "routes.yaml"
    path.write_bytes(ECHO_ONLY.replace("\n", "\r\n").encode())
    assert load_config(path, environ={}).version == parse_config(ECHO_ONLY, environ={}).version


def test_load_config_uses_the_path_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "routes.yaml").write_text(ECHO_ONLY + "  bad:\n    upstream: nowhere\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config("routes.yaml", environ={})
    assert [str(p) for p in info.value.problems] == [
        "routes.yaml:6 models.bad.upstream: unknown upstream 'nowhere'; expected one of: demo"
    ]


def test_load_config_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(ECHO_ONLY, encoding="utf-8")
    config = load_config(path, environ={})
    assert config.source == str(path)
    assert config.version == parse_config(ECHO_ONLY, environ={}).version
    assert [m.name for m in config.models] == ["echo"]


def test_load_config_rejects_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_bytes(ECHO_ONLY.encode() + b"# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert [str(p) for p in info.value.problems] == [f"{path}:5 (file): the file is not UTF-8 text"]


def test_load_config_missing_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        load_config(tmp_path / "absent.yaml", environ={})


def test_shipped_routes_file_is_valid() -> None:
    root = Path(__file__).resolve().parent.parent
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AGENTPROXY")}
    config = load_config(root / "routes.yaml", environ)
    assert config.models and config.warnings == ()


# -- credentials with control characters (issue 13, item 8) --------------------------------

CREDENTIALS = (
    "upstreams:\n"
    "  v:\n    kind: openai\n    url: http://h/v1\n    api_key: ${VLLM_KEY}\n"
    "    headers:\n      api-key: ${HEADER_KEY}\n"
    "  l:\n    kind: letta\n    url: http://h:8283\n    api_key: ${LETTA_KEY:-}\n"
    "models:\n  m: {upstream: v}\n  a: {upstream: l, agent: bot}\n"
    "auth:\n  keys:\n    - key: ${CLIENT_KEY}\n"
)


def test_a_credential_from_the_environment_with_a_trailing_newline_is_refused() -> None:
    env = {
        "VLLM_KEY": "sk-vllm-secret\n",
        "HEADER_KEY": "hdr-secret\r\n",
        "LETTA_KEY": "letta\x1bsecret",
        "CLIENT_KEY": "sk-client-secret\n",
    }
    found = problems(CREDENTIALS, env)
    assert found == [
        "routes.yaml:5 upstreams.v.api_key: environment variable VLLM_KEY ends with a line "
        "break; a credential cannot contain control characters",
        "routes.yaml:7 upstreams.v.headers.api-key: environment variable HEADER_KEY contains "
        "a carriage return; a header value cannot contain control characters",
        "routes.yaml:11 upstreams.l.api_key: environment variable LETTA_KEY contains the "
        "control character U+001B; a credential cannot contain control characters",
        "routes.yaml:17 auth.keys[0].key: environment variable CLIENT_KEY ends with a line "
        "break; a credential cannot contain control characters",
    ]
    assert "secret" not in "".join(found)


def test_a_url_from_the_environment_with_a_control_character_is_refused() -> None:
    text = "upstreams:\n  v: {kind: openai, url: '${URL}'}\nmodels:\n  m: {upstream: v}\n"
    for value in ("http://h/v1\n", "http://h\x1b/v1"):
        assert problems(text, {"URL": value}) == [
            "routes.yaml:2 upstreams.v.url: expected an absolute http:// or https:// URL, "
            "e.g. http://127.0.0.1:8000/v1"
        ]


def test_the_same_credentials_without_the_newline_load() -> None:
    env = {"VLLM_KEY": "sk-vllm", "HEADER_KEY": "h\tv", "CLIENT_KEY": "sk-client"}
    config = parse_config(CREDENTIALS, environ=env)
    assert config.upstreams["v"].api_key == "sk-vllm"
    # A tab is legal inside a header value (RFC 9110 §5.5).
    assert dict(config.upstreams["v"].headers) == {"api-key": "h\tv"}
    assert config.upstreams["l"].api_key is None


def test_a_control_character_written_in_the_file_is_refused_without_quoting_it() -> None:
    text = (
        "upstreams:\n  v:\n    kind: openai\n    url: http://h/v1\n"
        '    api_key: "sk-inline\\n"\n    headers: {X-A: "a\\u0000b"}\n'
        "models:\n  m: {upstream: v}\n"
    )
    assert problems(text) == [
        "routes.yaml:5 upstreams.v.api_key: a credential cannot contain control characters "
        "(found a line break)",
        "routes.yaml:6 upstreams.v.headers.X-A: a header value cannot contain control "
        "characters (found a NUL)",
    ]


NOT_TEXT = "is not valid UTF-8 text (it holds a lone surrogate, such as the escape \\ud800)"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param('models:\n  "\\ud800": {upstream: demo}\n  m: {upstream: demo}\n',
                     f"routes.yaml:4 models: {NOT_TEXT}", id="model-name"),
        pytest.param('models:\n  m: {upstream: demo, owned_by: "\\udc00"}\n',
                     f"routes.yaml:4 models.m.owned_by: {NOT_TEXT}", id="owned-by"),
        pytest.param('models:\n  m: {upstream: demo}\nauth:\n  keys: [{key: "\\ud800"}]\n',
                     f"routes.yaml:6 auth.keys[0].key: {NOT_TEXT}", id="client-key"),
    ],
)
def test_a_lone_surrogate_written_in_the_file_is_refused(text: str, expected: str) -> None:
    # Accepted before, it made /v1/models (and then /metrics) a 500, or `serve` die.
    assert problems("upstreams:\n  demo: {kind: echo}\n" + text) == [expected]


def test_undecodable_environment_bytes_are_refused_without_quoting_them() -> None:
    # Python decodes the environment with surrogateescape: b"\xff" arrives as "\udcff".
    text = 'upstreams:\n  demo: {kind: echo}\nmodels:\n  m: {upstream: demo}\n' \
        'auth:\n  keys: [{key: "${K}"}]\n'
    assert problems(text, {"K": "sk-secret\udcff"}) == [
        "routes.yaml:6 auth.keys[0].key: environment variable K is not valid UTF-8 text"
    ]


def test_a_problem_naming_a_lone_surrogate_prints() -> None:
    # `kind: "\ud800"` made `check` itself crash while printing the problem.
    found = problems('upstreams:\n  demo: {kind: "\\ud800"}\nmodels:\n  m: {upstream: demo}\n')
    assert found == [f"routes.yaml:2 upstreams.demo.kind: {NOT_TEXT}"]
    assert str(Problem("routes.yaml", 1, "models.\ud800", "x")).encode() == \
        b"routes.yaml:1 models.\\ud800: x"


OPENAI_V = "upstreams:\n  v:\n    kind: openai\n    url: http://h/v1\n"
ROUTE_M = "models:\n  m: {upstream: v}\n"
# Each of these was a traceback (RecursionError, ValueError, OverflowError) from `check`,
# `serve` and a reload, instead of a problem on its line.
HOSTILE = [
    pytest.param(
        OPENAI_V + ROUTE_M + "auth: " + "[" * 1000 + "]" * 1000 + "\n",
        ["routes.yaml:7 (file): invalid YAML: nested more than 100 levels deep"],
        id="flow-nesting",
    ),
    pytest.param(
        # Deep enough to pass the limit, not so deep that composing it without the limit
        # would end in a RecursionError: the limit itself (of either parser) refuses it.
        OPENAI_V + ROUTE_M + "auth: " + "[" * 150 + "]" * 150 + "\n",
        ["routes.yaml:7 (file): invalid YAML: nested more than 100 levels deep"],
        id="flow-nesting-within-the-recursion-limit",
    ),
    pytest.param(
        OPENAI_V + ROUTE_M + "".join("  " * i + f"k{i}:\n" for i in range(600)),
        ["routes.yaml:106 (file): invalid YAML: nested more than 100 levels deep"],
        id="block-nesting",
    ),
    pytest.param(
        OPENAI_V + "    circuit: {failures: " + "9" * 5000 + "}\n" + ROUTE_M,
        ["routes.yaml:5 upstreams.v.circuit.failures: a number cannot be longer than 100 "
         "characters"],
        id="int-of-5000-digits",
    ),
    pytest.param(
        OPENAI_V + "    timeouts: {connect: " + "9" * 400 + "}\n" + ROUTE_M,
        ["routes.yaml:5 upstreams.v.timeouts.connect: a number cannot be longer than 100 "
         "characters"],
        id="timeout-of-400-digits",
    ),
    pytest.param(
        OPENAI_V.replace("http://h/v1", '"http://[x"') + ROUTE_M,
        ["routes.yaml:4 upstreams.v.url: the host in [brackets] is not a valid IPv6 address"],
        id="unclosed-ipv6-url",
    ),
    pytest.param(
        # urlsplit refuses it too (a fullwidth '#' would become the real one), and the
        # message blamed an IPv6 host the URL does not have.
        OPENAI_V.replace("http://h/v1", '"http://h\uff03x/v1"') + ROUTE_M,
        ["routes.yaml:4 upstreams.v.url: the host has characters that Unicode normalization "
         "(NFKC) turns into URL syntax ('/', '?', '#', '@' or ':')"],
        id="url-host-changed-by-nfkc",
    ),
    pytest.param(
        "upstreams:\n  demo: &base\n    kind: echo\n  demo2:\n    <<: *base\n    kind: echo\n"
        "models:\n  echo: {upstream: demo}\n",
        ["routes.yaml:5 upstreams.demo2: merge keys ('<<') are not supported; write the keys "
         "out"],
        id="merge-key",
    ),
]


@pytest.mark.parametrize(("text", "expected"), HOSTILE)
def test_hostile_values_are_problems_on_their_line(text: str, expected: list[str]) -> None:
    assert problems(text) == expected



@pytest.mark.parametrize(("text", "expected"), [
    pytest.param(
        OPENAI_V + "models:\n  m:\n    upstream:\tv\n",
        ["routes.yaml:7 (file): invalid YAML: found character '\\t' that cannot start any "
         "token"],
        id="tab-after-colon",
    ),
    pytest.param(
        OPENAI_V + "models:\n  m: {upstream: v}\t# why\n",
        ["routes.yaml:6 (file): invalid YAML: found character '\\t' that cannot start any "
         "token"],
        id="tab-before-comment",
    ),
    pytest.param(
        OPENAI_V + "models:\n\ufeff  m: {upstream: v}\n",
        ["routes.yaml:5 models: no models defined; at least one is required",
         "routes.yaml:6 \ufeff  m: unknown key '\ufeff  m'; expected one of: upstreams, "
         "models, auth"],
        id="bom-starting-a-line",
    ),
])
def test_a_tab_or_a_bom_inside_the_file_is_read_as_pyyaml_reads_it(
    text: str, expected: list[str]
) -> None:
    """libyaml (the fast parser) accepts these; PyYAML, which is all some hosts have and
    whose messages are the ones reported, refuses them: a file is valid or not alike on
    every host."""
    assert problems(text) == expected


def test_a_number_in_a_custom_body_past_the_length_limit_is_a_problem() -> None:
    body = "        seed: " + "9" * 5000 + '\n        message: "{{ input }}"\n'
    assert problems(CUSTOM_BODY.format(body=body)) == [
        "routes.yaml:8 upstreams.h.request.body.seed: a number cannot be longer than 100 "
        "characters"
    ]


@pytest.mark.parametrize("digits", ["18446744073709551616", "-9223372036854775809"])
def test_a_whole_number_in_a_custom_body_that_json_cannot_carry_is_a_problem(digits: str) -> None:
    # orjson writes integers of 64 bits at most: the file was accepted, and each request then
    # failed, blamed on the upstream (a 502 its circuit counted) or a 500.
    body = f"        seed: {digits}\n        message: \"{{{{ input }}}}\"\n"
    assert problems(CUSTOM_BODY.format(body=body)) == [
        "routes.yaml:8 upstreams.h.request.body.seed: a whole number must fit in 64 bits "
        "(-9223372036854775808 to 18446744073709551615) to be sent as JSON"
    ]
    fits = "        seed: 18446744073709551615\n        low: -9223372036854775808\n"
    parse_config(CUSTOM_BODY.format(body=fits + '        message: "{{ input }}"\n'),
                 "routes.yaml", {})


CUSTOM_BODY = (
    "upstreams:\n  h:\n    kind: custom\n    url: http://127.0.0.1:9000\n"
    "    request:\n      path: /chat\n      body:\n{body}"
    "    sync: {{text: reply}}\n    mode: sync\nmodels:\n  h: {{upstream: h}}\n"
)


def test_an_alias_bomb_in_a_custom_body_is_refused_quickly() -> None:
    # Seven levels of nine aliases: 9**7 strings from a few hundred bytes. Expanding them all
    # took half a minute and 660 MB, then the file was accepted.
    body = '        l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    for i in range(1, 7):
        body += f"        l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n"
    body += '        message: "{{ input }}"\n'
    found = problems(CUSTOM_BODY.format(body=body))
    # The values not read past the limit may earn problems of their own (here: `sync`).
    assert re.fullmatch(r"routes\.yaml:\d+ upstreams\.h\.request\.body\.l\d[][\d]*: more than "
                        r"100000 values once YAML aliases are expanded \(the limit for a file\)",
                        found[0]), found


def test_an_alias_inside_what_it_names_is_a_problem_not_a_recursion_error() -> None:
    body = '        <<: &a {message: "{{ input }}", again: *a}\n'
    found = problems(CUSTOM_BODY.format(body=body).replace("<<: ", "x: "))
    assert len(found) == 1
    assert found[0].startswith("routes.yaml:8 upstreams.h.request.body.x.again.again.")
    assert found[0].endswith(": nested more than 64 levels deep (a YAML alias inside what it "
                             "names?)")


def test_a_few_aliases_in_a_custom_body_still_work() -> None:
    body = '        message: &m "{{ input }}"\n        copy: *m\n'
    config = parse_config(CUSTOM_BODY.format(body=body), environ={})
    assert config.upstreams["h"].kind == "custom"


# -- kind declarations ------------------------------------------------------------------------


def test_session_header_is_an_openai_option() -> None:
    text = (
        "upstreams:\n  claw:\n    kind: openai\n    url: http://h/v1\n"
        "    session_header: X-OpenClaw-Session\nmodels:\n  m: {upstream: claw}\n"
    )
    spec = parse_config(text, environ={}).upstreams["claw"]
    assert spec.options_as(OpenAIOptions).session_header == "X-OpenClaw-Session"
    default = parse_config(ECHO_ONLY.replace("{kind: echo}", "{kind: openai, url: 'http://h'}"),
                           environ={})
    assert default.upstreams["demo"].options_as(OpenAIOptions).session_header is None


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("session_header: X Session", "not a valid header name"),
        ("session_header: 3", "expected a string, got a number"),
        ("session_header: Authorization",
         "'Authorization' cannot carry the session: the proxy sets it or it carries a key"),
        ("session_header: x-session-id\n    forward_headers: [X-Session-Id]",
         "'x-session-id' is also in forward_headers; the session header is set by the proxy, "
         "so list it in one place only"),
        ("session_header: X-S\n    headers: {x-s: fixed}",
         "'X-S' is also in headers; the session header is set by the proxy, so list it in one "
         "place only"),
    ],
    ids=["not-a-token", "not-a-string", "proxy-owned", "also-forwarded", "also-fixed"],
)
def test_session_header_problems(line: str, expected: str) -> None:
    text = (
        f"upstreams:\n  v:\n    kind: openai\n    url: http://h/v1\n    {line}\n"
        "models:\n  m: {upstream: v}\n"
    )
    assert problems(text) == [f"routes.yaml:5 upstreams.v.session_header: {expected}"]


def test_a_key_of_another_kind_is_not_used_by_this_one() -> None:
    text = (
        "upstreams:\n  l:\n    kind: letta\n    url: http://h:8283\n"
        "    forward_headers: [X-Session-Id]\n    session_header: X-S\n"
        "models:\n  a: {upstream: l, agent: bot}\n"
    )
    assert problems(text) == [
        "routes.yaml:5 upstreams.l.forward_headers: not used by kind letta",
        "routes.yaml:6 upstreams.l.session_header: not used by kind letta",
    ]


def test_a_registered_kind_gets_its_keys_checked_without_schema_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What adding a kind takes: a declaration in the registry, nothing else.
    from proxy.config.kind import KindDeclaration
    from proxy.config.reader import Block, Reader
    from proxy.config.specs import RouteFields
    from proxy.upstreams import kinds

    def read_options(reader: Reader, upstream: Block) -> str | None:
        if "flavour" not in upstream:
            return None
        node = upstream.node("flavour")
        return reader.choice(node, upstream.at("flavour"), ("sweet", "sour"))

    def read_route(
        reader: Reader, route: Block, *, wildcard: bool, upstreams: tuple[UpstreamSpec, ...]
    ) -> RouteFields:
        reader.require(route, "flow", " (the flow's id)")
        flow = reader.string(route.node("flow"), route.at("flow")) if "flow" in route else None
        return RouteFields(options=(flow, tuple(u.name for u in upstreams)))

    demo = KindDeclaration(
        name="flows", keys=("url", "api_key"), url_example="http://127.0.0.1:9000",
        option_keys=("flavour",), read_options=read_options, route_keys=("flow",),
        read_route=read_route, stateful=True, mixable=False,
    )
    monkeypatch.setitem(kinds.KINDS, "flows", demo)
    good = (
        "upstreams:\n  f:\n    kind: flows\n    url: http://h:9000\n    flavour: sour\n"
        "models:\n  m: {upstream: f, flow: abc}\n"
    )
    config = parse_config(good, environ={})
    assert config.upstreams["f"].options == "sour"
    assert config.models[0].options == ("abc", ("f",))
    bad = (
        "upstreams:\n  f:\n    kind: flows\n    flavour: salty\n    timeouts: {}\n"
        "  v: {kind: openai, url: 'http://h/v1'}\n"
        "models:\n  m: {upstream: [f, v], model: x}\n  n: {upstream: v, flow: abc}\n"
    )
    assert problems(bad) == [
        "routes.yaml:2 upstreams.f: missing required key 'url' (the server's base URL, "
        "e.g. http://127.0.0.1:9000)",
        "routes.yaml:4 upstreams.f.flavour: expected sweet or sour, got 'salty'",
        "routes.yaml:5 upstreams.f.timeouts: not used by kind flows",
        "routes.yaml:8 models.m.upstream: a route to flows upstreams cannot also list "
        "upstreams of another kind",
        "routes.yaml:8 models.m.model: 'model' is only for routes to openai, custom or echo "
        "upstreams",
        "routes.yaml:8 models.m: missing required key 'flow' (the flow's id)",
        "routes.yaml:9 models.n.flow: 'flow' is only for routes to flows upstreams",
    ]


# -- reading the file: bounded in size and time (issue 13, item 4) ---------------------------


def test_a_file_over_the_size_limit_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(ECHO_ONLY)
    with path.open("r+b") as file:
        file.truncate(MAX_BYTES + 1)  # sparse: nothing written, nothing to read
    with pytest.raises(TooLarge) as info:
        load_config(path, environ={})
    assert info.value.strerror == "the file is larger than 4 MiB, the limit for a routes file"


def test_a_device_that_never_ends_is_read_only_up_to_the_limit(tmp_path: Path) -> None:
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero here")
    path = tmp_path / "routes.yaml"
    path.symlink_to("/dev/zero")
    with pytest.raises(TooLarge):
        load_config(path, environ={})


def test_a_fifo_without_a_writer_times_out(tmp_path: Path) -> None:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    path = tmp_path / "routes.yaml"
    os.mkfifo(path)
    with pytest.raises(TimeoutError) as info:
        load_config(path, environ={}, timeout=0.05)
    assert "not read to its end within 0.05 s" in str(info.value.strerror)


def test_a_fifo_that_trickles_times_out_in_all_not_per_chunk(tmp_path: Path) -> None:
    # The timeout was per chunk: a writer sending a byte every 0.05 s held the read (a reload,
    # the start) for as long as it liked.
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    path = tmp_path / "routes.yaml"
    os.mkfifo(path)
    stop = threading.Event()

    def trickle() -> None:
        deadline = time.monotonic() + 10
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:  # ENXIO: the reader has not opened it yet
                stop.wait(0.01)
        else:
            return
        try:
            while not stop.wait(0.05) and time.monotonic() < deadline:
                os.write(fd, b"#")
        except BrokenPipeError:
            pass
        finally:
            os.close(fd)

    writer = threading.Thread(target=trickle, daemon=True)
    writer.start()
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError) as info:
            read_source(path, timeout=0.5)
        assert time.monotonic() - started < 5
    finally:
        stop.set()
        writer.join(10)
    assert "not read to its end within 0.5 s" in str(info.value.strerror)


def test_a_file_at_the_size_limit_is_read(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    padding = "#" * 99 + "\n"
    text = ECHO_ONLY + padding * ((MAX_BYTES - len(ECHO_ONLY)) // len(padding))
    text += "#" * (MAX_BYTES - len(text) - 1) + "\n"
    path.write_text(text)
    assert path.stat().st_size == MAX_BYTES
    assert [m.name for m in load_config(path, environ={}).models] == ["echo"]
def test_responses_native_parses_for_openai_and_defaults_to_translate() -> None:
    config = parse_config(
        "upstreams:\n"
        "  vllm: {kind: openai, url: 'http://127.0.0.1:8000/v1', responses: native}\n"
        "  lms: {kind: openai, url: 'http://127.0.0.1:1234/v1'}\n"
        "  explicit: {kind: openai, url: 'http://127.0.0.1:1235/v1', responses: translate}\n"
        "models:\n  m: {upstream: vllm}\n",
        "routes.yaml", {},
    )
    modes = [
        config.upstreams[n].options_as(OpenAIOptions).responses
        for n in ("vllm", "lms", "explicit")
    ]
    assert modes == [
        "native", "translate", "translate"]


@pytest.mark.parametrize(
    ("upstream", "expected"),
    [
        pytest.param(
            "{kind: openai, url: 'http://127.0.0.1:8000/v1', responses: nativ}",
            "routes.yaml:3 upstreams.vllm.responses: expected 'native' (relay /v1/responses to "
            "the upstream's own /responses) or 'translate' (the default), got 'nativ'",
            id="unknown-mode",
        ),
        pytest.param(
            "{kind: openai, url: 'http://127.0.0.1:8000/v1', responses: true}",
            "routes.yaml:3 upstreams.vllm.responses: expected a string, got a boolean",
            id="not-a-string",
        ),
        pytest.param(
            "{kind: letta, url: 'http://127.0.0.1:8283', responses: native}",
            "routes.yaml:3 upstreams.vllm.responses: not used by kind letta",
            id="letta",
        ),
        pytest.param(
            "{kind: echo, responses: native}",
            "routes.yaml:3 upstreams.vllm.responses: not used by kind echo",
            id="echo",
        ),
    ],
)
def test_responses_key_is_checked_with_file_and_line(upstream: str, expected: str) -> None:
    text = (
        f"upstreams:\n  other: {{kind: echo}}\n  vllm: {upstream}\n"
        "models:\n  m: {upstream: other}\n"
    )
    assert problems(text) == [expected]
