"""Mapping an upstream's HTTP failures to the proxy's error tree, shared by every HTTP kind."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson

from proxy.errors import (
    ProxyError,
    RateLimited,
    UpstreamClientError,
    UpstreamFailed,
    UpstreamUnavailable,
)
from proxy.upstreams.bulk_read import read_whole

_MAX_ERROR_BODY = 1024 * 1024
# The message of a JSON error body cut at the read limit.
_CUT_MESSAGE = re.compile(rb'"message"\s*:\s*"((?:[^"\\]|\\.){0,4000})"')
# A whole JSON answer (a sync completion, a listing) is held in memory: a broken or hostile
# upstream must not be able to make that unbounded.
MAX_ANSWER = 64 * 1024 * 1024


async def read_answer(
    resp: aiohttp.ClientResponse, upstream: str, limit: int = MAX_ANSWER
) -> bytes:
    """The body of a successful answer; UpstreamFailed past `limit` bytes."""
    length = resp.content_length
    if length is not None and length > limit:
        raise _too_big(upstream, limit)
    body = await read_whole(resp.content, limit)
    if body is None:  # no Content-Length, or a body that inflates past it
        raise _too_big(upstream, limit)
    return body


def _too_big(upstream: str, limit: int) -> UpstreamFailed:
    return UpstreamFailed(f"Upstream '{upstream}' answered with more than {limit} bytes.")


async def read_error_body(resp: aiohttp.ClientResponse) -> bytes:
    """At most 1 MiB: an error page is read to explain the failure, never relayed whole.
    Enough that a long JSON error (a validation error that lists every field) still parses
    and keeps its message; past it, `_parse_error` looks for the message in what came."""
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in resp.content.iter_any():
            chunks.append(chunk)
            size += len(chunk)
            if size >= _MAX_ERROR_BODY:
                break
    except aiohttp.ClientError:
        pass
    return b"".join(chunks)[:_MAX_ERROR_BODY]


def connection_error(upstream: str, exc: aiohttp.ClientError) -> UpstreamUnavailable:
    if isinstance(exc, aiohttp.ClientConnectorError):
        reason = exc.strerror or type(exc.os_error).__name__
        what = f"cannot connect to {exc.host}:{exc.port} ({reason})"
    elif isinstance(exc, aiohttp.ServerDisconnectedError):
        what = "the connection was closed before an answer"
    else:
        what = f"connection failed ({type(exc).__name__})"
    return UpstreamUnavailable(f"Upstream '{upstream}' is unavailable: {what}.")


def _parse_error(body: bytes) -> dict[str, Any]:
    """The upstream's own error fields, from the shapes servers actually send."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        found = _CUT_MESSAGE.search(body)
        if found is None:
            return {}
        try:
            return {"message": orjson.loads(b'"' + found.group(1) + b'"')}
        except orjson.JSONDecodeError:
            return {}
    if not isinstance(parsed, dict):
        return {}
    err = parsed.get("error")
    if isinstance(err, dict):  # OpenAI, vLLM, LM Studio
        return err
    if isinstance(err, str):  # Ollama
        return {"message": err}
    detail = parsed.get("detail")  # FastAPI servers, Letta
    if isinstance(detail, str):
        return {"message": detail}
    if detail is not None:
        return {"message": orjson.dumps(detail).decode()[:1000]}
    if isinstance(parsed.get("message"), str):
        return {"message": parsed["message"]}
    return {}


def error_from_response(
    upstream: str, status: int, body: bytes, headers: Mapping[str, str]
) -> ProxyError:
    if 300 <= status < 400:
        # Never followed (see proxy/upstreams/http.py): the url is wrong, or the server is
        # not the one the route table means.
        return UpstreamFailed(
            f"Upstream '{upstream}' answered with a redirect (HTTP {status}), which the proxy "
            "does not follow; check the upstream's url."
        )
    err = _parse_error(body)
    message = str(err.get("message") or "")[:2000]
    if status in (401, 403):
        # The client's key is the proxy's business; the upstream's key is the operator's, so
        # the client must not see an auth error it cannot fix.
        return UpstreamFailed(
            f"Upstream '{upstream}' refused the proxy's credentials (HTTP {status})."
        )
    if status == 429:
        retry = headers.get("Retry-After")
        return RateLimited(
            message or f"Upstream '{upstream}' is rate limiting requests.",
            headers={"Retry-After": retry} if retry else None,
        )
    if 400 <= status < 500:
        param = err.get("param")
        code = err.get("code")
        etype = err.get("type")
        return UpstreamClientError(
            status,
            message or f"Upstream '{upstream}' rejected the request (HTTP {status}).",
            error_type=etype if isinstance(etype, str) else None,
            param=param if isinstance(param, str) else None,
            code=code if isinstance(code, str) else None,
        )
    detail = f": {message}" if message else ""
    return UpstreamFailed(f"Upstream '{upstream}' failed with HTTP {status}{detail}")
