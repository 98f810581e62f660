"""`agentproxy check` and `check --probe` on custom upstreams, as a user runs them: real
processes, `routes.yaml:LINE path: message` lines, the exit status.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from aiohttp import web

from proxy.config import parse_config
from tests.conftest import closed_port, serving
from tests.custom_e2e import API_IDS, APIS, ENV, LANGFLOW, LANGGRAPH, Api, routes_for
from tests.fake_agents import FakeLangflow, FakeLangGraph

ROOT = Path(__file__).resolve().parent.parent

BROKEN = """\
upstreams:
  bad-mode:
    kind: custom
    url: http://127.0.0.1:9
    mode: sync
    request: {path: /chat, body: {q: "{{ input }}", s: "{{ session.key }}"}}
    stream: {framing: sse, rules: [{text: t}]}
  bad-path:
    kind: custom
    url: http://127.0.0.1:9
    mode: stream
    request: {path: "/a/../b", body: {q: "{{ input }}", s: "{{ session.key }}"}}
    stream: {framing: sse, rules: [{text: "choices[0.delta"}]}
  no-text:
    kind: custom
    url: http://127.0.0.1:9
    mode: stream
    request: {path: /chat, body: {q: "{{ input }}", s: "{{ session.key }}"}}
    stream:
      framing: ndjson
      rules:
        - {when: {type: done}, end: true}
  placeholders:
    kind: custom
    url: http://127.0.0.1:9
    mode: stream
    request: {path: "/chat/{{ sesion.id }}", body: {q: "{{ input }}"}}
    stream:
      framing: jsonl
      rules:
        - {when: {type: delta}, text: content, recap: true, cumulative: true}
        - {when: {type: err}, error: message, end: true}
    cancel: {method: GET, path: /stop, body: {id: "{{ captured.run }}"}}
  carries:
    kind: custom
    url: http://127.0.0.1:9
    mode: sync
    request: {path: /chat, body: {q: "{{ input }}"}}
    sync: {text: answer}
    session: {carry: marker}
models:
  a: {upstream: bad-mode}
  b: {upstream: bad-path}
  c: {upstream: no-text}
  d: {upstream: placeholders}
  e: {upstream: carries}
  f: {upstream: bad-mode, agent: x}
"""

BROKEN_LINES = [
    "routes.yaml:2 upstreams.bad-mode: missing required key 'sync' (`mode: sync` always calls "
    "the upstream without streaming)",
    "routes.yaml:12 upstreams.bad-path.request.path: `.` and `..` segments are not allowed in "
    "a path",
    "routes.yaml:13 upstreams.bad-path.stream.rules[0].text: 'choices[0.delta': the `[` at "
    "column 8 is not closed",
    "routes.yaml:22 upstreams.no-text.stream.rules: no rule has `text`: the stream would never "
    "carry the answer",
    "routes.yaml:27 upstreams.placeholders.request.path: unknown placeholder "
    "`{{ sesion.id }}`; did you mean `{{ session.id }}`?",
    "routes.yaml:29 upstreams.placeholders.stream.framing: 'jsonl' is not one of sse, ndjson, "
    "text; did you mean 'ndjson'?",
    "routes.yaml:31 upstreams.placeholders.stream.rules[0].recap: `cumulative` and `recap` "
    "exclude each other: `recap` repeats the deltas, `cumulative` is the text so far",
    "routes.yaml:32 upstreams.placeholders.stream.rules[1].error: an `error` rule ends the "
    "stream with that error; move `end` to a rule of its own",
    "routes.yaml:33 upstreams.placeholders.cancel.body.id: `{{ captured.run }}`: no stream rule "
    "captures `run` (add `capture: {run: <path>}` to a rule)",
    "routes.yaml:33 upstreams.placeholders.cancel.body: a GET request sends no body",
    "routes.yaml:40 upstreams.carries.session.carry: `carry: marker` is not supported yet; use "
    "`lookup` (the server finds the session by its owner) or `from_response` (remembered per "
    "worker for `cache` seconds)",
    "routes.yaml:47 models.f.agent: 'agent' is only for routes to letta upstreams",
]


def check(tmp_path: Path, text: str, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "routes.yaml").write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check", *args, "routes.yaml"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env={**os.environ, **ENV},
    )


def test_check_reports_every_problem_of_broken_custom_blocks_on_its_line(
    tmp_path: Path,
) -> None:
    done = check(tmp_path, BROKEN)
    assert done.returncode == 1
    assert done.stdout.splitlines() == BROKEN_LINES


@pytest.mark.parametrize(
    ("where", "value"),
    [
        pytest.param("body: {token: ", "'${CLI_TOKEN} {{ input'}", id="unclosed-placeholder"),
        pytest.param("path: ", "'/a/${CLI_TOKEN}/../b'", id="dot-segment"),
    ],
)
def test_a_template_problem_never_repeats_a_value_that_may_hold_a_secret(
    tmp_path: Path, where: str, value: str
) -> None:
    (tmp_path / "routes.yaml").write_text(
        "upstreams:\n"
        "  flows:\n"
        "    kind: custom\n"
        "    url: http://127.0.0.1:9\n"
        f"    request: {{{where}{value}}}\n"
        "    sync: {text: answer}\n"
        "models:\n"
        "  f: {upstream: flows}\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "check", "routes.yaml"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**os.environ, "CLI_TOKEN": "tok-SUPERSECRET-123"},
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "upstreams.flows.request." in done.stdout
    assert "SUPERSECRET" not in done.stdout + done.stderr


def test_check_prints_the_warnings_of_a_custom_block_and_passes(tmp_path: Path) -> None:
    done = check(tmp_path, """\
