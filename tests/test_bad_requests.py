"""Requests that aiohttp's HTTP parser refuses before the app, bodies it cannot decode, and
Content-Encodings nobody can: an OpenAI-shaped JSON error with `X-Request-Id`, one log line at
WARNING or below that holds no header value, and a count in /metrics (issue 13, item 7).

Every request carries the client's key, so that a log line or an answer quoting a header would
show it.
"""

from __future__ import annotations

import gzip
import logging
import re

import orjson
import pytest
from aiohttp import http_parser

from tests.conftest import KEY, ProxyFactory
from tests.raw_http import connect, exchange, read_answer
from tests.test_metrics import scrape, value

ROUTES = "upstreams: {demo: {kind: echo}}\nmodels: {echo: {upstream: demo}}\n"
AUTH = b"Authorization: Bearer " + KEY.encode() + b"\r\n"
CHAT = orjson.dumps({"model": "echo", "messages": [{"role": "user", "content": "hello"}]})
REQUEST_ID = re.compile(r"req_[0-9a-f]+")
RESPONSES_STREAM = orjson.dumps({"model": "echo", "input": "hello", "stream": True})


def post(*headers: bytes, body: bytes = CHAT, length: bool = True) -> bytes:
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n" + AUTH
    head += b"Content-Type: application/json\r\n"
    if length:
        head += b"Content-Length: " + str(len(body)).encode() + b"\r\n"
    return head + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


def get(target: bytes, *headers: bytes, method: bytes = b"GET") -> bytes:
    return (
        method + b" " + target + b" HTTP/1.1\r\nHost: proxy\r\n" + AUTH
        + b"".join(h + b"\r\n" for h in headers) + b"\r\n"
    )


def unsupported(name: str, available: bool) -> tuple[int, str, str]:
    # Were the codec installed, aiohttp would decode the body, and plain JSON is not valid
    # brotli or zstd: still refused, as a body that cannot be decoded.
    if available:
        return 400, "invalid_request_error", "bad_body"
    return 415, "unsupported_media_type", "unsupported_encoding"


BR = unsupported("br", http_parser.HAS_BROTLI)
ZSTD = unsupported("zstd", http_parser.HAS_ZSTD)

PARSER_CASES = [
    pytest.param(get(b"/v1/models", b"X-Bad: a\x01b"), 400, "invalid_request_error",
                 "bad_header", id="control-byte-in-a-header-value"),
    pytest.param(b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\n"
                 b"Authorization: Bearer " + KEY.encode() + b"\r\r\n\r\n",
                 400, "invalid_request_error", "bad_header", id="cr-ending-the-authorization"),
    pytest.param(get(b"/v1/models", b"Bad Name: x"), 400, "invalid_request_error",
                 "bad_header", id="space-in-a-header-name"),
    pytest.param(post(b"Transfer-Encoding: chunked", body=b"zz\r\nhello\r\n0\r\n\r\n",
                      length=False),
                 400, "invalid_request_error", "bad_framing", id="bad-chunk-size"),
    pytest.param(post(b"Transfer-Encoding: chunked"), 400, "invalid_request_error",
                 "bad_framing", id="chunked-and-content-length"),
    pytest.param(post(b"Content-Encoding: br"), *BR, id="brotli-body"),
    pytest.param(post(b"Content-Encoding: zstd"), *ZSTD, id="zstd-body"),
    pytest.param(get(b"/v1/models", b"X-Long: " + b"a" * 40_000), 431,
                 "request_header_fields_too_large", "header_too_large",
                 id="header-line-over-the-parser-limit"),
    pytest.param(get(b"/v1/models", *[b"X-N%d: 1" % i for i in range(200)]), 431,
                 "request_header_fields_too_large", "header_too_large",
                 id="too-many-header-lines"),
    pytest.param(get(b"/v1/models%0a"), 400, "invalid_request_error", "bad_target",
                 id="newline-in-the-path"),
    pytest.param(get(b"/v1/%0d%0aSet-Cookie:%20x"), 400, "invalid_request_error", "bad_target",
                 id="crlf-in-the-path"),
    pytest.param(get(b"api.openai.com:443", method=b"CONNECT"), 400, "invalid_request_error",
                 "bad_target", id="connect"),
    pytest.param(get(b"*", method=b"OPTIONS"), 400, "invalid_request_error", "bad_target",
                 id="asterisk-form"),
    pytest.param(get(b"/v1/models").replace(b"HTTP/1.1", b"HTTP/7.1"), 400,
                 "invalid_request_error", "bad_request_line", id="unknown-http-version"),
    # llhttp parses these two; the proxy serves only 1.0 and 1.1.
    pytest.param(get(b"/v1/models").replace(b"HTTP/1.1", b"HTTP/2.0"), 400,
                 "invalid_request_error", "bad_request_line", id="http-2.0"),
    pytest.param(get(b"/v1/models").replace(b"HTTP/1.1", b"HTTP/0.9"), 400,
                 "invalid_request_error", "bad_request_line", id="http-0.9"),
    pytest.param(post(body=RESPONSES_STREAM).replace(b"chat/completions HTTP/1.1",
                                                     b"responses HTTP/2.0"),
                 400, "invalid_request_error", "bad_request_line",
                 id="streamed-responses-over-http-2.0"),
    pytest.param(get(b"/v1 models"), 400, "invalid_request_error", "bad_request_line",
                 id="space-in-the-target"),
]


def records_about(caplog: pytest.LogCaptureFixture, request_id: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "request_id", None) == request_id]


