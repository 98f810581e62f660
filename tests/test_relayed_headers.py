"""Which of an upstream's response headers reach the client, sync and streamed."""

from __future__ import annotations

import aiohttp
import pytest

from tests.conftest import KEY, ProxyFactory
from tests.fake_openai import FakeOpenAI

AUTH = {"Authorization": f"Bearer {KEY}"}


def routes(fake: FakeOpenAI) -> str:
    return (
        f"upstreams:\n  fake: {{kind: openai, url: {fake.url}/v1}}\n"
        "models:\n  m: {upstream: fake}\n"
    )


@pytest.mark.parametrize("stream", [False, True], ids=["sync", "stream"])
async def test_set_cookie_from_an_upstream_never_reaches_the_client(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI, stream: bool
) -> None:
    fake_openai.response_headers = [
        ("Set-Cookie", "upstream_session=s3cr3t; Path=/; HttpOnly"),
        ("Set-Cookie", "lb=node-7"),
        ("X-Upstream-Trace", "trace-1"),
    ]
    proxy = await make_proxy(routes(fake_openai))
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    async with aiohttp.ClientSession() as http, http.post(
        proxy.url + "/v1/chat/completions", json=body, headers=AUTH
    ) as resp:
        text = await resp.text()
        assert resp.status == 200, text
        assert resp.headers.getall("Set-Cookie", []) == []
        assert "s3cr3t" not in text and "node-7" not in text
        # The upstream's other headers do come through: what is missing is the cookie alone.
        assert resp.headers.get("X-Upstream-Trace") == "trace-1"
        assert len(http.cookie_jar) == 0
