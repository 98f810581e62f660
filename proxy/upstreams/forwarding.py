"""The client headers an upstream's `forward_headers` passes on (kinds openai and custom)."""

from __future__ import annotations

from multidict import CIMultiDict, MultiMapping

from proxy.errors import InvalidRequest


def forward(
    headers: CIMultiDict[str], client: MultiMapping[str], names: tuple[str, ...]
) -> None:
    """Copies the client's values of `names` into `headers`, except those its own
    `Connection` header names: they are for its hop only (RFC 9110 §7.6.1).

    Every line of a header counts (a client may send one on several lines, RFC 9110 §5.3):
    each line of a forwarded one goes on, and a name on any `Connection` line stays."""
    hop = {
        name.strip().lower()
        for line in client.getall("Connection", ())
        for name in line.split(",")
    }
    for name in names:
        values = client.getall(name, ())
        if not values or name.lower() in hop:
            continue
        for value in values:
            if not value.isascii():
                _check_utf8(name, value)
        headers[name] = values[0]
        for value in values[1:]:
            headers.add(name, value)


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
