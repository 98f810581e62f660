"""What the Responses tests share: raw requests to the proxy, and comparing answers."""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.conftest import KEY, Proxy
from tests.responses_assert import assert_responses_stream

WEATHER: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]},
}
CLOCK: Any = {
    "type": "function",
    "name": "get_time",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}},
}


async def post_raw(
    proxy: Proxy, body: dict[str, Any], *, key: str = KEY, headers: dict[str, str] | None = None,
    path: str = "/v1/responses",
) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as http, http.post(
        proxy.url + path, json=body,
        headers={"Authorization": f"Bearer {key}", **(headers or {})},
    ) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def stream_final(
    proxy: Proxy, body: dict[str, Any], **kw: Any
) -> tuple[dict[str, Any], bytes]:
    """A streamed response's terminal object, after the whole stream passed the checks."""
    status, headers, raw = await post_raw(proxy, {**body, "stream": True}, **kw)
    assert status == 200, raw
    assert headers["Content-Type"].startswith("text/event-stream")
    return assert_responses_stream(raw), raw


def comparable(response: dict[str, Any]) -> dict[str, Any]:
    """A response object without what differs between two answers to one request: its id,
    its times, and its item ids (random per response)."""
    out = {k: v for k, v in response.items() if k not in ("id", "created_at", "completed_at")}
    out["output"] = [{k: v for k, v in item.items() if k != "id"} for item in response["output"]]
    return out
