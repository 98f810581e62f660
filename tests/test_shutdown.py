"""Graceful shutdown: not ready at once, no new connections, streams get until the drain
deadline, then end with an error event and [DONE]; the process exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
from pathlib import Path

import aiohttp
import pytest

from proxy.app import create_app
from proxy.app_keys import DRAIN
from proxy.reload import TableHolder
from tests.conftest import KEY, serving, start
from tests.fake_openai import FakeOpenAI
from tests.processes import eventually, serve_process

AUTH = {"Authorization": f"Bearer {KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_routes(tmp_path: Path, **upstreams: FakeOpenAI) -> Path:
    """A routes file with one model per upstream, named like it."""
    ups = "".join(
        f"  {name}:\n    kind: openai\n    url: {fake.url}/v1\n" for name, fake in upstreams.items()
    )
    models = "".join(f"  {name}:\n    upstream: {name}\n" for name in upstreams)
    path = tmp_path / "routes.yaml"
    path.write_text(f"upstreams:\n{ups}models:\n{models}")
    return path


@pytest.fixture
def slow_and_fast(
    fake_openai: FakeOpenAI, second_openai: FakeOpenAI
) -> tuple[FakeOpenAI, FakeOpenAI]:
    """Two upstreams whose streams wait after the first event: the test releases `fast` in
    time and leaves `slow` for the drain deadline to end."""
    fake_openai.mode = second_openai.mode = "stream_hang"
    return fake_openai, second_openai


async def post_chat(
    http: aiohttp.ClientSession, url: str, model: str, *, stream: bool
) -> aiohttp.ClientResponse:
    return await http.post(
        url + "/v1/chat/completions",
        json={"model": model, "stream": stream,
              "messages": [{"role": "user", "content": "tell me a long story"}]},
        headers=AUTH,
    )


async def open_slow_and_fast(
    http: aiohttp.ClientSession, url: str
) -> tuple[aiohttp.ClientResponse, aiohttp.ClientResponse]:
    """Both streams under way (their role chunk received) before the shutdown begins."""
    slow_resp = await post_chat(http, url, "slow", stream=True)
    fast_resp = await post_chat(http, url, "fast", stream=True)
    for resp in (slow_resp, fast_resp):
        assert json.loads(await next_event(resp))["choices"][0]["delta"]["role"]
    return slow_resp, fast_resp


async def next_event(resp: aiohttp.ClientResponse) -> str:
    while True:
        line = await resp.content.readline()
        assert line, "the stream ended early"
        if line.startswith(b"data: "):
            return line[6:].strip().decode()


async def remaining_events(resp: aiohttp.ClientResponse) -> list[str]:
    return [
        line[6:].strip().decode() async for line in resp.content if line.startswith(b"data: ")
    ]


def assert_ended_by_the_drain(events: list[str]) -> None:
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "service_unavailable"
    assert "shutting down" in error["message"]


def assert_finished_normally(events: list[str]) -> None:
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "stop"
    assert not any('"error"' in e for e in events)


async def test_readyz_answers_503_the_moment_the_drain_begins(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text("upstreams: {demo: {kind: echo}}\nmodels: {echo: {upstream: demo}}\n")
    app = create_app(TableHolder(path, (KEY,)))
    async with serving(app) as url, aiohttp.ClientSession() as http:
        async with http.get(url + "/readyz") as resp:
            assert resp.status == 200
        app[DRAIN].begin()
        async with http.get(url + "/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["status"] == "draining"
        async with http.get(url + "/healthz") as resp:
            assert resp.status == 200


async def test_streams_finish_within_the_deadline_and_the_rest_are_ended_at_it(
    tmp_path: Path, slow_and_fast: tuple[FakeOpenAI, FakeOpenAI]
) -> None:
    slow, fast = slow_and_fast
    holder = TableHolder(write_routes(tmp_path, slow=slow, fast=fast), (KEY,))
    runner, url = await start(create_app(holder, drain_timeout=1.0))
    async with aiohttp.ClientSession() as http:
        slow_resp, fast_resp = await open_slow_and_fast(http, url)

        shutdown = asyncio.create_task(runner.cleanup())

        async def draining() -> bool:
            return holder.draining

        await eventually(draining, "the drain to begin")
        fast.release.set()
        assert_finished_normally(await remaining_events(fast_resp))
        assert not shutdown.done()  # the slow stream still has until the deadline
        assert_ended_by_the_drain(await remaining_events(slow_resp))
        await asyncio.wait_for(shutdown, 30)

    async def upstream_closed() -> bool:
        return slow.disconnected.is_set()

    await eventually(upstream_closed, "the slow upstream request to be closed")


async def test_a_request_waiting_for_its_answer_gets_503_at_the_deadline(
    tmp_path: Path, fake_openai: FakeOpenAI
) -> None:
    fake_openai.mode = "hang"
    holder = TableHolder(write_routes(tmp_path, slow=fake_openai), (KEY,))
    runner, url = await start(create_app(holder, drain_timeout=0.1))
    async with aiohttp.ClientSession() as http:
        pending = asyncio.create_task(post_chat(http, url, "slow", stream=False))

        async def arrived() -> bool:
            return len(fake_openai.received) == 1

        await eventually(arrived, "the request to reach the upstream")
        await runner.cleanup()
        resp = await pending
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "service_unavailable"


async def test_sigterm_drains_the_served_process_and_it_exits_0(
    tmp_path: Path, slow_and_fast: tuple[FakeOpenAI, FakeOpenAI]
) -> None:
    slow, fast = slow_and_fast
    routes = write_routes(tmp_path, slow=slow, fast=fast)
    async with serve_process(routes, "--drain-timeout", "3") as served, \
            aiohttp.ClientSession() as http:
        slow_resp, fast_resp = await open_slow_and_fast(http, served.url)

        served.proc.send_signal(signal.SIGTERM)

        async def not_ready() -> bool:
            # No new connections: a probe is refused (or, if it raced in, told 503).
            try:
                async with aiohttp.ClientSession() as probe, probe.get(
                    served.url + "/readyz"
                ) as resp:
                    return resp.status == 503
            except aiohttp.ClientConnectionError:
                return True

        await eventually(not_ready, "the proxy to stop being ready")
        fast.release.set()
        assert_finished_normally(await remaining_events(fast_resp))
        assert_ended_by_the_drain(await remaining_events(slow_resp))
        assert await served.exit_code() == 0
    log = served.output()
    assert "shutting down" in log and "drain deadline reached: ending 1 requests" in log


async def test_a_killed_worker_stops_the_others_and_the_parent_exits_1(tmp_path: Path) -> None:
    # The parent went on with one worker fewer, saying nothing, until it was stopped.
    routes = tmp_path / "routes.yaml"
    routes.write_text("upstreams:\n  demo: {kind: echo}\nmodels:\n  echo: {upstream: demo}\n")
    async with serve_process(routes, port=free_port(), workers=2) as served:
        pids = [int(pid) for pid in re.findall(r"pid (\d+)\)", served.output())]
        assert len(pids) == 2
        os.kill(pids[0], signal.SIGKILL)
        assert await served.exit_code() == 1
        log = served.output()
    assert f"agentproxy: worker {pids[0]} was killed by signal 9 (Killed); stopping the " \
        "other workers" in log
    assert "Traceback" not in log
    with contextlib.suppress(ProcessLookupError):
        os.kill(pids[1], 0)
        raise AssertionError("the other worker was left running")


async def test_an_answer_given_during_the_drain_says_connection_close(
    tmp_path: Path, fake_openai: FakeOpenAI
) -> None:
    # It kept the connection alive, then the server closed it: the client's next request on
    # it was dropped without an answer.
    fake_openai.mode = "hang"
    routes = write_routes(tmp_path, slow=fake_openai)
    async with serve_process(routes, "--drain-timeout", "5") as served:
        host, port = served.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        body = json.dumps({"model": "slow", "messages": [{"role": "user", "content": "hi"}]})
        writer.write(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer {KEY}"
            f"\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"
            .encode()
        )

        async def arrived() -> bool:
            return len(fake_openai.received) == 1

        await eventually(arrived, "the request to reach the upstream")
        served.proc.send_signal(signal.SIGTERM)
        await eventually(
            lambda: asyncio.to_thread(lambda: "draining: 1 requests" in served.output()),
            "the drain to begin",
        )
        fake_openai.release.set()
        head = (await reader.readuntil(b"\r\n\r\n")).decode().lower()
        writer.close()
        assert head.startswith("http/1.1 200")
        assert "connection: close" in head
        assert await served.exit_code() == 0


async def test_a_worker_stuck_in_its_drain_is_killed_and_the_parent_says_so(
    tmp_path: Path,
) -> None:
    # The parent waited for a stopped worker for ever, and the pod hung until SIGKILL.
    routes = tmp_path / "routes.yaml"
    routes.write_text("upstreams:\n  demo: {kind: echo}\nmodels:\n  echo: {upstream: demo}\n")
    async with serve_process(
        routes, "--drain-timeout", "0", port=free_port(), workers=2
    ) as served:
        pids = [int(pid) for pid in re.findall(r"pid (\d+)\)", served.output())]
        os.kill(pids[0], signal.SIGSTOP)
        served.proc.send_signal(signal.SIGTERM)
        assert await served.exit_code(within=9.5) == 1
        log = served.output()
    assert f"agentproxy: worker {pids[0]} did not finish its drain within 0 s; killing it" \
        in log
    assert f"worker {pids[1]} did not finish" not in log
    assert "Traceback" not in log


async def test_a_second_signal_ends_the_drain_at_once(
    tmp_path: Path, fake_openai: FakeOpenAI
) -> None:
    # The second SIGTERM or SIGINT changed nothing: the drain ran on to its deadline.
    fake_openai.mode = "stream_hang"
    routes = write_routes(tmp_path, slow=fake_openai)
    async with serve_process(routes, "--drain-timeout", "60") as served, \
            aiohttp.ClientSession() as http:
        resp = await post_chat(http, served.url, "slow", stream=True)
        assert json.loads(await next_event(resp))["choices"][0]["delta"]["role"]
        served.proc.send_signal(signal.SIGTERM)
        await eventually(
            lambda: asyncio.to_thread(lambda: "draining: 1 requests" in served.output()),
            "the drain to begin",
        )
        served.proc.send_signal(signal.SIGINT)
        assert_ended_by_the_drain(await asyncio.wait_for(remaining_events(resp), 5))
        assert await served.exit_code(within=5) == 0
    log = served.output()
    assert "second signal: ending the drain now" in log
    assert "Traceback" not in log
