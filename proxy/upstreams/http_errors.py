"""Mapping an upstream's HTTP failures to the proxy's error tree, shared by every HTTP kind."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
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
# upstream must not be able to make that unbounded. The one bound of every answer the proxy
# holds: a body read whole, the text of a sync answer built from a stream (letta, custom), and
# what a Responses writer keeps for its final object.
MAX_ANSWER = 64 * 1024 * 1024
# A Retry-After passed on to the client: seconds (with a fraction, as some servers send and
# the SDKs read) or an HTTP date (RFC 9110 §10.2.3). Anything else, a control byte above all
# (aiohttp's server would refuse to write it and the client would get no answer), is dropped.
_RETRY_AFTER = re.compile(
    r"[0-9]{1,16}(?:\.[0-9]{1,6})?"
    r"|[A-Za-z]{3}, [0-9]{2} [A-Za-z]{3} [0-9]{4} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT"
)
# The longest wait passed on, in seconds: the upstream would otherwise choose how long a client
# that honours Retry-After stays away (years, from a hostile one). A limit longer than an hour
# is a quota for the operator to see to, not a back-off.
MAX_RETRY_AFTER = 3600
# `retry-after-ms` (Azure OpenAI's; the OpenAI SDKs read it before Retry-After): milliseconds.
_RETRY_AFTER_MS = re.compile(r"[0-9]{1,16}(?:\.[0-9]{1,6})?")


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
    return answer_too_large(f"Upstream '{upstream}'", limit)


def answer_too_large(who: str = "The upstream", limit: int = MAX_ANSWER) -> UpstreamFailed:
    """The failure of an answer past MAX_ANSWER (counted in bytes, or in characters of its
    text, which are never more than its UTF-8 bytes)."""
    return UpstreamFailed(
        f"{who} answered with more than {limit} bytes, over the proxy's limit for one answer."
    )


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


def retry_after(headers: Mapping[str, str]) -> dict[str, str] | None:
    """The upstream's Retry-After and retry-after-ms to pass on with its 429, if they are
    plain ones, as they came up to MAX_RETRY_AFTER seconds."""
    out: dict[str, str] = {}
    ms = headers.get("retry-after-ms")
    if ms is not None and _RETRY_AFTER_MS.fullmatch(ms) is not None:
        cap = MAX_RETRY_AFTER * 1000
        out["retry-after-ms"] = ms if float(ms) <= cap else str(cap)
    retry = headers.get("Retry-After")
    if retry is None or _RETRY_AFTER.fullmatch(retry) is None:
        return out or None
    if retry[0].isdigit():
        wait = float(retry)
    else:
        try:
            wait = (parsedate_to_datetime(retry) - datetime.now(UTC)).total_seconds()
        except ValueError:  # the shape of a date, but none (31 Feb, hour 25)
            return out or None
    # Past the cap, in seconds, whatever the form: a date is the same wait, later.
    out["Retry-After"] = retry if wait <= MAX_RETRY_AFTER else str(MAX_RETRY_AFTER)
    return out


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
        try:
            return {"message": orjson.dumps(detail).decode()[:1000]}
        except orjson.JSONEncodeError:  # nested deeper than orjson writes (it reads deeper)
            return {}
    if isinstance(parsed.get("message"), str):
        return {"message": parsed["message"]}
    return {}


def message_text(raw: Any) -> str:
    """The upstream's message as the client reads it: a string as it is; anything else as
    JSON, never as a Python repr (which would show the proxy's language to the client)."""
    if isinstance(raw, str):
        return raw[:2000]
    if raw is None or raw == "":
        return ""
    try:
        return orjson.dumps(raw).decode()[:2000]
    except TypeError:  # an integer past 64 bits: nothing a client needs
        return ""


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
    message = message_text(err.get("message"))
    if status in (401, 403):
        # The client's key is the proxy's business; the upstream's key is the operator's, so
        # the client must not see an auth error it cannot fix.
        return UpstreamFailed(
            f"Upstream '{upstream}' refused the proxy's credentials (HTTP {status})."
        )
    if status == 429:
        return RateLimited(
            message or f"Upstream '{upstream}' is rate limiting requests.",
            headers=retry_after(headers),
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