upstreams:
  forgetful:
    kind: custom
    url: http://127.0.0.1:9
    mode: stream
    request: {path: /chat, body: {q: "{{ input }}"}}
    stream:
      framing: ndjson
      rules: [{text: delta}]
models:
  m: {upstream: forgetful}
""")
    assert done.returncode == 0, done.stdout
    assert done.stdout.splitlines()[:2] == [
        "routes.yaml:6 upstreams.forgetful.request: the request sends no session placeholder "
        "and no `{{ history }}`/`{{ messages }}`: the agent sees each message without the ones "
        "before it (no memory) (warning)",
        "routes.yaml:9 upstreams.forgetful.stream.rules: no rule has `end` or `error`: a "
        "truncated or failed stream will look like a complete answer (warning)",
    ]


@pytest.mark.parametrize("api", APIS, ids=API_IDS)
def test_check_accepts_each_worked_config(api: Api, tmp_path: Path) -> None:
    done = check(tmp_path, routes_for(api, "http://127.0.0.1:9"))
    assert done.returncode == 0, done.stdout
    assert done.stdout.startswith("routes.yaml: ok (1 upstreams, 1 models"), done.stdout


def test_the_shipped_custom_example_loads_when_uncommented() -> None:
    lines = (ROOT / "routes.yaml").read_text().splitlines()
    upstream = _commented_block(lines, "  # flowise:")
    route = _commented_block(lines, "  # helpdesk:")
    text = f"upstreams:\n{upstream}\nmodels:\n{route}\n"
    config = parse_config(text, environ={})
    assert config.warnings == ()
    assert yaml.safe_load(text)["upstreams"]["flowise"]["kind"] == "custom"
    assert [m.model for m in config.models] == ["2f61e105-efe9-4c8c-ab96-77c3a02d376d"]


def _commented_block(lines: list[str], first: str) -> str:
    start = next(i for i, line in enumerate(lines)
                 if line == first or line.startswith(first + " "))
    block = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith("  #   "):
            break
        block.append(line)
    return "\n".join("  " + line[4:] for line in block)


# -- check --probe ---------------------------------------------------------------------------------


async def probe(tmp_path: Path, text: str) -> tuple[int, list[str]]:
    (tmp_path / "routes.yaml").write_text(text)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "check", "--probe", "routes.yaml", cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **ENV},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode().splitlines()


async def test_probe_runs_the_models_request_where_the_block_has_one(tmp_path: Path) -> None:
    fake = FakeLangGraph()
    async with serving(fake.app()) as url:
        code, out = await probe(tmp_path, routes_for(LANGGRAPH, url))
    assert code == 0, out
    assert [(r.method, r.path, r.json) for r in fake.requests] == [
        ("POST", "/assistants/search", {"limit": 100})]


async def test_probe_gets_the_url_where_the_block_has_no_models_request(tmp_path: Path) -> None:
    # Langflow serves nothing at /api/v1: a 404 still says the server is there.
    async with serving(FakeLangflow().app()) as url:
        code, out = await probe(tmp_path, routes_for(LANGFLOW, url))
    assert code == 0, out


async def test_probe_reports_an_upstream_that_is_not_there(tmp_path: Path) -> None:
    port = closed_port()
    code, out = await probe(tmp_path, routes_for(LANGFLOW, f"http://127.0.0.1:{port}"))
    assert code == 1
    assert len(out) == 1 and out[0].startswith(
        f"routes.yaml:2 upstreams.langflow: Upstream 'langflow' is unavailable: cannot connect "
        f"to 127.0.0.1:{port}")


async def test_probe_reports_a_server_error_and_a_refused_models_request(
    tmp_path: Path,
) -> None:
    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=503, text="down")

    async def refused(request: web.Request) -> web.Response:
        return web.json_response({"detail": "Invalid API key"}, status=401)

    app = web.Application()
    app.router.add_get("/api/v1", broken)
    app.router.add_post("/assistants/search", refused)
    async with serving(app) as url:
        (tmp_path / "a").mkdir()
        code, out = await probe(tmp_path / "a", routes_for(LANGFLOW, url))
        assert (code, out) == (1, [
            "routes.yaml:2 upstreams.langflow: Upstream 'langflow' answered a GET of its url "
            "with HTTP 503."])
        code, out = await probe(tmp_path, routes_for(LANGGRAPH, url))
    assert (code, out) == (1, [
        "routes.yaml:2 upstreams.langgraph: Upstream 'langgraph' refused the proxy's "
        "credentials (HTTP 401)."])
