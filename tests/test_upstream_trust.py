"""What a hostile or broken upstream must not get the proxy to do (issue: hardening).

Each test drives the proxy over real HTTP with the official SDK (or raw aiohttp where the
SDK hides what is checked), against an aiohttp upstream on port 0 scripted per test.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict

from tests.conftest import KEY, ProxyFactory, serving, wait_for
from tests.fake_letta import FakeLetta
from tests.raw_http import exchange as raw_exchange

HI = [{"role": "user", "content": "hi"}]
SECRET = "sk-upstream-0123456789abcdef"
HEADER_SECRET = "hdr-secret-abcdef012345"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Scripted:
    """An upstream whose every route runs `handler`, recording the paths it was asked."""

    handler: Handler
    paths: list[str] = field(default_factory=list)
    headers: list[CIMultiDict[str]] = field(default_factory=list)

    def app(self) -> web.Application:
        async def any_route(request: web.Request) -> web.StreamResponse:
            self.paths.append(request.path_qs)
            self.headers.append(CIMultiDict(request.headers))
            await request.read()
            return await self.handler(request)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", any_route)
        return app


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Scripted, str]]:
    async def unset(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": {"message": "no script"}}, status=500)

    scripted = Scripted(unset)
    async with serving(scripted.app()) as url:
        yield scripted, url


def routes(url: str, extra_upstream: str = "", models: str = "") -> str:
    return f"""
