"""`Expect: 100-continue` is answered only once the key is known good, and a HEAD request's
405 is about HEAD (issue 13, item 13)."""

from __future__ import annotations

import logging

import orjson
import pytest

from tests.conftest import KEY, ProxyFactory
from tests.raw_http import connect, exchange, read_answer

ROUTES = "upstreams: {demo: {kind: echo}}\nmodels: {echo: {upstream: demo}}\n"
CHAT = orjson.dumps({"model": "echo", "messages": [{"role": "user", "content": "go on"}]})


def expecting(auth: bytes) -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n" + auth
        + b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
        b"Content-Length: " + str(len(CHAT)).encode() + b"\r\n\r\n"
    )


@pytest.mark.parametrize(
    "auth",
    [
        pytest.param(b"Authorization: Bearer sk-wrong-key-000000000000\r\n", id="wrong-key"),
        pytest.param(b"", id="no-key"),
        pytest.param(b"X-Api-Key: sk-wrong\r\n", id="wrong-x-api-key"),
    ],
)
async def test_no_100_continue_before_authentication(
    make_proxy: ProxyFactory, auth: bytes
) -> None:
    proxy = await make_proxy(ROUTES)
    reader, writer = await connect(proxy.url)
    writer.write(expecting(auth))  # the body waits for a 100 that must not come
    await writer.drain()
    answer = await read_answer(reader)
    writer.close()
    assert answer.interim == []
    assert answer.status == 401
    assert answer.error()["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    "auth",
    [
        pytest.param(b"Authorization: Bearer " + KEY.encode() + b"\r\n", id="bearer"),
        pytest.param(b"X-Api-Key: " + KEY.encode() + b"\r\n", id="x-api-key"),
    ],
)
async def test_100_continue_once_the_key_is_good(make_proxy: ProxyFactory, auth: bytes) -> None:
    proxy = await make_proxy(ROUTES)
    reader, writer = await connect(proxy.url)
    writer.write(expecting(auth))
    await writer.drain()
    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(CHAT)
    await writer.drain()
    answer = await read_answer(reader)
    writer.close()
    assert answer.status == 200
    assert orjson.loads(answer.body)["choices"][0]["message"]["content"] == "go on"


async def test_100_continue_without_keys_when_unauthenticated_access_is_on(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy(ROUTES + "auth: {allow_unauthenticated: true}\n", keys=())
    reader, writer = await connect(proxy.url)
    writer.write(expecting(b""))
    await writer.drain()
    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(CHAT)
    await writer.drain()
    assert (await read_answer(reader)).status == 200
    writer.close()


async def test_a_head_requests_405_names_head_and_allow(
    make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agentproxy.access")
    proxy = await make_proxy(ROUTES)
    request = (
        b"HEAD /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n"
        b"Authorization: Bearer " + KEY.encode() + b"\r\nConnection: close\r\n\r\n"
    )
    reader, writer = await connect(proxy.url)
    writer.write(request)
    await writer.drain()
    answer = await read_answer(reader, head_only=True)
    rest = await reader.read()
    writer.close()
    assert answer.status == 405
    assert answer.headers["allow"] == "POST"
    assert rest == b""  # a HEAD answer has no body
    logged = [r for r in caplog.records if r.name == "agentproxy.access"]
    assert [(r.getMessage(), vars(r)["status"]) for r in logged] == [
        ("HEAD /v1/chat/completions", 405)
    ]
    # The same request as GET gets the body HEAD's answer stands for: it names the method.
    as_get = await exchange(proxy.url, request.replace(b"HEAD ", b"GET ", 1))
    assert as_get.status == 405 and as_get.headers["allow"] == "POST"
    assert "GET" in str(as_get.error()["message"])


async def test_a_get_only_path_allows_head(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(ROUTES)
    answer = await exchange(
        proxy.url, b"POST /v1/models HTTP/1.1\r\nHost: proxy\r\nContent-Length: 0\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert answer.status == 405
    assert answer.headers["allow"] == "GET, HEAD"
    assert "use GET, HEAD" in str(answer.error()["message"])
