"""The access line's `bytes` for streams: the body handed to the connection, head excluded,
however the stream ended (it ended well, the upstream failed mid-stream, the client left, the
send timeout cut it, a write found the connection gone)."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from proxy.app import create_app
from proxy.reload import TableHolder
from tests.conftest import KEY, ProxyFactory, answering, wait_for
from tests.raw_http import connect


def sse_chunk(content: str, finish: str | None = None) -> bytes:
    body = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]}
    return b"data: " + orjson.dumps(body) + b"\n\n"


def openai_upstream(url: str) -> str:
    return (f"upstreams: {{up: {{kind: openai, url: '{url}/v1'}}}}\n"
            "models: {m: {upstream: up}}\n")


_STREAM_BODY = orjson.dumps({"model": "m", "stream": True,
                             "messages": [{"role": "user", "content": "hi"}]})
STREAM_REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer "
    + KEY.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(_STREAM_BODY)).encode() + b"\r\n\r\n" + _STREAM_BODY
)


async def reset(writer: asyncio.StreamWriter) -> None:
    """Closes with a reset, not a FIN: the proxy learns at once that the connection is gone."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()
    await writer.wait_closed()


@asynccontextmanager
async def embedded(tmp_path: Path, upstream_url: str) -> AsyncIterator[str]:
    """The proxy's app run as an embedding application would run it, with aiohttp's default
    `handler_cancellation=False`: a handler outlives the client that left. Its URL."""
    routes = tmp_path / "routes.yaml"
    routes.write_text(openai_upstream(upstream_url))
    runner = web.AppRunner(create_app(TableHolder(routes, (KEY,))), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def stream_request(proxy_url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A streamed chat request on a bare socket, its head read: what follows is the body as
    sent, chunked framing and all."""
    reader, writer = await connect(proxy_url)
    writer.write(STREAM_REQUEST)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
    return reader, writer


async def read_until(reader: asyncio.StreamReader, got: bytes, end: bytes) -> bytes:
    while not got.endswith(end):
        piece = await asyncio.wait_for(reader.read(65_536), 10)
        assert piece, got[-200:]
        got += piece
    return got


def access_record(caplog: pytest.LogCaptureFixture) -> logging.LogRecord | None:
    records = [r for r in caplog.records if r.name == "agentproxy.access"]
    assert len(records) <= 1
    return records[0] if records else None


async def logged(caplog: pytest.LogCaptureFixture) -> logging.LogRecord:
    await wait_for(lambda: access_record(caplog) is not None, 10)
    record = access_record(caplog)
    assert record is not None
    return record


@pytest.mark.parametrize("ending", ["done", "upstream-cut"])
async def test_a_streams_bytes_are_its_body_as_sent_whether_it_ended_well_or_not(
    make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture, ending: str
) -> None:
    """The body as the client received it, chunked framing included, not the head: for an
    upstream that dropped the connection mid-stream too (the error event and [DONE] end it)."""
    caplog.set_level(logging.INFO, logger="agentproxy.access")

    async def chat(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(sse_chunk("Hello") + sse_chunk(" there"))
        if ending == "done":
            await resp.write(sse_chunk("", "stop") + b"data: [DONE]\n\n")
        else:
            assert request.transport is not None
            request.transport.abort()
        return resp

    async with answering("/v1/chat/completions", chat) as url:
        proxy = await make_proxy(openai_upstream(url))
        reader, writer = await stream_request(proxy.url)
        body = await read_until(reader, b"", b"\r\n0\r\n\r\n")
        writer.close()
        record = await logged(caplog)
    assert b" there" in body and body.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    assert getattr(record, "error", None) == (None if ending == "done" else "upstream_error")
    assert vars(record)["bytes"] == len(body)


async def test_a_stream_the_client_left_logs_the_bytes_it_was_sent(
    make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The client reads the first event and leaves while the upstream thinks: everything the
    proxy handed to the connection reached it, so the line's bytes are exactly those."""
    caplog.set_level(logging.INFO, logger="agentproxy.access")
    release = asyncio.Event()

    async def chat(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(sse_chunk("Hello"))
        await release.wait()
        return resp

    async with answering("/v1/chat/completions", chat) as url:
        try:
            proxy = await make_proxy(openai_upstream(url))
            reader, writer = await stream_request(proxy.url)
            body = await read_until(reader, b"", b"\n\n\r\n")
            writer.close()
            record = await logged(caplog)
        finally:
            release.set()
    assert b"Hello" in body
    assert record.status == 200 and getattr(record, "error", None) == "client_closed"
    assert vars(record)["bytes"] == len(body)


async def test_a_stream_cut_after_the_send_timeout_logs_the_bytes_it_was_sent(
    make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that stops reading: the proxy handed the connection at least what the client
    read (the rest of what it handed sits in socket buffers)."""
    caplog.set_level(logging.INFO, logger="agentproxy.access")
    delta = "x" * 30_000

    async def chat(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(400):
            await resp.write(sse_chunk(delta))
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async with answering("/v1/chat/completions", chat) as url:
        proxy = await make_proxy(openai_upstream(url), send_timeout=0.5)
        reader, writer = await stream_request(proxy.url)
        received = 0
        while received < 200_000:  # some of the stream, then the client reads no more
            received += len(await asyncio.wait_for(reader.read(65_536), 10))
        record = await logged(caplog)
        writer.close()
    assert getattr(record, "error", None) == "send_timeout"
    assert vars(record)["bytes"] >= received


@pytest.mark.parametrize("refused", ["an-event", "the-end"])
async def test_a_write_refused_after_the_client_left_is_not_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, refused: str
) -> None:
    """The app embedded with aiohttp's default `handler_cancellation=False`: the handler
    outlives a client that left, and its next write (an event, or the stream's last one)
    finds the connection gone. aiohttp counts that write as output; the line does not."""
    caplog.set_level(logging.INFO, logger="agentproxy.access")
    release = asyncio.Event()
    first = sse_chunk("Hello") if refused == "an-event" else sse_chunk("Hello", "stop")

    async def chat(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(first)
        await release.wait()
        if refused == "an-event":
            await resp.write(sse_chunk("x" * 1000))
        else:
            await resp.write(b"data: [DONE]\n\n")
        return resp

    async with answering("/v1/chat/completions", chat) as url, embedded(tmp_path, url) as proxy:
        try:
            reader, writer = await stream_request(proxy)
            body = await read_until(reader, b"", first + b"\r\n")
            await reset(writer)
            release.set()
            record = await logged(caplog)
        finally:
            release.set()
    assert getattr(record, "error", None) == "client_closed"
    assert vars(record)["bytes"] == len(body)


async def test_a_client_that_left_before_the_streams_head_is_a_499_not_a_500(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Embedded with `handler_cancellation=False`, the handler outlives a client that left
    while the upstream had not yet answered; the stream's head then finds the connection
    gone. That is the client leaving (499, `client_closed`), not a failure of the proxy's:
    no 500 and no traceback in the log."""
    caplog.set_level(logging.INFO)
    release = asyncio.Event()
    asked = asyncio.Event()

    async def chat(request: web.Request) -> web.StreamResponse:
        asked.set()
        await release.wait()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(sse_chunk("Hello", "stop") + b"data: [DONE]\n\n")
        return resp

    async with answering("/v1/chat/completions", chat) as url, embedded(tmp_path, url) as proxy:
        try:
            _, writer = await connect(proxy)
            writer.write(STREAM_REQUEST)
            await asyncio.wait_for(asked.wait(), 10)
            await reset(writer)
            release.set()
            record = await logged(caplog)
        finally:
            release.set()
    assert vars(record)["status"] == 499
    assert getattr(record, "error", None) == "client_closed"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("status", [200, 400])
async def test_a_sync_answers_bytes_are_its_body(
    make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture, status: int
) -> None:
    """A JSON answer, the upstream's relayed or the proxy's own error: its body's length."""
    caplog.set_level(logging.INFO, logger="agentproxy.access")

    async def chat(request: web.Request) -> web.Response:
        return web.json_response({
            "id": "c", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi " * 50},
                         "finish_reason": "stop"}],
        })

    async with answering("/v1/chat/completions", chat) as url:
        proxy = await make_proxy(openai_upstream(url))
        messages = [{"role": "user", "content": "hi"}] if status == 200 else "not a list"
        async with aiohttp.ClientSession() as http, http.post(
            proxy.url + "/v1/chat/completions", json={"model": "m", "messages": messages},
            headers={"Authorization": f"Bearer {KEY}"},
        ) as resp:
            assert resp.status == status
            body = await resp.read()
        record = await logged(caplog)
    assert vars(record)["bytes"] == len(body) > 100


async def test_a_head_requests_bytes_are_zero(
    make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """HEAD (aiohttp answers it on every GET route) sends the head only: no body bytes."""
    caplog.set_level(logging.INFO, logger="agentproxy.access")

    async def unused(request: web.Request) -> web.Response:
        return web.json_response({})

    async with answering("/v1/chat/completions", unused) as url:
        proxy = await make_proxy(openai_upstream(url))
        async with aiohttp.ClientSession() as http, http.head(
            proxy.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"},
        ) as resp:
            assert resp.status == 200 and int(resp.headers["Content-Length"]) > 0
            assert await resp.read() == b""
        record = await logged(caplog)
    assert vars(record)["bytes"] == 0
