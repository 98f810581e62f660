"""What the end-to-end tests of the `custom` kind share: the five APIs of custom-apis.md §7 as
a table (their worked config, their fake server, what their default answer says and how a
chat call names its session), and the proxy in front of one of them.

The routes are the §7 configs verbatim (tests/custom_configs.py), with only `url` pointed at
the fake and a route added where the snippet has none.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import yaml
from aiohttp import web

from proxy.app import create_app
from proxy.app_keys import DRAIN
from proxy.reload import TableHolder
from tests import custom_configs
from tests.conftest import KEY, Proxy, serving
from tests.fake_agents import (
    DIFY_KEY,
    FLOWISE_FLOW,
    LANGFLOW_FLOW,
    LANGFLOW_KEY,
    N8N_BASIC,
    N8N_HOOK,
    FakeAgent,
    FakeDify,
    FakeFlowise,
    FakeLangflow,
    FakeLangGraph,
    FakeN8n,
    Recorded,
)

OTHER_KEY = "sk-other-key-0123456789abcdef"
HI = [{"role": "user", "content": "Hello"}]

ENV = {
    "DIFY_SUPPORT_APP_KEY": DIFY_KEY,
    "FLOWISE_FLOW_KEY": "",
    "LANGFLOW_API_KEY": LANGFLOW_KEY,
    "N8N_CHAT_BASIC_B64": N8N_BASIC,
    "LANGSMITH_API_KEY": "",
}


@pytest.fixture(autouse=True)
def custom_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The variables the §7 configs name (import this fixture into a test module)."""
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)


@dataclass(frozen=True)
class Api:
    name: str
    config: str
    fake: Callable[[], FakeAgent]
    # The fake's path that the config's `url` stands for.
    base_path: str
    model: str
    # The route the snippet lacks (None: the snippet has its own `models`).
    route: dict[str, Any] | None
    # What the default stream (and the sync answer to the same turn) says.
    text: str
    usage: tuple[int, int, int] | None
    # The upstream session a chat call reached.
    session_of: Callable[[Recorded], str]
    # The upstream has its own end event: a clean EOF before it is a truncated answer.
    has_end: bool
    # The default stream's writes up to and including its first text delta.
    first_text: int


def _langgraph_thread(recorded: Recorded) -> str:
    return recorded.path.split("/")[2]


DIFY = Api(
    "dify", "DIFY", FakeDify, "/v1", "support", None, "Hello there, how can I help?",
    (24, 7, 31), lambda r: str(r.json["user"]), True, 2,
)
FLOWISE = Api(
    "flowise", "FLOWISE", FakeFlowise, "/api/v1", f"flows/{FLOWISE_FLOW}", None,
    "You said: Again via chatId", None, lambda r: str(r.json.get("chatId")), True, 2,
)
LANGFLOW = Api(
    "langflow", "LANGFLOW", FakeLangflow, "/api/v1", "flow",
    {"flow": {"upstream": "langflow", "model": LANGFLOW_FLOW}}, "You said: Stream me",
    (22, 4, 26), lambda r: str(r.json.get("session_id")), True, 4,
)
N8N = Api(
    "n8n", "N8N", FakeN8n, "/webhook", "agent",
    {"agent": {"upstream": "n8n-agent", "model": N8N_HOOK}},
    "Hello! I'm the agent. Anything else?", None, lambda r: str(r.json["sessionId"]), False, 2,
)
LANGGRAPH = Api(
    "langgraph", "LANGGRAPH", FakeLangGraph, "", "agent",
    {"agent": {"upstream": "langgraph", "model": "agent"}}, "You said: Second turn",
    (13, 4, 17), _langgraph_thread, False, 3,
)
APIS = [DIFY, FLOWISE, LANGFLOW, N8N, LANGGRAPH]
API_IDS = [api.name for api in APIS]


def routes_for(
    api: Api, url: str, route_keys: dict[str, Any] | None = None, **upstream: Any
) -> str:
    """The §7 config of `api` with its url at `url`, `upstream` keys added or replaced, and
    `route_keys` added to its route."""
    data = yaml.safe_load(getattr(custom_configs, api.config))
    (block,) = data["upstreams"].values()
    block["url"] = url + api.base_path
    block.update(upstream)
    if api.route is not None:
        data["models"] = api.route
    for route in data["models"].values():
        route.update(route_keys or {})
    return yaml.safe_dump(data, sort_keys=False)


@dataclass
class Served:
    fake: FakeAgent
    proxy: Proxy
    app: web.Application

    def client(self, key: str = KEY) -> openai.AsyncOpenAI:
        return self.proxy.client(key)

    @property
    def in_flight(self) -> int:
        """Requests the proxy is serving now."""
        return self.app[DRAIN].in_flight


@asynccontextmanager
async def serve_api(
    api: Api, tmp_path: Path, fake: FakeAgent | None = None, *,
    routes: Callable[[str], str] | None = None, route_keys: dict[str, Any] | None = None,
    **upstream: Any,
) -> AsyncIterator[Served]:
    """The fake server of `api` and the proxy in front of it, with two API keys: the routes
    of `routes_for`, or `routes(fake's url)`."""
    fake = fake if fake is not None else api.fake()
    async with AsyncExitStack() as stack:
        fake.url = await stack.enter_async_context(serving(fake.app()))
        # Before the fake's cleanup, which waits for its handlers to end.
        stack.callback(fake.release_all)
        path = tmp_path / "routes.yaml"
        path.write_text(routes(fake.url) if routes is not None
                        else routes_for(api, fake.url, route_keys, **upstream))
        holder = TableHolder(path, (KEY, OTHER_KEY))
        app = create_app(holder)
        url = await stack.enter_async_context(serving(app))
        proxy = Proxy(url, holder, path)
        stack.push_async_callback(proxy.close_clients)
        yield Served(fake, proxy, app)


async def post_stream(
    served: Served, model: str, *, key: str = KEY, headers: dict[str, str] | None = None,
    include_usage: bool = False, messages: list[dict[str, Any]] | None = None,
) -> list[Any]:
    """A streamed chat completion as the client reads it: each data event parsed (`[DONE]`
    as the string), after checking that every line is a `data:` field or a comment. The turn
    belongs to the chat `chat-0` unless `headers` say otherwise."""
    body: dict[str, Any] = {"model": model, "stream": True, "messages": messages or HI}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    async with aiohttp.ClientSession() as http, http.post(
        served.proxy.url + "/v1/chat/completions", json=body,
        headers={"Authorization": f"Bearer {key}",
                 **(headers if headers is not None else {"X-Session-Id": "chat-0"})},
    ) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = await resp.read()
    events: list[Any] = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        for line in block.split("\n"):
            assert line.startswith(("data: ", ": ")), line
        data = "\n".join(line[6:] for line in block.split("\n") if line.startswith("data: "))
        if data:
            events.append(data if data == "[DONE]" else orjson.loads(data))
    return events


def text_of(events: list[Any]) -> str:
    return "".join(
        e["choices"][0]["delta"].get("content") or ""
        for e in events if isinstance(e, dict) and e.get("choices")
    )
