"""A custom upstream's answer with a status that is not a success -> the proxy's error (sans-IO).

custom-apis.md §6.7, before anything is committed to the client:
- a 4xx keeps its status, with the message the block's `error_message` paths find in the
  body (a plain-text body's first line where the body is not JSON);
- 401 and 403 become 502: the proxy's own credentials are wrong, which the client cannot fix;
- 429 stays a rate limit (with the upstream's Retry-After), so failover may try the next
  upstream;
- 5xx becomes 502, with the upstream's message;
- a 3xx is never followed (proxy/upstreams/http.py) and is a 502 that says so.
The message is shortened to one line of at most 300 characters: agent servers put tracebacks
in their error bodies (Langflow), and those are for the operator's log, not the client.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from proxy.errors import ProxyError, RateLimited, UpstreamClientError, UpstreamFailed
from proxy.upstreams.custom_extract import ERROR_LIMIT, is_json_content_type, message_at
from proxy.upstreams.custom_paths import Getter
from proxy.upstreams.http_errors import error_from_response, retry_after
from proxy.upstreams.letta_translator import shorten

__all__ = ["refusal"]

_TEXT: Final = "text/plain"


def refusal(
    upstream: str,
    error_message: Getter,
    status: int,
    body: bytes,
    headers: Mapping[str, str],
) -> ProxyError:
    """The error for an upstream answer with a non-2xx `status` and this (bounded) body."""
    if 300 <= status < 400 or status in (401, 403):
        return error_from_response(upstream, status, b"", headers)
    message = _message(error_message, body, headers.get("Content-Type"))
    if status == 429:
        return RateLimited(
            message or f"Upstream '{upstream}' is rate limiting requests.",
            headers=retry_after(headers),
        )
    if 400 <= status < 500:
        return UpstreamClientError(
            status, message or f"Upstream '{upstream}' rejected the request (HTTP {status})."
        )
    detail = f": {message}" if message else ""
    return UpstreamFailed(f"Upstream '{upstream}' failed with HTTP {status}{detail}")


def _message(error_message: Getter, body: bytes, content_type: str | None) -> str | None:
    if not body:
        return None
    found = message_at(error_message, body)
    if found is not None or is_json_content_type(content_type):
        return found
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != _TEXT:
        # An HTML error page says nothing a client could use.
        return None
    text = shorten(body[: ERROR_LIMIT * 4].decode("utf-8", "replace"), ERROR_LIMIT)
    return text or None