upstreams:
  up:
    kind: openai
    url: {url}/v1
    api_key: ${{UP_KEY}}
    headers:
      X-Up-Token: ${{UP_HEADER}}
    forward_headers: [X-Session-Id, X-Trace]
{extra_upstream}
models:
  m:
    upstream: up
{models}
"""


@pytest.fixture(autouse=True)
def secrets_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UP_KEY", SECRET)
    monkeypatch.setenv("UP_HEADER", HEADER_SECRET)


def completion(text: str = "ok") -> dict[str, Any]:
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_an_upstream_redirect_is_not_followed_and_is_a_502_naming_the_status(
    make_proxy: ProxyFactory, upstream: tuple[Scripted, str], status: int
) -> None:
    scripted, url = upstream
    elsewhere = Scripted(lambda r: asyncio.sleep(0, web.json_response(completion())))
    async with serving(elsewhere.app()) as target:

        async def redirect(request: web.Request) -> web.StreamResponse:
            return web.Response(status=status, headers={"Location": target + "/steal"})

        scripted.handler = redirect
        proxy = await make_proxy(routes(url))
        with pytest.raises(openai.APIStatusError) as info:
            await proxy.client().chat.completions.create(model="m", messages=HI)
    assert info.value.status_code == 502
    assert f"HTTP {status}" in info.value.message
    # Neither the configured credentials nor the prompt went to the redirect's target.
    assert elsewhere.paths == []


async def test_credentials_an_upstream_echoes_back_are_scrubbed_from_the_client_and_the_log(
    make_proxy: ProxyFactory, upstream: tuple[Scripted, str], caplog: pytest.LogCaptureFixture
) -> None:
    scripted, url = upstream

    async def echo_auth(request: web.Request) -> web.StreamResponse:
        leak = f"bad request: Authorization={request.headers['Authorization']} " \
               f"token={request.headers['X-Up-Token']}"
        return web.json_response({"error": {"message": leak}}, status=400)

    scripted.handler = echo_auth
    proxy = await make_proxy(routes(url))
    with pytest.raises(openai.BadRequestError) as info:
        await proxy.client().chat.completions.create(model="m", messages=HI)
    message = info.value.message
    assert "Authorization=Bearer [redacted]" in message
    assert SECRET not in message and HEADER_SECRET not in message
    assert SECRET not in caplog.text and HEADER_SECRET not in caplog.text


async def test_credentials_echoed_in_a_stream_error_event_are_scrubbed(
    make_proxy: ProxyFactory, upstream: tuple[Scripted, str]
) -> None:
    scripted, url = upstream

    async def stream_leak(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        role = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
        await resp.write(b"data: " + orjson.dumps(role) + b"\n\n")
        leak = b'data: {"error": {"message": "key ' + SECRET.encode() + b' expired"}}\n\n'
        await resp.write(leak)
        return resp

    scripted.handler = stream_leak
    proxy = await make_proxy(routes(url))
    stream = await proxy.client().chat.completions.create(model="m", messages=HI, stream=True)
    with pytest.raises(openai.APIError) as info:
        [c async for c in stream]
    assert SECRET not in info.value.message and "[redacted]" in info.value.message


async def test_a_long_upstream_error_body_keeps_its_message(
    make_proxy: ProxyFactory, upstream: tuple[Scripted, str]
) -> None:
    scripted, url = upstream
    body = {"error": {"message": "field messages.3 is invalid", "detail": "x" * 300_000}}

    async def long_error(request: web.Request) -> web.StreamResponse:
        return web.json_response(body, status=400)

    scripted.handler = long_error
    proxy = await make_proxy(routes(url))
    with pytest.raises(openai.BadRequestError) as info:
        await proxy.client().chat.completions.create(model="m", messages=HI)
    assert "field messages.3 is invalid" in info.value.message


@pytest.mark.parametrize(
    ("header", "sent", "relayed"),
    [("Retry-After", "9999999999999999", "3600"),
     ("Retry-After", "9999999999999999.999999", "3600"),
     ("Retry-After", "0000000000003601", "3600"), ("Retry-After", "3600.5", "3600"),
     ("Retry-After", "3600", "3600"), ("Retry-After", "120", "120"),
     ("Retry-After", "Fri, 31 Dec 9999 23:59:59 GMT", "3600"),
     ("Retry-After", "Tue, 31 Feb 2026 07:28:00 GMT", None),
     # Azure OpenAI's header, which the SDKs read before Retry-After: milliseconds.
     ("retry-after-ms", "1000", "1000"), ("retry-after-ms", "1500.5", "1500.5"),
     ("retry-after-ms", "3600001", "3600000"), ("retry-after-ms", "soon", None),
     ("retry-after-ms", "-1", None)],
)
@pytest.mark.parametrize("stream", [False, True], ids=["sync", "stream"])
async def test_an_upstreams_retry_after_is_capped_at_an_hour(
    make_proxy: ProxyFactory, upstream: tuple[Scripted, str], header: str, sent: str,
    relayed: str | None, stream: bool,
) -> None:
    # The upstream must not choose how long a client that honours Retry-After stays away.
    scripted, url = upstream

    async def rate_limited(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": {"message": "slow down"}}, status=429,
                                 headers={header: sent})

    scripted.handler = rate_limited
    proxy = await make_proxy(routes(url))
    with pytest.raises(openai.RateLimitError) as info:
        await proxy.client().chat.completions.create(model="m", messages=HI, stream=stream)
    headers = info.value.response.headers
    assert headers.get(header) == relayed
    assert headers.get("retry-after-ms" if header == "Retry-After" else "Retry-After") is None
    assert info.value.body == {"message": "slow down", "type": "rate_limit_error",
                               "param": None, "code": "rate_limit_exceeded"}


@pytest.mark.parametrize(
    "name", ["Location", "WWW-Authenticate", "Access-Control-Allow-Origin", "Alt-Svc",
             "Strict-Transport-Security", "Set-Cookie"],
)
@pytest.mark.parametrize("stream", [False, True], ids=["sync", "stream"])
async def test_upstream_origin_headers_are_not_relayed(
    make_proxy: ProxyFactory, upstream: tuple[Scripted, str], name: str, stream: bool
) -> None:
    scripted, url = upstream

    async def answer(request: web.Request) -> web.StreamResponse:
        headers = {name: "https://upstream.invalid/x", "X-Kept": "yes"}
        if not stream:
            return web.json_response(completion(), headers=headers)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", **headers})
        await resp.prepare(request)
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                 "choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "stop"}]}
        await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\ndata: [DONE]\n\n")
        return resp

    scripted.handler = answer
    proxy = await make_proxy(routes(url))
    async with aiohttp.ClientSession() as http, http.post(
        proxy.url + "/v1/chat/completions",
        json={"model": "m", "messages": HI, "stream": stream},
        headers={"Authorization": f"Bearer {KEY}"},
    ) as resp:
        await resp.read()
        assert resp.status == 200
        assert resp.headers.get("X-Kept") == "yes"
        assert name not in resp.headers


async def test_client_headers_named_in_its_connection_header_are_not_forwarded(
    make_proxy: ProxyFactory, upstream: tuple[Scripted, str]
) -> None:
    scripted, url = upstream

    async def answer(request: web.Request) -> web.StreamResponse:
        return web.json_response(completion())

    scripted.handler = answer
    proxy = await make_proxy(routes(url))
    client = proxy.client()
    await client.chat.completions.create(
        model="m", messages=HI,
        extra_headers={"X-Session-Id": "s1", "X-Trace": "t1", "Connection": "keep-alive, X-Trace"},
    )
    sent = scripted.headers[-1]
    assert sent.get("X-Session-Id") == "s1"
    assert "X-Trace" not in sent


CUSTOM_FORWARDING = """
upstreams:
  up:
    kind: custom
    url: {url}
    forward_headers: [X-Trace]
    request:
      path: /say
      body: {{prompt: "{{{{ transcript }}}}"}}
    sync:
      text: "choices[0].message.content"
    stream:
      framing: text
