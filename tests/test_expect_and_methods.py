"""`Expect: 100-continue` is answered only once the key is known good, a HEAD request's
405 is about HEAD (issue 13, item 13), and a request for a protocol upgrade is served without
one, on a connection that then closes; paths are matched as sent and an Authorization header
not in Bearer form is named in its 401."""

from __future__ import annotations

import logging
import time

import orjson
import pytest

from tests.conftest import KEY, ProxyFactory
from tests.raw_http import closed_by_peer, connect, exchange, read_answer

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
    # No body comes without the 100: nothing to wait for before the connection closes.
    waited = time.monotonic()
    assert await closed_by_peer(reader) == b""
    assert time.monotonic() - waited < 5
    writer.close()
    assert answer.interim == []
    assert answer.status == 401
    assert answer.error()["code"] == "invalid_api_key"
    assert answer.headers["connection"].lower() == "close"


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


WEBSOCKET = b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
STREAM = orjson.dumps({"model": "echo", "stream": True,
                       "messages": [{"role": "user", "content": "go on"}]})


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(b"GET /healthz HTTP/1.1\r\nHost: proxy\r\nConnection: Upgrade\r\n"
                     b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n", id="h2c"),
        pytest.param(b"GET /healthz HTTP/1.1\r\nHost: proxy\r\nConnection: keep-alive, Upgrade\r\n"
                     + WEBSOCKET + b"Sec-WebSocket-Version: 13\r\n\r\n", id="websocket"),
        pytest.param(b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\n"
                     b"Connection: Upgrade\r\nUpgrade: h2c\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(STREAM)).encode() + b"\r\n\r\n" + STREAM,
                     id="h2c-on-a-stream"),
    ],
)
async def test_an_upgrade_request_is_served_then_the_connection_closes_saying_so(
    make_proxy: ProxyFactory, first: bytes
) -> None:
    # The proxy switches to no other protocol: it ignores the Upgrade, but aiohttp's parser
    # has dropped (or kept for the new protocol) what was pipelined behind it, so the answer
    # says `Connection: close` and the client knows to send that request again.
    proxy = await make_proxy(ROUTES)
    reader, writer = await connect(proxy.url)
    writer.write(first + b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n")
    await writer.drain()
    answer = await read_answer(reader)
    rest = await closed_by_peer(reader)
    writer.close()
    assert answer.status == 200, answer
    assert answer.headers["connection"].lower() == "close"
    assert rest == b""
    again = await exchange(proxy.url, b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n")
    assert again.status == 200


# -- request targets and Authorization headers ----------------------------------------------

IN_STEP = orjson.dumps({"model": "echo", "messages": [{"role": "user", "content": "in step"}]})


def raw_post(target: bytes, auth: bytes = b"Authorization: Bearer " + KEY.encode()) -> bytes:
    return (
        b"POST " + target + b" HTTP/1.1\r\nHost: proxy\r\n" + auth + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(IN_STEP) + IN_STEP
    )


@pytest.mark.parametrize(
    "target",
    [b"/v1/chat%2Fcompletions", b"/v1/chat%2fcompletions", b"/v1/chat/completions%2F"],
)
async def test_a_404_names_the_path_as_sent_and_the_connection_stays_in_step(
    make_proxy: ProxyFactory, target: bytes
) -> None:
    """Paths are matched as sent, not decoded; the 404 must not name a path that exists."""
    proxy = await make_proxy(ROUTES)
    reader, writer = await connect(proxy.url)
    writer.write(raw_post(target) + raw_post(b"/v1/chat/completions"))
    refused, served = await read_answer(reader), await read_answer(reader)
    writer.close()
    assert refused.status == 404
    err = refused.error()
    assert err["code"] == "not_found"
    assert err["message"] == f"Invalid URL (POST {target.decode()})."
    assert served.status == 200
    assert orjson.loads(served.body)["choices"][0]["message"]["content"] == "in step"


@pytest.mark.parametrize(
    "authorization",
    [b"Basic " + KEY.encode(), b"Bearer " + KEY.encode() + b" extra", b"Token " + KEY.encode()],
    ids=["basic", "bearer-with-a-space", "other-scheme"],
)
async def test_an_authorization_header_not_in_bearer_form_is_named_in_the_401(
    make_proxy: ProxyFactory, authorization: bytes
) -> None:
    proxy = await make_proxy(ROUTES)
    answer = await exchange(proxy.url, raw_post(b"/v1/chat/completions",
                                                b"Authorization: " + authorization))
    assert answer.status == 401
    err = answer.error()
    assert err["code"] == "invalid_api_key"
    assert "Authorization header is not 'Bearer <key>'" in str(err["message"])
    assert KEY not in str(err["message"])
