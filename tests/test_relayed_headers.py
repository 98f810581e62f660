"""Which of an upstream's response headers reach the client, sync and streamed, and how the
proxy reads the one it checks itself (a stream's Content-Type)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from proxy.upstreams.http import HttpUpstream
from tests.conftest import KEY, ProxyFactory
from tests.fake_openai import LETTA_CODE, FakeOpenAI
from tests.raw_http import closed_by_peer, connect, read_answer
from tests.responses_assert import parse_sse

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


# --- a raw upstream: header bytes that no HTTP server library would send ------------------------


def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    body = {"id": "chatcmpl-raw", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + orjson.dumps(body) + b"\n\n"


GOOD_STREAM = (chunk({"role": "assistant", "content": ""}) + chunk({"content": "fine"})
               + chunk({}, "stop") + b"data: [DONE]\n\n")
COMPLETION = orjson.dumps(
    {"id": "chatcmpl-raw", "object": "chat.completion", "created": 1, "model": "m",
     "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"},
                  "finish_reason": "stop", "logprobs": None}],
     "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
)
EMBEDDINGS = orjson.dumps(
    {"object": "list", "model": "e",
     "data": [{"object": "embedding", "index": 0, "embedding": [0.5, 0.25]}],
     "usage": {"prompt_tokens": 1, "total_tokens": 1}}
)
NATIVE_OBJECT = (LETTA_CODE / "responses_sync.json").read_bytes()
NATIVE_EVENTS = (LETTA_CODE / "responses_stream.sse").read_bytes()
NATIVE_TEXT = orjson.loads(NATIVE_OBJECT)["output"][0]["content"][0]["text"]
NATIVE_STREAM_TEXT = next(
    data["response"]["output"][0]["content"][0]["text"]
    for _, data in parse_sse(NATIVE_EVENTS).events if data["type"] == "response.completed"
)


@dataclass
class RawUpstream:
    """One answer per connection, written as bytes: `extra` header lines go into the head of
    every answer as they are, with `connection` as its Connection header."""

    extra: bytes = b""
    connection: bytes = b"close"
    content_type: bytes = b"text/event-stream"
    status: bytes = b"200 OK"
    url: str = ""

    def answer(self, path: str, stream: bool) -> bytes:
        if self.status != b"200 OK":
            return self._sized(b'{"error": {"message": "slow down"}}')
        if path.startswith("/custom"):
            if stream:
                return self._until_close(b"fi" + b"ne", b"text/plain")
            return self._sized(b'{"answer": "fine"}')
        if path.endswith("/responses"):
            return self._until_close(NATIVE_EVENTS) if stream else self._sized(NATIVE_OBJECT)
        if path.endswith("/embeddings"):
            return self._sized(EMBEDDINGS)
        return self._until_close(GOOD_STREAM) if stream else self._sized(COMPLETION)

    def _head(self, content_type: bytes) -> bytes:
        return (b"HTTP/1.1 " + self.status + b"\r\nContent-Type: " + content_type
                + b"\r\nConnection: " + self.connection + b"\r\n" + self.extra)

    def _sized(self, body: bytes) -> bytes:
        return (self._head(b"application/json") + b"Content-Length: %d\r\n\r\n" % len(body)
                + body)

    def _until_close(self, body: bytes, content_type: bytes | None = None) -> bytes:
        return self._head(content_type or self.content_type) + b"\r\n" + body

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            length = next((int(line.split(":")[1]) for line in head
                           if line.lower().startswith("content-length:")), 0)
            body = orjson.loads(await reader.readexactly(length)) if length else {}
            stream = body.get("stream") is True or body.get("mode") == "stream"
            writer.write(self.answer(head[0].split()[1], stream))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    upstream = RawUpstream()
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    upstream.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with server:
        yield upstream


def raw_routes(upstream: RawUpstream) -> str:
    url = upstream.url
    return f"""
upstreams:
  o: {{kind: openai, url: '{url}/v1'}}
  n: {{kind: openai, url: '{url}/v1', responses: native}}
  c:
    kind: custom
    url: '{url}/custom'
    request:
      path: /say
      body: {{prompt: "{{{{ input }}}}"}}
    sync:
      body: {{mode: sync}}
      text: answer
    stream:
      body: {{mode: stream}}
      framing: text
models:
  m: {{upstream: o}}
  nat: {{upstream: n}}
  cus: {{upstream: c}}
