"""Silent, half-sent, stalled and idle connections are closed, and the proxy serves everyone
else meanwhile (issue 13, item 1).

Each test sets the one timeout it is about to a fraction of a second and the others to a
minute, so the closing it sees can only come from the limit it names.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import orjson

from tests.conftest import KEY, Proxy, ProxyFactory
from tests.processes import serve_process
from tests.raw_http import closed_by_peer, connect, read_answer
from tests.test_metrics import scrape, value

ROUTES = "upstreams: {demo: {kind: echo}}\nmodels: {echo: {upstream: demo}}\n"
SHORT = 0.3
LONG = 60.0
CHAT = orjson.dumps({"model": "echo", "messages": [{"role": "user", "content": "still here"}]})


def chat_head(length: int, *extra: bytes) -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n"
        b"Authorization: Bearer " + KEY.encode() + b"\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: " + str(length).encode() + b"\r\n" + b"".join(extra) + b"\r\n"
    )


async def serves_others(url: str) -> None:
    """/healthz and a chat request both answer, on fresh connections."""
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/healthz") as resp:
            assert resp.status == 200
        async with http.post(
            url + "/v1/chat/completions", data=CHAT,
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        ) as resp:
            assert resp.status == 200
            assert (await resp.json())["choices"][0]["message"]["content"] == "still here"


async def timeouts_counted(proxy: Proxy, phase: str) -> float | None:
    return value(await scrape(proxy.url), "agentproxy_connection_timeouts_total", phase=phase)


async def test_silent_connections_are_closed_after_the_header_timeout(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy(
        ROUTES, header_timeout=SHORT, body_timeout=LONG, keepalive_timeout=LONG
    )
    silent = [await connect(proxy.url) for _ in range(20)]
    await serves_others(proxy.url)
    for reader, writer in silent:
        assert await closed_by_peer(reader) == b""  # closed, with nothing said
        writer.close()
    await serves_others(proxy.url)
    assert await timeouts_counted(proxy, "header") == 20


async def test_a_half_sent_header_section_is_closed(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(
        ROUTES, header_timeout=SHORT, body_timeout=LONG, keepalive_timeout=LONG
    )
    reader, writer = await connect(proxy.url)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bea")
    await writer.drain()
    await serves_others(proxy.url)
    assert await closed_by_peer(reader) == b""
    writer.close()
    await serves_others(proxy.url)


async def test_a_stalled_body_gets_a_408_and_the_connection_closes(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy(
        ROUTES, header_timeout=LONG, body_timeout=SHORT, keepalive_timeout=LONG
    )
    reader, writer = await connect(proxy.url)
    writer.write(chat_head(len(CHAT)) + CHAT[:10])  # and not one byte more
    await writer.drain()
    await serves_others(proxy.url)
    answer = await read_answer(reader)
    assert answer.status == 408
    err = answer.error()
    assert err["code"] == "request_timeout"
    assert err["type"] == "invalid_request_error"
    assert answer.headers["x-request-id"].startswith("req_")
    assert answer.headers["connection"].lower() == "close"
    assert await closed_by_peer(reader) == b""
    writer.close()
    await serves_others(proxy.url)
    assert await timeouts_counted(proxy, "body") == 1


async def test_a_slow_body_that_keeps_coming_is_served(make_proxy: ProxyFactory) -> None:
    # The body limit is on a stall, not on the whole upload: a slow link is not cut off.
    proxy = await make_proxy(ROUTES, header_timeout=LONG, body_timeout=1.0, keepalive_timeout=LONG)
    reader, writer = await connect(proxy.url)
    writer.write(chat_head(len(CHAT)))
    step = len(CHAT) // 12 + 1
    for i in range(0, len(CHAT), step):
        writer.write(CHAT[i : i + step])
        await writer.drain()
        await asyncio.sleep(0.15)  # the slow client under test: 1.8 s in all, 0.15 s gaps
    answer = await read_answer(reader)
    assert answer.status == 200, answer
    writer.close()


async def test_an_idle_keep_alive_connection_is_closed_after_the_keepalive_timeout(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy(
        ROUTES, header_timeout=LONG, body_timeout=LONG, keepalive_timeout=SHORT
    )
    reader, writer = await connect(proxy.url)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n")
    await writer.drain()
    assert (await read_answer(reader)).status == 200
    await serves_others(proxy.url)
    assert await closed_by_peer(reader) == b""
    writer.close()


async def test_a_kept_alive_connection_outlives_the_header_timeout(
    make_proxy: ProxyFactory,
) -> None:
    # The header timeout bounds the wait for a connection's first request; between requests
    # the keep-alive timeout applies.
    proxy = await make_proxy(ROUTES, header_timeout=0.2, body_timeout=LONG, keepalive_timeout=LONG)
    reader, writer = await connect(proxy.url)
    request = b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n"
    writer.write(request)
    assert (await read_answer(reader)).status == 200
    await asyncio.sleep(0.6)  # idle, three header timeouts long
    writer.write(request)
    assert (await read_answer(reader)).status == 200
    writer.close()


async def test_serve_takes_the_limits_from_flags_and_environment(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(ROUTES)
    async with serve_process(
        routes, "--header-timeout", "0.3", "--body-timeout", "0.3",
        env={"AGENTPROXY_KEEPALIVE_TIMEOUT": "0.3"},
    ) as served:
        silent_reader, silent = await connect(served.url)
        stalled_reader, stalled = await connect(served.url)
        stalled.write(chat_head(len(CHAT)) + CHAT[:5])
        idle_reader, idle = await connect(served.url)
        idle.write(b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n")
        assert (await read_answer(idle_reader)).status == 200
        assert await closed_by_peer(silent_reader) == b""
        assert (await read_answer(stalled_reader)).status == 408
        assert await closed_by_peer(idle_reader) == b""
        for writer in (silent, stalled, idle):
            writer.close()
        await serves_others(served.url)
