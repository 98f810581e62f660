"""The client headers an upstream's `forward_headers` passes on (kinds openai and custom)."""

from __future__ import annotations

from collections.abc import Mapping

from multidict import CIMultiDict

from proxy.errors import InvalidRequest


def forward(
    headers: CIMultiDict[str], client: Mapping[str, str], names: tuple[str, ...]
) -> None:
    """Copies the client's values of `names` into `headers`, except those its own
    `Connection` header names: they are for its hop only (RFC 9110 §7.6.1)."""
    hop = {name.strip().lower() for name in client.get("Connection", "").split(",")}
    for name in names:
        value = client.get(name)
        if value is not None and name.lower() not in hop:
            if not value.isascii():
                _check_utf8(name, value)
            headers[name] = value


def _check_utf8(name: str, value: str) -> None:
    """aiohttp's server decodes a header value as UTF-8, each byte that is not kept as a
    surrogate escape; its client writes values as UTF-8 and drops those escapes (or fails,
    without its C extension), and any other spelling of the same bytes (latin-1) would go
    out as UTF-8 too. The upstream would get another value than the client sent: refused."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(
            f"The {name} header is not valid UTF-8, so it cannot be forwarded to the upstream "
            "as sent; send it as UTF-8 (or ASCII)."
        ) from None
