"""The access log: one line per request as `agentproxy serve` writes it (text and JSON), the
level rules, the same content without the CLI's writer, and nothing a client can forge."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from io import StringIO
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.access_log import AccessWriter, install, log_exchange
from proxy.logs import JsonFormatter, TextFormatter
from proxy.metrics import Exchange
from tests.conftest import KEY, ProxyFactory, wait_for
from tests.fake_openai import FakeOpenAI

ROOT = Path(__file__).resolve().parent.parent
ECHO_ONLY = "upstreams: {demo: {kind: echo}}\nmodels: {echo: {upstream: demo}}\n"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "my diary says the launch code is 0000"
# A path that, written raw, would clear the screen, return the cursor and then print a line
# that looks like the proxy's own.
FORGED_PATH = (
    "/v1/models/x%1b%5b2J%0d2026-01-01%2000:00:00,000%20INFO%20agentproxy.access:"
    "%20GET%20/forged%20status=200"
)
FORGED_DECODED = (
    "/v1/models/x\x1b[2J\r2026-01-01 00:00:00,000 INFO agentproxy.access: GET /forged status=200"
)
# asctime, level, the logger, method, path (a token or a JSON string), then key=value fields.
TEXT_LINE = re.compile(
    r'\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|DEBUG) agentproxy\.access: ([A-Z]+) '
    r'("(?:[^"\\]|\\.)*"|[^ "]+) (.*)'
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)


@asynccontextmanager
async def serve(tmp_path: Path, *args: str) -> AsyncIterator[tuple[str, Path]]:
    """`python -m proxy serve *args` as a user starts it; yields its URL and its log once it
    answers, and stops it with SIGTERM (so the log is complete) when the block ends."""
    routes, log = tmp_path / "routes.yaml", tmp_path / "serve.log"
    routes.write_text(ECHO_ONLY)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTPROXY_")}
    env["AGENTPROXY_API_KEYS"] = KEY
    proc = start(
        [sys.executable, "-m", "proxy", "serve", "--routes", str(routes),
         "--host", "127.0.0.1", "--port", str(port), *args], log, env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as http:
            while True:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "the proxy did not answer"
                try:
                    # Not a probe path: that would add lines the tests count.
                    async with http.get(url + "/v1/models", headers=AUTH) as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
        yield url, log
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def access_lines(raw: bytes, fmt: str) -> list[dict[str, Any]]:
    """The access lines of a log, each as {level, method, path, and its fields}."""
    out: list[dict[str, Any]] = []
    for line in raw.decode().split("\n"):
        if fmt == "json":
            if not line.startswith("{"):
                continue
            entry = json.loads(line)
            if entry["logger"] != "agentproxy.access":
                continue
            method, path = entry.pop("msg").split(" ", 1)
            out.append({**entry, "method": method, "path": path})
        elif " agentproxy.access: " in line:
            m = TEXT_LINE.fullmatch(line)
            assert m, line
            level, method, path, rest = m.groups()
            if path.startswith('"'):
                path = json.loads(path)
            fields: dict[str, Any] = dict(kv.split("=", 1) for kv in rest.split(" "))
            out.append({"level": level.lower(), "method": method, "path": path, **fields})
    return out


async def some_requests(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            url + "/v1/chat/completions",
            json={"model": "echo", "messages": [{"role": "user", "content": PROMPT}]},
            headers={**AUTH, "X-Request-Id": "req-from-client"},
        ) as resp:
            assert resp.status == 200
        for probe in ("/healthz", "/readyz", "/metrics"):
            async with http.get(url + probe) as resp:
                assert resp.status == 200


LEVEL_RULES = [
    pytest.param("text", "info", {"/v1/chat/completions": "info"}, id="text-info-no-probes"),
    pytest.param(
        "json", "debug",
        {"/v1/chat/completions": "info", "/healthz": "debug", "/readyz": "debug",
         "/metrics": "debug"},
        id="json-debug-probes-at-debug",
    ),
    pytest.param("text", "warning", {}, id="warning-writes-none"),
]


@pytest.mark.parametrize(("fmt", "level", "expected"), LEVEL_RULES)
async def test_serve_writes_one_access_line_per_request_by_the_level_rules(
    tmp_path: Path, fmt: str, level: str, expected: dict[str, str]
) -> None:
    async with serve(tmp_path, "--log-format", fmt, "--log-level", level) as (url, log):
        await some_requests(url)
    raw = log.read_bytes()
    # The readiness requests of `serve` above went to /v1/models: leave them out.
    lines = [e for e in access_lines(raw, fmt) if e["path"] != "/v1/models"]
    assert {e["path"]: e["level"] for e in lines} == expected
    assert len(lines) == len(expected)
    assert KEY.encode() not in raw and PROMPT.encode() not in raw
    if not expected:
        return
    chat = next(e for e in lines if e["path"] == "/v1/chat/completions")
    assert chat["method"] == "POST"
    assert chat["request_id"] == "req-from-client"
    assert str(chat["status"]) == "200"
    assert str(chat["model"]) == "echo" and str(chat["upstream"]) == "demo"
    assert str(chat["stream"]).lower() == "false"
    assert float(chat["duration_ms"]) > 0 and int(chat["bytes"]) > 0
    assert "ttft_ms" in chat


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_a_control_character_in_the_path_cannot_forge_a_line(
    tmp_path: Path, fmt: str
) -> None:
    async with serve(tmp_path, "--log-format", fmt) as (url, log):
        port = int(url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"GET {FORGED_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 404 "), answer[:200]
    raw = log.read_bytes()
    assert b"\x1b" not in raw and b"\r" not in raw
    assert not any(line.startswith(b"2026-01-01 00:00:00,000") for line in raw.split(b"\n"))
    forged = [e for e in access_lines(raw, fmt) if e["path"].startswith("/v1/models/x")]
    # The path is all there, escaped, on the one line of its request.
    assert [e["path"] for e in forged] == [FORGED_DECODED]
    assert str(forged[0]["status"]) == "404"


async def test_a_control_character_in_the_path_is_quoted_in_a_logging_record_too(
    make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Without the CLI's writer (the app embedded elsewhere) lines are `logging` records."""
    caplog.set_level(logging.INFO, logger="agentproxy.access")
    proxy = await make_proxy(ECHO_ONLY)
    async with aiohttp.ClientSession() as http, http.get(
        proxy.url + FORGED_PATH.replace("%5b", "["), headers=AUTH
    ) as resp:
        assert resp.status == 404
    [record] = [r for r in caplog.records if r.name == "agentproxy.access"]
    line = TextFormatter().format(record)
    assert line.isprintable()
    assert json.loads(line.split(" ", 5)[5].split(" request_id=")[0]) == FORGED_DECODED