"""


HI: Any = [{"role": "user", "content": "hi"}]


async def sdk_call(client: openai.AsyncOpenAI, route: str) -> tuple[Mapping[str, str], str]:
    """The headers and the answer's text of one request, as the SDK reads them."""
    chat = client.chat.completions
    responses = client.responses
    model = {"native": "nat", "custom": "cus"}.get(route.split("-")[0], "m")
    if route in ("chat", "custom"):
        raw = await chat.with_raw_response.create(model=model, messages=HI)
        return raw.headers, raw.parse().choices[0].message.content or ""
    if route in ("chat-stream", "custom-stream"):
        async with chat.with_streaming_response.create(
            model=model, messages=HI, stream=True
        ) as resp:
            text = "".join([c.choices[0].delta.content or "" async for c in await resp.parse()
                            if c.choices])
            return resp.headers, text
    if route in ("responses", "native"):
        answer = await responses.with_raw_response.create(model=model, input="hi")
        return answer.headers, answer.parse().output_text
    if route in ("responses-stream", "native-stream"):
        async with responses.with_streaming_response.create(
            model=model, input="hi", stream=True
        ) as events:
            finals = [e.response.output_text async for e in await events.parse()
                      if e.type == "response.completed"]
            return events.headers, "".join(finals)
    assert route == "embeddings"
    vectors = await client.embeddings.with_raw_response.create(model="m", input="hi")
    return vectors.headers, str(vectors.parse().data[0].embedding)


ROUTES = ["chat", "chat-stream", "responses", "responses-stream", "native", "native-stream",
          "embeddings", "custom", "custom-stream"]
EXPECTED = {"native": NATIVE_TEXT, "native-stream": NATIVE_STREAM_TEXT, "embeddings": "[0.5, 0.25]"}


@pytest.mark.parametrize("route", ROUTES)
async def test_a_header_value_with_a_control_character_is_dropped_and_the_answer_arrives(
    make_proxy: ProxyFactory, raw_upstream: RawUpstream, route: str
) -> None:
    # Bytes aiohttp's server refuses to write: relayed, they cost the client its answer.
    raw_upstream.extra = (b"X-Trace: a\x01b\r\nX-Escape: \x1b[31m\r\nX-Del: a\x7fb\r\n"
                          b"X-Tabbed: a\tb\r\n")
    proxy = await make_proxy(raw_routes(raw_upstream))
    client = proxy.client()
    headers, text = await sdk_call(client, route)
    assert text == EXPECTED.get(route, "fine")
    assert "x-trace" not in headers and "x-escape" not in headers and "x-del" not in headers
    assert headers["x-tabbed"] == "a\tb"  # a tab is a legal byte of a value
    # The next answer, on the same client, with the same header name and a plain value.
    raw_upstream.extra = b"X-Trace: t-2\r\n"
    headers, text = await sdk_call(client, route)
    assert text == EXPECTED.get(route, "fine")
    assert headers["x-trace"] == "t-2"


@pytest.mark.parametrize(
    ("sent", "relayed"),
    [(b"1\x01", None), (b"soon", None), (b"7", "7"), (b"1.5", "1.5"),
     (b"Wed, 21 Oct 2026 07:28:00 GMT", "Wed, 21 Oct 2026 07:28:00 GMT")],
)
@pytest.mark.parametrize("model", ["m", "cus"])
async def test_an_upstreams_429_keeps_a_plain_retry_after_and_drops_any_other(
    make_proxy: ProxyFactory, raw_upstream: RawUpstream, sent: bytes, relayed: str | None,
    model: str,
) -> None:
    raw_upstream.status = b"429 Too Many Requests"
    raw_upstream.extra = b"Retry-After: " + sent + b"\r\n"
    proxy = await make_proxy(raw_routes(raw_upstream))
    client = proxy.client()
    for stream in (False, True):
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model=model, messages=HI, stream=stream)
        assert caught.value.response.headers.get("retry-after") == relayed
    raw_upstream.status = b"200 OK"
    answer = await client.chat.completions.create(model=model, messages=HI)
    assert answer.choices[0].message.content == "fine"