models:
  m: {{upstream: up}}
"""


@pytest.mark.parametrize("kind", ["openai", "custom"])
@pytest.mark.parametrize("stream", [False, True], ids=["sync", "stream"])
async def test_a_forwarded_header_that_is_not_utf8_is_refused_naming_it(
    make_proxy: ProxyFactory, upstream: tuple[Scripted, str], stream: bool, kind: str
) -> None:
    """aiohttp's client writes header values as UTF-8 and drops bytes that are not: rather
    than send the upstream another value than the client's, the proxy answers a 400 naming
    the header. A UTF-8 value goes on byte for byte."""
    scripted, url = upstream
    received: list[list[bytes]] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        received.append([v for k, v in request.raw_headers if k.lower() == b"x-trace"])
        if not stream:
            return web.json_response(completion())
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                 "choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "stop"}]}
        return web.Response(body=b"data: " + orjson.dumps(chunk) + b"\n\ndata: [DONE]\n\n",
                            content_type="text/event-stream")

    async def text(request: web.Request) -> web.StreamResponse:
        received.append([v for k, v in request.raw_headers if k.lower() == b"x-trace"])
        if not stream:
            return web.json_response(completion())
        return web.Response(body=b"ok", content_type="text/plain")

    scripted.handler = answer if kind == "openai" else text
    proxy = await make_proxy(routes(url) if kind == "openai" else CUSTOM_FORWARDING.format(url=url))
    body = orjson.dumps({"model": "m", "messages": HI, "stream": stream})

    def request(value: bytes) -> bytes:
        return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer "
                + KEY.encode() + b"\r\nContent-Type: application/json\r\nX-Trace: " + value
                + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    utf8 = "caf\u00e9 \u2028 \u4e2d".encode()
    assert (await raw_exchange(proxy.url, request(utf8))).status == 200
    assert received == [[utf8]]
    for value in (b"\xff\xfe", b"caf\xc3", b"ok \x80\x81"):
        refused = await raw_exchange(proxy.url, request(value))
        assert refused.status == 400, refused
        err = refused.error()
        assert err["code"] == "invalid_request_error" and "x-trace" in str(err["message"]).lower()
    assert len(received) == 1


async def test_a_request_without_model_from_a_key_barred_from_the_default_does_not_name_it(
    make_proxy: ProxyFactory, upstream: tuple[Scripted, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, url = upstream
    monkeypatch.setenv("LIMITED", "sk-limited-0000000000000000")
    proxy = await make_proxy(
        routes(url, models='  "other":\n    upstream: up\n')
        + "auth:\n  keys:\n    - key: ${LIMITED}\n      models: [other]\n",
        keys=(),
    )
    async with aiohttp.ClientSession() as http, http.post(
        proxy.url + "/v1/chat/completions", json={"messages": HI},
        headers={"Authorization": "Bearer sk-limited-0000000000000000"},
    ) as resp:
        body = await resp.json()
    assert resp.status == 400
    assert body["error"]["param"] == "model"
    assert '"m"' not in body["error"]["message"] and "`m`" not in body["error"]["message"]


async def test_the_wildcard_listing_fails_over_like_a_request(
    make_proxy: ProxyFactory, upstream: tuple[Scripted, str]
) -> None:
    broken, broken_url = upstream

    async def fail(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": {"message": "down"}}, status=503)

    broken.handler = fail

    async def models(request: web.Request) -> web.StreamResponse:
        return web.json_response({"object": "list", "data": [{"id": "llama"}]})

    good = Scripted(models)
    async with serving(good.app()) as good_url:
        proxy = await make_proxy(f"""
upstreams:
  a:
    kind: openai
    url: {broken_url}/v1
  b:
    kind: openai
    url: {good_url}/v1
models:
  "local/*":
    upstream: [a, b]
""")
        ids = [m.id for m in (await proxy.client().models.list()).data]
    assert ids == ["local/llama"]
    assert broken.paths == ["/v1/models"]


async def test_letta_ids_that_are_not_letta_shaped_never_reach_a_url_path(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    state, url = letta
    state.agents = [{"id": "../../admin/x?y=1#", "name": "support-bot"}]
    proxy = await make_proxy(f"""
upstreams:
  letta:
    kind: letta
    url: {url}
models:
  support:
    upstream: letta
    agent: support-bot
