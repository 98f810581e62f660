"""Shared fixtures: real servers on 127.0.0.1 port 0, and the proxy in front of them."""

from __future__ import annotations

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
from proxy.upstreams.health import HEALTH
from tests.fake_openai import FakeOpenAI

KEY = "sk-test-0123456789abcdef"


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """Runs `app` on a free port of 127.0.0.1 and yields its base URL."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


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


@pytest.fixture(autouse=True)
def fresh_upstream_health() -> None:
    """Circuits and concurrency slots live for the process; each test starts from none."""
    HEALTH.clear()


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI()
    async with serving(fake.app()) as url:
        fake.url = url
        yield fake
    fake.release.set()


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
