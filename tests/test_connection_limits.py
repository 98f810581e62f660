"""Silent, half-sent, stalled and idle connections are closed, and the proxy serves everyone
else meanwhile (issue 13, item 1).

Each test sets the one timeout it is about to a fraction of a second and the others to a
minute, so the closing it sees can only come from the limit it names.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from tests.conftest import KEY, Proxy, ProxyFactory, answering, wait_for
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


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
async def test_a_probe_sent_with_an_unfinished_body_is_answered_and_its_connection_closed(
    make_proxy: ProxyFactory, path: str
) -> None:
    # Nothing reads a probe's body: aiohttp would read on and discard it for 10 s after the
    # answer, some 15 GB of an endless chunked body on loopback, a core kept busy.
    proxy = await make_proxy(ROUTES, header_timeout=LONG, body_timeout=LONG, keepalive_timeout=LONG)
    reader, writer = await connect(proxy.url)
    writer.write(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: proxy\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    answer = await read_answer(reader)
    assert answer.status == 200
    assert answer.headers["connection"].lower() == "close"
    assert await closed_by_peer(reader) == b""
    await hung_up(writer)
    await serves_others(proxy.url)


async def hung_up(writer: asyncio.StreamWriter) -> None:
    """The rest of an endless chunked body goes nowhere: the proxy hung up instead of reading
    on (aiohttp would read and discard for 10 s, gigabytes on loopback)."""
    piece = b"x" * 65536
    chunk = b"%x\r\n" % len(piece) + piece + b"\r\n"
    sent = 0
    with pytest.raises((ConnectionError, OSError)):
        while sent < 1024 * 2**20:  # bounds only a failing test
            writer.write(chunk)
            await writer.drain()
            sent += len(piece)
    assert sent < 64 * 2**20
    writer.close()


def chunked_head(method: bytes, path: bytes, auth: bytes = KEY.encode()) -> bytes:
    return (
        method + b" " + path + b" HTTP/1.1\r\nHost: proxy\r\n"
        b"Authorization: Bearer " + auth + b"\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("head", "status", "code"),
    [
        pytest.param(chunked_head(b"GET", b"/v1/models/nowhere"), 404, "model_not_found",
                     id="unknown-model"),
        pytest.param(chunked_head(b"POST", b"/v1/nowhere"), 404, "not_found", id="unknown-path"),
        pytest.param(chunked_head(b"POST", b"/v1/chat/completions", b"sk-wrong-key-0000000"),
                     401, "invalid_api_key", id="bad-key"),
        pytest.param(chunked_head(b"PUT", b"/v1/chat/completions"), 405, "method_not_allowed",
                     id="wrong-method"),
        pytest.param(chunked_head(b"POST", b"/v1/chat/completions"), 413, "request_too_large",
                     id="too-large"),
        pytest.param(chunked_head(b"OPTIONS", b"*"), 400, "invalid_request_error",
                     id="options-star"),
    ],
)
async def test_an_early_answer_to_an_endless_body_closes_the_connection(
    make_proxy: ProxyFactory, head: bytes, status: int, code: str | None
) -> None:
    proxy = await make_proxy(ROUTES, header_timeout=LONG, body_timeout=LONG,
                             keepalive_timeout=LONG, max_body=1024)
    reader, writer = await connect(proxy.url)
    opening = b'{"model": "echo", "messages": [' + b" " * 2048
    writer.write(head + b"%x\r\n" % len(opening) + opening + b"\r\n")
    answer = await read_answer(reader)
    assert (answer.status, answer.error()["code"]) == (status, code)
    assert answer.headers["connection"].lower() == "close"
    await hung_up(writer)
    await serves_others(proxy.url)


async def test_a_declared_length_over_the_body_limit_is_refused_before_the_body(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy(ROUTES, header_timeout=LONG, body_timeout=LONG,
                             keepalive_timeout=LONG, max_body=1024)
    reader, writer = await connect(proxy.url)
    writer.write(chat_head(1025))  # and no body
    answer = await read_answer(reader)
    assert (answer.status, answer.error()["code"]) == (413, "request_too_large")
    assert answer.headers["connection"].lower() == "close"
    writer.close()


async def test_a_client_still_uploading_past_the_body_limit_reads_its_413(
    make_proxy: ProxyFactory,
) -> None:
    """The 413 goes out after --max-body bytes, while the SDK is still writing the rest: the
    connection must not be reset under it, or the SDK reports a connection error instead."""
    proxy = await make_proxy(ROUTES, max_body=65536)
    client = proxy.client()
    for _ in range(3):
        with pytest.raises(openai.APIStatusError) as refused:
            await client.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "x" * (4 * 2**20)}]
            )
        assert refused.value.status_code == 413
        assert refused.value.code == "request_too_large"


async def test_an_early_answer_to_a_whole_body_keeps_the_connection(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy(ROUTES, header_timeout=LONG, body_timeout=LONG,
                             keepalive_timeout=LONG)
    reader, writer = await connect(proxy.url)
    unknown = CHAT.replace(b'"echo"', b'"nowhere"')
    for body, status in ((unknown, 404), (CHAT, 200), (CHAT, 200)):
        writer.write(chat_head(len(body)) + body)
        answer = await read_answer(reader)
        assert answer.status == status
        assert "close" not in answer.headers.get("connection", "").lower()
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


# -- clients that stop reading (--send-timeout) ------------------------------------------------

SEND_TIMEOUT = 1.0
# The per-stream sweep runs once a second; the connection's sweep leaves it a second's slack.
SEND_CUT_WITHIN = SEND_TIMEOUT + 4.0


def openai_routes(url: str) -> str:
    return (
        f"upstreams: {{up: {{kind: openai, url: '{url}/v1'}}}}\n"
        "models: {m: {upstream: up}}\n"
    )


async def healthz_answers(url: str) -> None:
    async with aiohttp.ClientSession() as http, http.get(url + "/healthz") as resp:
        assert resp.status == 200


def request_head(path: str, body: bytes) -> bytes:
    return chat_head(len(body)).replace(b"/v1/chat/completions", path.encode()) + body


async def test_a_stream_whose_last_write_is_not_read_is_cut_after_the_send_timeout(
    make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A Responses stream's last write repeats its whole text (the closing events): the
    client reads every delta, then stops, so only that write blocks."""
    caplog.set_level(logging.INFO, logger="agentproxy.access")
    delta = "x" * 30_000

    async def chat(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for content, finish in [(delta, None)] * 100 + [("END-MARK", None), ("", "stop")]:
            chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                     "choices": [{"index": 0, "delta": {"content": content},
                                  "finish_reason": finish}]}
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async with answering("/v1/chat/completions", chat) as url:
        proxy = await make_proxy(openai_routes(url), send_timeout=SEND_TIMEOUT)
        reader, writer = await connect(proxy.url)
        body = orjson.dumps({"model": "m", "input": "hi", "stream": True})
        writer.write(request_head("/v1/responses", body))
        seen = b""
        while b"END-MARK" not in seen:  # every delta read; then the client reads no more
            seen = seen[-8:] + await asyncio.wait_for(reader.read(65_536), 10)
        started = time.monotonic()
        await wait_for(lambda: any(
            getattr(r, "error", None) == "send_timeout"
            for r in caplog.records if r.name == "agentproxy.access"
        ), SEND_CUT_WITHIN + 5)
        assert time.monotonic() - started < SEND_CUT_WITHIN
        writer.close()
        await healthz_answers(proxy.url)


async def test_a_sync_answer_to_a_client_that_does_not_read_is_cut_after_the_send_timeout(
    make_proxy: ProxyFactory,
) -> None:
    """aiohttp writes a sync answer's body after the handler returned: one write, watched by
    the connection's sweep."""
    answer = orjson.dumps({
        "id": "c", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * 20_000_000},
                     "finish_reason": "stop"}],
    })

    async def chat(request: web.Request) -> web.Response:
        return web.Response(body=answer, content_type="application/json")

    async with answering("/v1/chat/completions", chat) as url:
        proxy = await make_proxy(openai_routes(url), send_timeout=SEND_TIMEOUT)
        reader, writer = await connect(proxy.url)
        body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        writer.write(request_head("/v1/chat/completions", body))
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        started, received = time.monotonic(), 0
        while time.monotonic() - started < SEND_CUT_WITHIN:
            # A trickle, about 800 kB/s: the write of the answer stays blocked meanwhile.
            received += len(await reader.read(16_384))
            await asyncio.sleep(0.02)
        # Then all that is left, at once: the answer stops short, the connection was dropped.
        while piece := await asyncio.wait_for(reader.read(1 << 20), 10):
            received += len(piece)
        assert received < length
        writer.close()
        await healthz_answers(proxy.url)