""")
    with pytest.raises(openai.APIStatusError) as info:
        await proxy.client().chat.completions.create(model="support", messages=HI)
    assert info.value.status_code == 502
    assert all("admin" not in r.path for r in state.requests)


async def test_a_client_that_stops_reading_is_cut_off_and_frees_its_slot(
    make_proxy: ProxyFactory, upstream: tuple[Scripted, str]
) -> None:
    scripted, url = upstream
    big = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
           "choices": [{"index": 0, "delta": {"content": "x" * 60_000}, "finish_reason": None}]}
    event = b"data: " + orjson.dumps(big) + b"\n\n"
    gone = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        if not orjson.loads(await request.read()).get("stream"):
            return web.json_response(completion())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            while True:
                await resp.write(event)
        except (ConnectionResetError, asyncio.CancelledError):
            gone.set()
            raise

    scripted.handler = endless
    proxy = await make_proxy(
        routes(url, extra_upstream="    max_concurrency: 1\n    queue_timeout: 0\n"),
        send_timeout=1.0,
    )
    reader, writer = await asyncio.open_connection(*proxy.url.removeprefix("http://").split(":"))
    body = orjson.dumps({"model": "m", "stream": True, "messages": HI})
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    await reader.readuntil(b"\r\n\r\n")  # the 200 went out; now this client never reads again
    started = time.monotonic()
    # The upstream is let go and the slot freed within the send timeout (plus the sweep).
    await asyncio.wait_for(gone.wait(), 10)
    assert time.monotonic() - started < 8
    answer = await proxy.client().chat.completions.create(model="m", messages=HI)
    assert answer.choices[0].message.content == "ok"
    writer.close()


async def test_echo_of_a_huge_message_is_capped_and_never_stalls_the_worker(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy(
        "upstreams:\n  demo:\n    kind: echo\nmodels:\n  echo:\n    upstream: demo\n"
    )
    huge = "word " * 800_000  # 4 MB
    client = proxy.client()
    stream_task = asyncio.create_task(
        client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": huge}], stream=True
        )
    )
    async with aiohttp.ClientSession() as http:
        # /healthz stays responsive while the echo runs.
        worst = 0.0
        while not stream_task.done():
            started = time.monotonic()
            async with http.get(proxy.url + "/healthz") as resp:
                assert resp.status == 200
            worst = max(worst, time.monotonic() - started)
        stream = stream_task.result()
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert len(text) < 70_000
    assert "cut at" in text
    assert worst < 1.0


async def test_streams_whose_client_left_are_no_longer_watched_for_the_send_timeout(
    make_proxy: ProxyFactory, upstream: tuple[Scripted, str]
) -> None:
    scripted, url = upstream
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]}

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        with contextlib.suppress(ConnectionResetError, asyncio.CancelledError):
            while True:
                await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
                await asyncio.sleep(0.01)
        return resp

    scripted.handler = endless
    proxy = await make_proxy(routes(url))
    streams = proxy.holder.state.streams
    for _ in range(5):
        async with aiohttp.ClientSession() as http:
            resp = await http.post(
                proxy.url + "/v1/chat/completions",
                json={"model": "m", "stream": True, "messages": HI},
                headers={"Authorization": f"Bearer {KEY}"},
            )
            await resp.content.readline()
            resp.close()  # the client leaves mid-stream
    await wait_for(lambda: len(streams) == 0)


@pytest.mark.parametrize("kind", ["openai", "custom"])
async def test_every_line_of_a_forwarded_header_goes_on_unless_a_connection_line_names_it(
    make_proxy: ProxyFactory, upstream: tuple[Scripted, str], kind: str
) -> None:
    """Every line of a forwarded header reaches the upstream, not only the first; and every
    `Connection` line counts, so a header named on its second line stays on the client's hop."""
    scripted, url = upstream
    received: list[list[bytes]] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        received.append([v for k, v in request.raw_headers if k.lower() == b"x-trace"])
        return web.json_response(completion())

    scripted.handler = answer
    proxy = await make_proxy(routes(url) if kind == "openai" else CUSTOM_FORWARDING.format(url=url))
    body = orjson.dumps({"model": "m", "messages": HI})

    def request(extra: bytes) -> bytes:
        return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer "
                + KEY.encode() + b"\r\nContent-Type: application/json\r\n" + extra
                + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    lines = b"X-Trace: a\r\nX-Trace: b, c\r\n"
    assert (await raw_exchange(proxy.url, request(lines))).status == 200
    hop = b"Connection: keep-alive\r\nConnection: X-Trace\r\n"
    assert (await raw_exchange(proxy.url, request(hop + lines))).status == 200
    assert received == [[b"a", b"b, c"], []]