def assert_no_secret_logged(caplog: pytest.LogCaptureFixture) -> None:
    assert KEY not in caplog.text
    assert KEY[:12] not in caplog.text
    assert all(r.levelno < logging.ERROR for r in caplog.records), caplog.text


async def still_serves(url: str) -> None:
    answer = await exchange(url, post(b"Connection: close"))
    assert answer.status == 200, answer


@pytest.mark.parametrize(("request_bytes", "status", "error_code", "reason"), PARSER_CASES)
async def test_a_request_the_parser_refuses_gets_an_openai_error(
    make_proxy: ProxyFactory,
    caplog: pytest.LogCaptureFixture,
    request_bytes: bytes,
    status: int,
    error_code: str,
    reason: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    proxy = await make_proxy(ROUTES)
    answer = await exchange(proxy.url, request_bytes)
    assert answer.status == status, answer
    err = answer.error()
    assert err["code"] == error_code
    assert err["type"] == "invalid_request_error"
    assert KEY.encode() not in answer.body
    request_id = answer.headers["x-request-id"]
    assert REQUEST_ID.fullmatch(request_id)
    assert "server-timing" in answer.headers
    assert answer.headers["connection"].lower() == "close"
    logged = records_about(caplog, request_id)
    assert len(logged) == 1, caplog.text
    assert logged[0].levelno <= logging.WARNING
    assert_no_secret_logged(caplog)
    metrics = await scrape(proxy.url)
    assert value(metrics, "agentproxy_rejected_requests_total", reason=reason) == 1
    await still_serves(proxy.url)


async def test_tls_on_the_plain_port_is_refused_quietly(
    make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # Scanners and misconfigured clients do this all day: a debug line, not a warning.
    caplog.set_level(logging.DEBUG)
    proxy = await make_proxy(ROUTES)
    hello = bytes.fromhex("16030100a5010000a10303") + b"\x00" * 40
    answer = await exchange(proxy.url, hello)
    assert answer.status == 400
    assert answer.error()["code"] == "invalid_request_error"
    logged = records_about(caplog, answer.headers["x-request-id"])
    assert [r.levelno for r in logged] == [logging.DEBUG]
    metrics = await scrape(proxy.url)
    assert value(metrics, "agentproxy_rejected_requests_total", reason="bad_request_line") == 1


async def test_a_bad_gzip_body_is_one_400_and_no_error_log(
    make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    proxy = await make_proxy(ROUTES)
    packed = gzip.compress(CHAT + b" " * 100_000)
    broken = packed[:20] + b"\x00" * 50 + packed[70:]
    answer = await exchange(proxy.url, post(b"Content-Encoding: gzip", body=broken))
    assert answer.status == 400
    assert answer.error()["code"] == "invalid_request_error"
    assert REQUEST_ID.fullmatch(answer.headers["x-request-id"])
    assert_no_secret_logged(caplog)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) <= 1, caplog.text
    assert all(r.exc_info is None for r in caplog.records if r.levelno >= logging.INFO)
    metrics = await scrape(proxy.url)
    assert value(metrics, "agentproxy_rejected_requests_total", reason="bad_body") == 1
    await still_serves(proxy.url)


async def test_a_chunk_that_breaks_mid_body_is_a_400_not_a_hang(
    make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # Short header timeout: the connections are watched often. The body timeout is long, so
    # the answer cannot be the stall's 408.
    proxy = await make_proxy(ROUTES, header_timeout=0.4, body_timeout=60, keepalive_timeout=60)
    reader, writer = await connect(proxy.url)
    writer.write(post(b"Transfer-Encoding: chunked", b"Expect: 100-continue", body=b"",
                      length=False))
    await writer.drain()
    # The interim answer says the handler runs and the header section is parsed: what follows
    # reaches the parser on its own.
    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"5\r\nhello\r\nzz\r\n")
    await writer.drain()
    answer = await read_answer(reader)
    writer.close()
    assert answer.status == 400
    assert answer.error()["code"] == "invalid_request_error"
    assert_no_secret_logged(caplog)
    metrics = await scrape(proxy.url)
    assert value(metrics, "agentproxy_rejected_requests_total", reason="bad_framing") == 1
    await still_serves(proxy.url)


async def test_an_unknown_content_encoding_is_415_not_read_as_plain_bytes(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy(ROUTES)
    encodings = [b"compress", b"x-custom", b"gzip, br", b"gzip;q=1", b"\xc3\xa9"]
    messages = set()
    for encoding in encodings:
        answer = await exchange(proxy.url, post(b"Content-Encoding: " + encoding))
        assert answer.status == 415, (encoding, answer)
        err = answer.error()
        assert err["code"] == "unsupported_media_type"
        assert REQUEST_ID.fullmatch(answer.headers["x-request-id"])
        messages.add(err["message"])
    assert len(messages) == 1  # the same words for every value: none is quoted back
    metrics = await scrape(proxy.url)
    assert value(metrics, "agentproxy_rejected_requests_total",
                 reason="unsupported_encoding") == len(encodings)


@pytest.mark.parametrize("encoding", [b"identity", b"gzip", b"GZIP", b"deflate"])
async def test_the_encodings_the_proxy_decodes_are_served(
    make_proxy: ProxyFactory, encoding: bytes
) -> None:
    import zlib

    body = {
        b"identity": CHAT,
        b"gzip": gzip.compress(CHAT),
        b"GZIP": gzip.compress(CHAT),
        b"deflate": zlib.compress(CHAT),
    }[encoding]
    proxy = await make_proxy(ROUTES)
    answer = await exchange(
        proxy.url, post(b"Content-Encoding: " + encoding, b"Connection: close", body=body)
    )
    assert answer.status == 200, answer