async def test_a_stream_whose_headers_aiohttp_refuses_gets_a_clean_502(
    make_proxy: ProxyFactory, raw_upstream: RawUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Should a value the relay's check misses reach aiohttp's writer, which refuses it once
    # the response's framing is chosen, the client still gets a whole answer.
    monkeypatch.setattr(HttpUpstream, "relayable_headers", lambda self, raw: (("X-Bad", "\x01"),))
    proxy = await make_proxy(raw_routes(raw_upstream))
    body = orjson.dumps({"model": "m", "messages": HI, "stream": True})
    reader, writer = await connect(proxy.url)
    try:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
                     + body)
        answer = await read_answer(reader)
        assert answer.status == 502
        assert answer.error()["code"] == "upstream_error"
        assert "x-bad" not in answer.headers
        assert answer.headers["connection"] == "close"
        assert await closed_by_peer(reader) == b""
    finally:
        writer.close()
    monkeypatch.undo()
    reply = await proxy.client().chat.completions.create(model="m", messages=HI)
    assert reply.choices[0].message.content == "fine"


# Each speaks for the upstream's origin, its web server, one hop, or a body the proxy
# re-encodes: none is the proxy's to pass on.
NOT_RELAYED = [
    ("Proxy-Connection", "keep-alive"), ("X-Accel-Redirect", "/internal/secret"),
    ("X-Accel-Limit-Rate", "1024"), ("X-Accel-Charset", "utf-8"), ("X-Accel-Expires", "60"),
    ("X-Accel-Anything", "1"), ("X-Sendfile", "/etc/shadow"),
    ("X-LIGHTTPD-send-file", "/etc/shadow"), ("Refresh", "0; url=https://elsewhere.invalid/"),
    ("Clear-Site-Data", '"*"'), ("Link", "<https://elsewhere.invalid/>; rel=preload"),
    ("Content-Security-Policy", "default-src 'none'"),
    ("Content-Security-Policy-Report-Only", "default-src 'none'"),
    ("Content-Disposition", "attachment; filename=run.exe"), ("Set-Cookie2", "a=b"),
    ("Access-Control-Allow-Private-Network", "true"), ("Access-Control-Anything", "1"),
    ("ETag", '"v1"'), ("Last-Modified", "Wed, 21 Oct 2026 07:28:00 GMT"),
    ("Content-MD5", "Q2hlY2sgSW50ZWdyaXR5IQ=="), ("Digest", "sha-256=abc"),
    ("Content-Range", "bytes 0-9/10"), ("Content-Location", "/v1/elsewhere"),
    ("Accept-Ranges", "bytes"), ("Vary", "Accept-Encoding"), ("Age", "5"),
    ("Expires", "Wed, 21 Oct 2026 07:28:00 GMT"), ("Pragma", "no-cache"),
    ("NEL", '{"report_to": "upstream"}'), ("Report-To", '{"group": "upstream"}'),
]
RELAYED = [("x-ratelimit-remaining-requests", "99"), ("openai-processing-ms", "12"),
           ("openai-version", "2020-10-01"), ("x-upstream-request-id", "up-1")]


def header_lines(headers: list[tuple[str, str]]) -> bytes:
    return b"".join(f"{name}: {value}\r\n".encode() for name, value in headers)


@pytest.mark.parametrize("route", ["chat", "chat-stream"])
async def test_hop_by_hop_origin_and_body_headers_stay_with_the_upstream(
    make_proxy: ProxyFactory, raw_upstream: RawUpstream, route: str
) -> None:
    raw_upstream.connection = b"close, X-Hop"
    raw_upstream.extra = header_lines([*NOT_RELAYED, ("X-Hop", "secret"), *RELAYED])
    proxy = await make_proxy(raw_routes(raw_upstream))
    client = proxy.client()
    headers, text = await sdk_call(client, route)
    assert text == "fine"
    leaked = [name for name, _ in [*NOT_RELAYED, ("X-Hop", "")] if name in headers]
    assert leaked == []
    assert "secret" not in str(headers)
    for name, value in RELAYED:
        assert headers[name] == value
    # What one answer's Connection header names is that answer's alone.
    raw_upstream.connection = b"close"
    raw_upstream.extra = b"X-Hop: visible\r\n"
    headers, _ = await sdk_call(client, route)
    assert headers["x-hop"] == "visible"


@pytest.mark.parametrize(
    "content_type", [b"TEXT/EVENT-STREAM", b"Text/Event-Stream; charset=utf-8"]
)
@pytest.mark.parametrize("route", ["chat-stream", "responses-stream", "native-stream"])
async def test_an_event_stream_is_one_whatever_the_case_of_its_media_type(
    make_proxy: ProxyFactory, raw_upstream: RawUpstream, content_type: bytes, route: str
) -> None:
    raw_upstream.content_type = content_type
    proxy = await make_proxy(raw_routes(raw_upstream))
    _, text = await sdk_call(proxy.client(), route)
    assert text == EXPECTED.get(route, "fine")
