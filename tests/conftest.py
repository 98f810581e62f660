"""Shared fixtures: real servers on 127.0.0.1 port 0, and the proxy in front of them."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web

from proxy.app import create_app
from proxy.reload import TableHolder
from tests.fake_letta import FakeLetta, make_app
from tests.fake_openai import FakeOpenAI

KEY = "sk-test-0123456789abcdef"


async def start(app: web.Application) -> tuple[web.AppRunner, str]:
    """Runs `app` on a free port of 127.0.0.1; returns its runner and base URL.

    The caller owns the runner's cleanup: the shutdown tests decide when it happens.
    """
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """Runs `app` on a free port of 127.0.0.1 and yields its base URL."""
    runner, url = await start(app)
    try:
        yield url
    finally:
        await runner.cleanup()


@asynccontextmanager
async def answering(
    path: str, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> AsyncIterator[str]:
    """The base URL of an upstream written for one test: POST `path` runs `handler`."""
    app = web.Application()
    app.router.add_post(path, handler)
    async with serving(app) as url:
        yield url


def stepped_stream(
    writes: list[bytes], steps: list[asyncio.Event]
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An upstream's event stream written in `writes`, each after the test set the step
    before it (`steps[n - 1]` for `writes[n]`, once the client read what came before), so
    that each write is one read of the proxy's."""

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for n, data in enumerate(writes):
            if n:
                await steps[n - 1].wait()
            await resp.write(data)
        return resp

    return stream


def closed_port() -> int:
    """A port of 127.0.0.1 that nothing listens on: connections to it are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for(predicate: Callable[[], bool], seconds: float = 5.0) -> None:
    """Polls `predicate` until it holds; the deadline only bounds a failing test."""
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@dataclass
class Proxy:
    url: str
    holder: TableHolder
    routes: Path
    clients: list[openai.AsyncOpenAI] = field(default_factory=list)

    def client(self, key: str = KEY) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0)
        self.clients.append(client)
        return client

    async def close_clients(self) -> None:
        for client in self.clients:
            await client.close()


ProxyFactory = Callable[..., Awaitable[Proxy]]


@asynccontextmanager
async def serving_fake_openai() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI()
    async with serving(fake.app()) as url:
        fake.url = url
        yield fake
    fake.release.set()


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    async with serving_fake_openai() as fake:
        yield fake


@pytest.fixture
async def second_openai() -> AsyncIterator[FakeOpenAI]:
    """Another upstream, for a failover target or a stream that must end unlike the first."""
    async with serving_fake_openai() as fake:
        yield fake


@asynccontextmanager
async def serving_fake_letta() -> AsyncIterator[tuple[FakeLetta, str]]:
    """A FakeLetta and its base URL; streams still held are let go at the end."""
    state = FakeLetta()
    async with serving(make_app(state)) as url:
        try:
            yield state, url
        finally:
            # Before the server's cleanup, which waits for its handlers: a stream still held
            # (the proxy never cancelled it) must not keep a failing test waiting minutes.
            for scenario in [state.default_scenario, *state.scenarios]:
                scenario.release.set()


@pytest.fixture
async def letta() -> AsyncIterator[tuple[FakeLetta, str]]:
    async with serving_fake_letta() as served:
        yield served


@pytest.fixture
async def make_proxy(tmp_path: Path) -> AsyncIterator[ProxyFactory]:
    async with AsyncExitStack() as stack:

        async def make(routes: str, keys: tuple[str, ...] = (KEY,), **options: Any) -> Proxy:
            """`options` go to create_app (reload_interval, drain_timeout...)."""
            path = tmp_path / "routes.yaml"
            path.write_text(routes)
            holder = TableHolder(path, keys)
            url = await stack.enter_async_context(serving(create_app(holder, **options)))
            proxy = Proxy(url, holder, path)
            stack.push_async_callback(proxy.close_clients)
            return proxy

        yield make
