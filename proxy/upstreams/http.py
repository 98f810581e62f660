"""What every kind that talks HTTP shares: headers and credentials, timeouts, sending, and
the one mapping of aiohttp failures to the proxy's errors.

`failure()` is that mapping, used around both the request and the iteration of its body, so
an adapter's `except BaseException as exc: raise self.failure(exc, ...)` is all it needs.
Redirects are never followed: the upstream's headers (its API key) and the user's prompt
must not go to wherever a Location points; a 3xx is an upstream error.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson
from multidict import CIMultiDict
from yarl import URL

from proxy.config import UpstreamSpec
from proxy.errors import ProxyError, UpstreamFailed
from proxy.exchange import Exchange
from proxy.sse import SSEError
from proxy.state import AppState
from proxy.upstreams.base import Upstream
from proxy.upstreams.deadlines import Deadlines, client_timeout, timeout_error
from proxy.upstreams.http_errors import (
    connection_error,
    error_from_response,
    read_answer,
    read_error_body,
)

# Response headers the proxy sets itself; that describe one hop only (RFC 9110 §7.6.1); that
# speak for the upstream's origin rather than the proxy's (cookies, redirects, auth challenges,
# CORS, browser security and reporting policies, orders to the web server in front of it); or
# that describe the upstream's body, which the proxy re-encodes or translates (validators,
# ranges, caching, content digests).
_NOT_RELAYED = frozenset(
    {
        "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
        "proxy-authorization", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
        "content-length", "content-type", "content-encoding", "date", "server", "x-request-id",
        "server-timing", "set-cookie", "set-cookie2", "cache-control", "location", "refresh",
        "www-authenticate", "alt-svc", "strict-transport-security", "clear-site-data", "link",
        "content-security-policy", "content-security-policy-report-only", "content-disposition",
        "x-sendfile", "x-sendfile2", "x-lighttpd-send-file", "public-key-pins",
        "public-key-pins-report-only", "expect-ct", "nel", "report-to", "reporting-endpoints",
        "permissions-policy", "feature-policy", "referrer-policy", "x-frame-options",
        "x-xss-protection", "x-content-type-options", "timing-allow-origin",
        "cross-origin-opener-policy", "cross-origin-embedder-policy",
        "cross-origin-resource-policy", "etag", "last-modified", "content-md5", "digest",
        "content-digest", "repr-digest", "content-range", "content-location", "accept-ranges",
        "vary", "age", "expires", "pragma",
    }
)
_NOT_RELAYED_PREFIXES = ("access-control-", "x-accel-")
# What aiohttp's server refuses in a header (RFC 9110 §5.5): one such value and the client
# would get no answer at all, so the header is not relayed.
_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# The verdict for `Connection`: not relayed, and neither are the headers it names (RFC 9110
# §7.6.1). Compared by identity; no header name has a newline.
_CONNECTION = "\nconnection"
# Tokens of a Connection header that name no header to drop.
_NOT_NAMES = _NOT_RELAYED | {"close", ""}
# Header names an upstream sends are few and repeat: each name's verdict is remembered, up
# to this many names per upstream (the names come from the upstream, so the memo is bounded).
_VERDICTS_MAX = 512
_UNSEEN = ""
# Shorter configured values (`1`, `true`) are not secrets, and scrubbing them would mangle
# messages.
_SECRET_MIN = 6
REDACTED = "[redacted]"


class HttpUpstream(Upstream):
    """An upstream reached over HTTP at `spec.url`."""

    def __init__(self, spec: UpstreamSpec, state: AppState) -> None:
        super().__init__(spec, state)
        assert spec.url is not None
        self.base: str = spec.url
        headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        headers.update(self.extra_headers())
        if spec.api_key:
            headers["Authorization"] = f"Bearer {spec.api_key}"
        headers.update(spec.headers)
        # Built once per route table, in the type aiohttp would convert a dict to per request.
        self.headers: CIMultiDict[str] = CIMultiDict(headers)
        self.timeout = client_timeout(spec.timeouts)
        self._verdicts: dict[bytes, str | None] = {}
        # What the upstream must never get to show a client or a log: its configured
        # credentials, which a broken server may echo back in an error message.
        self._secrets = tuple(
            sorted(
                {v for v in (spec.api_key, *spec.headers.values()) if v and len(v) >= _SECRET_MIN},
                key=len,
                reverse=True,
            )
        )

    def extra_headers(self) -> dict[str, str]:
        """Headers the kind always sends (before the configured ones)."""
        return {}

    def deadlines(
        self, exchange: Exchange, keepalive: float | None = None, started: float | None = None
    ) -> Deadlines:
        return Deadlines(
            self.name, self.spec.timeouts, exchange, self.state.wheel, keepalive, started
        )

    def send(
        self,
        http: aiohttp.ClientSession,
        method: str,
        url: str | URL,
        *,
        data: bytes | None = None,
        params: Mapping[str, str] | None = None,
        headers: CIMultiDict[str] | None = None,
    ) -> aiohttp.client._RequestContextManager:
        # aiohttp's own awaitable, returned unawaited: the caller awaits it in place, since a
        # helper coroutine would be one more layer to pass at each suspension of the request.
        return http.request(
            method,
            url,
            data=data,
            params=params,
            headers=self.headers if headers is None else headers,
            timeout=self.timeout,
            allow_redirects=False,
        )

    def failure(
        self, exc: BaseException, *, answered: bool, what: str = "answer"
    ) -> BaseException:
        """What an exception out of sending a request (`answered` False) or reading its
        answer (`what`: "answer" or "stream") means to the client: `exc` itself when it
        already says it (the proxy's own errors, a cancellation)."""
        if isinstance(exc, ProxyError):
            return self.scrubbed(exc)
        if isinstance(exc, asyncio.CancelledError):
            return exc
        if isinstance(exc, TimeoutError):
            return timeout_error(self.name, self.spec.timeouts, exc)
        if isinstance(exc, SSEError):
            return UpstreamFailed(f"Upstream '{self.name}' sent a malformed stream: {exc}")
        if isinstance(exc, aiohttp.ClientError):
            if not answered:
                return connection_error(self.name, exc)
            # An answer under way broke: cut short, or a Content-Encoding it does not have.
            return UpstreamFailed(
                f"Upstream '{self.name}' closed the connection in the middle of the {what}."
            )
        return exc

    def scrub(self, text: str) -> str:
        """`text` with the upstream's configured credentials taken out."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def scrubbed(self, err: ProxyError) -> ProxyError:
        if self._secrets:
            err.message = self.scrub(err.message)
        return err

    def turn_failure(self, exc: BaseException) -> BaseException:
        """`failure` for a request that starts an agent's turn. Unless the connection was
        refused or never made, the upstream may have taken the turn and started on it even if
        no answer came back: the failure is reported, never sent to another upstream."""
        err = self.failure(exc, answered=False)
        if isinstance(err, ProxyError) and not isinstance(
            exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError
        ):
            err.delivered = True
        return err

    async def refused(self, resp: aiohttp.ClientResponse) -> ProxyError:
        """The error for an answer whose status is not a success; the response is released."""
        try:
            body = await read_error_body(resp)
        finally:
            resp.release()
        return self.scrubbed(error_from_response(self.name, resp.status, body, resp.headers))

    async def call_api(
        self,
        http: aiohttp.ClientSession,
        exchange: Exchange,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
    ) -> Any:
        """One JSON request to the upstream's API, within first_event; its parsed answer."""
        deadlines = self.deadlines(exchange)
        try:
            data = await deadlines.answer(
                self._json_call(http, method, self.base + path, params, body)
            )
        except BaseException as exc:
            raise self.failure(exc, answered=False) from None
        finally:
            deadlines.close()
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            raise UpstreamFailed(
                f"Upstream '{self.name}' answered {method} {path} with a body that is not JSON."
            ) from None

    async def _json_call(
        self,
        http: aiohttp.ClientSession,
        method: str,
        url: str,
        params: Mapping[str, str] | None,
        body: Any,
    ) -> bytes:
        data = None if body is None else orjson.dumps(body)
        async with self.send(http, method, url, data=data, params=params) as resp:
            if resp.status >= 300:
                raise await self.refused(resp)
            try:
                return await read_answer(resp, self.name)
            except aiohttp.ClientError as exc:
                raise self.failure(exc, answered=True) from None

    def relayable_headers(
        self, raw: tuple[tuple[bytes, bytes], ...]
    ) -> tuple[tuple[str, str], ...]:
        """The upstream's response headers that go on to the client, from the raw lines."""
        out: list[tuple[str, str]] = []
        verdicts = self._verdicts
        hops: str | None = None
        for name, value in raw:
            relayed = verdicts.get(name, _UNSEEN)
            if relayed is _UNSEEN:
                relayed = _verdict(name)
                if len(verdicts) < _VERDICTS_MAX:
                    verdicts[name] = relayed
            if relayed is None:
                continue
            # As aiohttp decodes header bytes, so what is relayed is what the client sent.
            text = value.decode("utf-8", "surrogateescape")
            if relayed is _CONNECTION:
                hops = text if hops is None else f"{hops},{text}"
            # isprintable() is one C call that passes nearly every value; the regex only
            # decides the rest (a tab, a non-ASCII space).
            elif text.isprintable() or _FORBIDDEN.search(text) is None:
                out.append((relayed, text))
        if hops is not None:
            listed = _hop_names(hops)
            if listed:
                out = [header for header in out if header[0].lower() not in listed]
        return tuple(out)


def _verdict(name: bytes) -> str | None:
    """The name a header is relayed under, None if it is not, `_CONNECTION` for Connection."""
    text = name.decode("utf-8", "surrogateescape")
    lower = text.lower()
    if lower == "connection":
        return _CONNECTION
    if (
        not lower
        or lower in _NOT_RELAYED
        or lower.startswith(_NOT_RELAYED_PREFIXES)
        or _FORBIDDEN.search(text) is not None
    ):
        return None
    return text


# Upstreams send the same one or two Connection values: their parses are remembered.
@functools.lru_cache(maxsize=64)
def _hop_names(connection: str) -> frozenset[str]:
    """The relayable header names a response's Connection header lists (lower case)."""
    return frozenset(token.strip().lower() for token in connection.split(",")) - _NOT_NAMES


def is_event_stream(content_type: str | None) -> bool:
    """Whether a Content-Type is an SSE stream: media types ignore case and may have
    parameters (`TEXT/EVENT-STREAM; charset=utf-8`)."""
    if content_type is None:
        return False
    return content_type.partition(";")[0].strip().lower() == "text/event-stream"


def let_go(resp: aiohttp.ClientResponse, done: bool) -> None:
    """The end of reading a streamed answer: after its clean end the connection goes back to
    the pool; otherwise (an error, a client gone) it is closed."""
    if done:
        resp.release()
    else:
        resp.close()