@pytest.fixture
def writer(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[str], StringIO]]:
    """Installs the CLI's writer on a buffer, as `setup_logging` does on stderr."""
    caplog.set_level(logging.INFO, logger="agentproxy.access")

    def to_buffer(fmt: str) -> StringIO:
        buffer = StringIO()
        install(AccessWriter(buffer, fmt))
        return buffer

    yield to_buffer
    install(None)


async def test_the_writer_writes_the_line_soon_after_the_request_without_a_flush(
    make_proxy: ProxyFactory, writer: Callable[[str], StringIO],
    caplog: pytest.LogCaptureFixture,
) -> None:
    buffer = writer("text")
    proxy = await make_proxy(ECHO_ONLY)
    reply = await proxy.client().chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].message.content == "hi"
    await wait_for(lambda: "POST /v1/chat/completions" in buffer.getvalue())
    assert len(access_lines(buffer.getvalue().encode(), "text")) == 1
    # The writer took the line: no logging record was made for it.
    assert not [r for r in caplog.records if r.name == "agentproxy.access"]


def exchange(**values: Any) -> Exchange:
    ex = Exchange(0.0, "req_5d41402abc4b2a7600000001")
    for name, value in values.items():
        setattr(ex, name, value)
    return ex


EXCHANGES = [
    pytest.param("/healthz", exchange(status=200), id="not-chat"),
    pytest.param(
        "/v1/chat/completions",
        exchange(chat=True, stream=True, model="mistral", upstream="vllm", status=200,
                 ttft=0.01234),
        id="stream",
    ),
    pytest.param(
        "/v1/chat/completions",
        exchange(chat=True, model="a model=x\nINFO", upstream="u", status=502,
                 error="upstream_error"),
        id="hostile-model-and-an-error",
    ),
    pytest.param(
        "/v1/x%s%d%%",
        exchange(chat=True, model="m%s%(x)s", upstream="u%d", status=404,
                 request_id="a=b%s"),
        id="percent-signs-and-a-quoted-request-id",
    ),
]


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize(("path", "ex"), EXCHANGES)
def test_the_writer_gives_the_line_the_logging_formatters_give(
    writer: Callable[[str], StringIO], fmt: str, path: str, ex: Exchange
) -> None:
    """The CLI's writer skips `logging`, not content: past the timestamp its line is the one
    the proxy's formatter makes of the record written without it."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("agentproxy.access")
    logger.addHandler(handler)
    try:
        log_exchange(ex.request_id, "POST", path, ex, 0.0405, 2315)
        buffer = writer(fmt)
        log_exchange(ex.request_id, "POST", path, ex, 0.0405, 2315)
    finally:
        logger.removeHandler(handler)
    [record] = records
    written = buffer.getvalue()
    assert written.endswith("\n") and written.count("\n") == 1
    if fmt == "json":
        mine, theirs = json.loads(written), json.loads(JsonFormatter().format(record))
        assert mine.pop("ts")[:-5] == theirs.pop("ts")[:-5]  # the same second, give or take
        assert mine == theirs
    else:
        mine_text, theirs_text = written.rstrip("\n"), TextFormatter().format(record)
        assert mine_text.split(" ", 2)[2] == theirs_text.split(" ", 2)[2]
        assert mine_text.isprintable()


@pytest.mark.parametrize("stream", [False, True])
async def test_a_client_that_leaves_while_the_upstream_works_is_logged_against_it(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI, caplog: pytest.LogCaptureFixture,
    stream: bool,
) -> None:
    """The upstream a request was waiting for is on its line (and its metrics) even when
    the client left before any answer: a 499 against `up`, not against no upstream."""
    caplog.set_level(logging.INFO, logger="agentproxy.access")
    fake_openai.mode = "hang"
    proxy = await make_proxy(
        f"upstreams: {{up: {{kind: openai, url: '{fake_openai.url}/v1'}}}}\n"
        "models: {m: {upstream: up}}\n"
    )
    async with aiohttp.ClientSession() as http:
        request = asyncio.create_task(http.post(
            proxy.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
            json={"model": "m", "stream": stream, "messages": [{"role": "user", "content": "x"}]},
        ))
        await wait_for(lambda: bool(fake_openai.received))
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
    await wait_for(lambda: any(r.name == "agentproxy.access" for r in caplog.records))
    [line] = [vars(r) for r in caplog.records if r.name == "agentproxy.access"]
    assert (line["status"], line["upstream"], line["error"]) == (499, "up", "client_closed")
