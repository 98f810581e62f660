"""The `agentproxy` command as a user runs it: real processes, real sockets."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).parent / "agentproxy"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check", *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )


def test_check_accepts_the_shipped_routes_file() -> None:
    done = run_check("routes.yaml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "routes.yaml: ok" in done.stdout


def test_check_prints_file_line_path_and_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "routes.yaml"
    bad.write_text("upstreams:\n  demo: {kind: echo}\nmodels:\n  m:\n    upstream: nowhere\n")
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "check", "routes.yaml"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert done.returncode == 1
    assert re.match(r"routes\.yaml:5 models\.m\.upstream: ", done.stdout), done.stdout


def test_check_reports_a_missing_file() -> None:
    done = run_check("does-not-exist.yaml")
    assert done.returncode == 1
    assert "does-not-exist.yaml" in done.stdout


NEWLINE_KEY_ROUTES = """\
upstreams:
  vllm:
    kind: openai
    url: http://127.0.0.1:9/v1
    api_key: ${UPSTREAM_KEY}
models:
  m:
    upstream: vllm
"""


@pytest.mark.parametrize("probe", [False, True], ids=["check", "check-probe"])
def test_check_refuses_an_api_key_whose_variable_ends_with_a_newline(
    tmp_path: Path, probe: bool
) -> None:
    # The usual way in: `export KEY=$(cat key.txt)` keeps the file's last newline, and every
    # request then failed with a 500 while `check` said ok and `check --probe` crashed.
    (tmp_path / "routes.yaml").write_text(NEWLINE_KEY_ROUTES)
    env = {**os.environ, "UPSTREAM_KEY": "sk-upstream-secret\n"}
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "check", *(["--probe"] if probe else []), "routes.yaml"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout == (
        "routes.yaml:5 upstreams.vllm.api_key: environment variable UPSTREAM_KEY ends with a "
        "line break; a credential cannot contain control characters\n"
    )
    assert done.stderr == ""
    assert "secret" not in done.stdout


def test_check_refuses_a_routes_file_over_4_mib(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    with path.open("wb") as file:
        file.truncate((4 << 20) + 1)
    done = run_check(str(path))
    assert done.returncode == 1
    assert done.stdout == (
        f"{path}: cannot read the file: the file is larger than 4 MiB, the limit for a routes "
        "file\n"
    )


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int, Path]]:
    port = free_port()
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "AGENTPROXY_API_KEYS"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(SCRIPT), "serve", "--port", str(port)],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True, env=env,
        )
    try:
        yield proc, port, log
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


async def wait_healthy(port: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "serve exited"
            try:
                async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError("no answer on /healthz")


async def test_serve_prints_a_generated_key_and_requires_it(
    served: tuple[subprocess.Popen[str], int, Path],
) -> None:
    proc, port, log = served
    await wait_healthy(port, proc)
    key_match = re.search(r"sk-[A-Za-z0-9_-]{32}", log.read_text())
    assert key_match, log.read_text()
    key = key_match.group(0)
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/v1/models") as resp:
            assert resp.status == 401
        async with http.get(base + "/v1/models", headers={"Authorization": f"Bearer {key}"}) as r:
            assert r.status == 200
            assert [m["id"] for m in (await r.json())["data"]] == ["echo"]
        async with http.post(
            base + "/v1/chat/completions",
            json={"model": "echo", "messages": [{"role": "user", "content": "hi cli"}]},
            headers={"Authorization": f"Bearer {key}"},
        ) as r:
            assert (await r.json())["choices"][0]["message"]["content"] == "hi cli"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def test_python_dash_m_proxy_runs_the_same_cli() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0
    assert "serve" in done.stdout and "check" in done.stdout


@pytest.mark.parametrize(
    ("name", "value"),
    [
        # What Kubernetes sets for a Service named agentproxy (service links).
        ("PORT", "tcp://10.0.0.1:8080"),
        ("PORT", "99999"),
        ("WORKERS", "two"),
        ("WORKERS", "0"),
        ("SEND_TIMEOUT", "nan"),
        ("HEADER_TIMEOUT", "-1"),
        ("MAX_CONNECTIONS", "-5"),
        ("LOG_LEVEL", "verbose"),
    ],
)
def test_a_bad_environment_value_is_an_error_naming_it_and_leaves_check_alone(
    name: str, value: str
) -> None:
    env = {**os.environ, f"AGENTPROXY_{name}": value}
    served = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--routes", "routes.yaml"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=env,
    )
    assert served.returncode == 2, served.stderr
    assert f"AGENTPROXY_{name}" in served.stderr
    assert "Traceback" not in served.stderr
    checked = subprocess.run(
        [sys.executable, "-m", "proxy", "check", "routes.yaml"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=env,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_an_empty_host_variable_keeps_the_loopback_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from proxy.cli import _parser

    monkeypatch.setenv("AGENTPROXY_HOST", "")
    monkeypatch.setenv("AGENTPROXY_PORT", "")
    args = _parser().parse_args(["serve"])
    assert (args.host, args.port) == ("127.0.0.1", 8080)


ROUTES_V = (
    "upstreams:\n  v:\n    kind: openai\n    url: {url}\n{extra}models:\n  m: {{upstream: v}}\n"
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (ROUTES_V.format(url="http://h/v1", extra="") + "auth: " + "[" * 1000 + "]" * 1000,
         "routes.yaml:7 (file): invalid YAML: nested more than 100 levels deep"),
        (ROUTES_V.format(url="http://h/v1", extra="    circuit: {failures: " + "9" * 5000 + "}\n"),
         "routes.yaml:5 upstreams.v.circuit.failures: a number cannot be longer than 100 "
         "characters"),
        (ROUTES_V.format(url="http://h/v1", extra="    timeouts: {connect: " + "9" * 400 + "}\n"),
         "routes.yaml:5 upstreams.v.timeouts.connect: a number cannot be longer than 100 "
         "characters"),
        (ROUTES_V.format(url='"http://[x"', extra=""),
         "routes.yaml:4 upstreams.v.url: the host in [brackets] is not a valid IPv6 address"),
    ],
    ids=["nesting", "int-of-5000-digits", "timeout-of-400-digits", "ipv6-url"],
)
def test_check_and_serve_report_a_hostile_routes_file_on_its_line(
    tmp_path: Path, text: str, expected: str
) -> None:
    # Each was a traceback (RecursionError, ValueError, OverflowError) from both commands.
    (tmp_path / "routes.yaml").write_text(text)
    checked = subprocess.run(
        [sys.executable, "-m", "proxy", "check", "routes.yaml"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert checked.returncode == 1, checked.stderr
    assert checked.stdout == expected + "\n"
    assert checked.stderr == ""
    served = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--routes", "routes.yaml", "--port", "0"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert served.returncode == 1
    assert "Traceback" not in served.stderr
    assert served.stderr.endswith(f"agentproxy: routes.yaml is not valid:\n  {expected}\n")


def serve_briefly(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AGENTPROXY_API_KEYS": "sk-cli-test-key"}
    return subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--routes", "routes.yaml", *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=env,
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_on_a_port_in_use_says_so_in_one_line_and_fails(workers: int) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = serve_briefly("--port", str(port), "--workers", str(workers))
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    line = f"agentproxy: cannot listen on 127.0.0.1:{port}: Address already in use"
    # One line a worker that tried the port: the first to fail has the others stopped.
    assert 1 <= done.stderr.count(line + "\n") <= workers, done.stderr


def test_serve_on_an_address_of_another_host_says_so_in_one_line_and_fails() -> None:
    # 192.0.2.1 (TEST-NET-1) is no address of this host; nothing is sent anywhere.
    done = serve_briefly("--host", "192.0.2.1", "--port", "0")
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.endswith(
        "agentproxy: cannot listen on 192.0.2.1:0: Cannot assign requested address\n"
    )


def serve_from_a_pipe(port: int, log: Path, workers: int = 1) -> subprocess.Popen[str]:
    """`agentproxy serve --routes <(cat routes.yaml)`, as a shell runs it."""
    read_end, write_end = os.pipe()
    os.write(write_end, (ROOT / "routes.yaml").read_bytes())
    os.close(write_end)
    env = {**os.environ, "AGENTPROXY_API_KEYS": "sk-cli-test-key"}
    try:
        with log.open("w") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "proxy", "serve", "--routes", f"/dev/fd/{read_end}",
                 "--port", str(port), "--reload-interval", "0.02", "--workers", str(workers)],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True, env=env,
                pass_fds=(read_end,),
            )
    finally:
        os.close(read_end)


@pytest.mark.parametrize("workers", [1, 2])
async def test_serve_reads_routes_from_a_pipe_once_and_keeps_serving(
    tmp_path: Path, workers: int
) -> None:
    # The file was read twice, so the second read found the pipe empty and serve crashed; and
    # polling it would read nothing again. `--workers` children, other processes, cannot see
    # the parent's /dev/fd/N at all: polled, it read as a missing file.
    port = free_port()
    log = tmp_path / "serve.log"
    proc = serve_from_a_pipe(port, log, workers)
    try:
        await wait_healthy(port, proc)
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            # Fifty poll intervals: a poll of the drained pipe would have read it as empty.
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                async with http.get(url + "/readyz") as resp:
                    ready = await resp.json()
                assert resp.status == 200 and ready["last_error"] is None, ready
                await asyncio.sleep(0.05)
            async with http.get(url + "/v1/models",
                                headers={"Authorization": "Bearer sk-cli-test-key"}) as resp:
                assert [m["id"] for m in (await resp.json())["data"]] == ["echo"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def serve_from_a_fifo(fifo: Path, port: int, log: Path) -> tuple[subprocess.Popen[str], int]:
    """`serve` held in its start, reading routes from a FIFO; returns it and the FIFO's
    writing end, open (closing it is the end of the file)."""
    os.mkfifo(fifo)
    env = {**os.environ, "AGENTPROXY_API_KEYS": "sk-cli-test-key"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--routes", str(fifo), "--port", str(port)],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True, env=env,
        )
    deadline = time.monotonic() + 20
    while True:
        # A writer can open a FIFO without blocking only once its reader has it open.
        try:
            return proc, os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "serve never opened the routes file"
            time.sleep(0.01)


async def test_sighup_while_starting_does_not_end_serve(tmp_path: Path) -> None:
    # SIGHUP's default action killed the process before its handler was installed.
    port, fifo, log = free_port(), tmp_path / "routes.yaml", tmp_path / "serve.log"
    proc, writer = serve_from_a_fifo(fifo, port, log)
    try:
        proc.send_signal(signal.SIGHUP)
        with os.fdopen(writer, "wb") as routes:
            routes.write((ROOT / "routes.yaml").read_bytes())
        await wait_healthy(port, proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_sigint_while_starting_exits_0_without_a_traceback(
    tmp_path: Path, signum: signal.Signals
) -> None:
    fifo, log = tmp_path / "routes.yaml", tmp_path / "serve.log"
    proc, writer = serve_from_a_fifo(fifo, free_port(), log)
    try:
        proc.send_signal(signum)
        assert proc.wait(30) == 0, log.read_text()
        assert "Traceback" not in log.read_text()
    finally:
        os.close(writer)
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_a_stop_signal_while_starting_ends_the_process_even_inside_a_callback() -> None:
    # A signal handler runs inside whatever Python code runs then; a weakref callback (as an
    # import's module lock has) swallows an exception raised there, with a traceback.
    code = (
        "import os, signal, weakref\n"
        "from proxy.process_setup import handle_signals_while_starting\n"
        "handle_signals_while_starting()\n"
        "class Held: pass\n"
        "held = Held()\n"
        "def gone(_ref):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    sum(range(1000))\n"
        "ref = weakref.ref(held, gone)\n"
        "del held\n"
        "print('the start went on')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
