"""Requests refused before any handler runs: what the client is told, logged and counted.

aiohttp's HTTP parser refuses a malformed request by itself, with a plain-text 400 that quotes
the offending line and a traceback in the ERROR log that quotes it again: the client's key,
when the line is its `Authorization` header. Here each such refusal becomes an OpenAI-shaped
error with a request id and `Connection: close`; its log line (one, at WARNING or below) and
its message name the kind of fault, never a byte the client sent; `/metrics` counts it by
reason (`agentproxy_rejected_requests`). The server (proxy/http_server.py) calls these.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from aiohttp import web
from aiohttp.http_exceptions import (
    BadStatusLine,
    ContentEncodingError,
    HttpProcessingError,
    InvalidURLError,
    LineTooLong,
)

from proxy.app_keys import METRICS
from proxy.errors import (
    HeadersTooLarge,
    InvalidRequest,
    ProxyError,
    UnsupportedMediaType,
)
from proxy.metrics import Metrics

log = logging.getLogger("agentproxy.http")

# The Content-Encodings aiohttp decodes (br and zstd only where their codec is installed: the
# parser refuses them otherwise, before the app). Any other is not the client's JSON.
DECODED_ENCODINGS = frozenset({"identity", "gzip", "deflate", "br", "zstd"})
ENCODINGS_HINT = (
    "The request's Content-Encoding is not supported: send the body uncompressed, or "
    "compressed with gzip or deflate."
)
# llhttp's reason for a refusal opens aiohttp's message, before the quoted line: fixed English
# text. A message that is not of this shape is never shown (it may quote what was sent).
_PARSER_REASON = re.compile(r"([A-Za-z][A-Za-z ,'-]{2,80})(?::\n|\.?$)")
# The message of a Content-Encoding the parser could decode, were its codec installed.
_CODEC_MISSING = ("(br)", "(zstd)")
_FRAMING_WORDS = ("chunk", "transfer-encoding", "content-length")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CLOSE = {"Connection": "close"}


@dataclass(frozen=True, slots=True)
class Refusal:
    error: ProxyError
    reason: str  # the label of agentproxy_rejected_requests (metrics.REJECT_REASONS)


def parser_refusal(exc: BaseException | None) -> Refusal:
    """The answer to a request that aiohttp's HTTP parser refused with `exc`."""
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else "the limit of"
        return Refusal(
            HeadersTooLarge(
                f"The request line or a header line is longer than {limit} bytes.",
                headers=_CLOSE,
            ),
            "header_too_large",
        )
    message = exc.message if isinstance(exc, HttpProcessingError) else ""
    if isinstance(exc, ContentEncodingError):
        if any(codec in message for codec in _CODEC_MISSING):
            return Refusal(UnsupportedMediaType(ENCODINGS_HINT, headers=_CLOSE),
                           "unsupported_encoding")
        return Refusal(
            InvalidRequest(
                "The request body could not be decoded: it is not valid for its "
                "Content-Encoding.",
                headers=_CLOSE,
            ),
            "bad_body",
        )
    if isinstance(exc, BadStatusLine | InvalidURLError):
        return Refusal(
            InvalidRequest(
                "The request line is malformed: expected `METHOD /path HTTP/1.1`.",
                headers=_CLOSE,
            ),
            "bad_request_line",
        )
    found = _PARSER_REASON.match(message)
    detail = f" ({found.group(1)})" if found else ""
    if message == "Too many headers received":
        return Refusal(
            HeadersTooLarge("The request has too many header lines.", headers=_CLOSE),
            "header_too_large",
        )
    lowered = message.lower()
    if any(word in lowered for word in _FRAMING_WORDS):
        return Refusal(
            InvalidRequest(
                f"The request body's framing (Content-Length or chunked Transfer-Encoding) is "
                f"malformed{detail}.",
                headers=_CLOSE,
            ),
            "bad_framing",
        )
    return Refusal(
        InvalidRequest(f"The request's header section is malformed{detail}.", headers=_CLOSE),
        "bad_header",
    )


def body_refusal(exc: BaseException) -> Refusal:
    """The fault of a body that aiohttp could not read (its payload error wraps the parser's)."""
    cause = exc.__cause__
    if isinstance(cause, HttpProcessingError):
        return parser_refusal(cause)
    return parser_refusal(ContentEncodingError(""))


def target_refusal(method: str, path: str) -> Refusal:
    """A request whose target no route can match: CONNECT, `OPTIONS *`, control characters."""
    if method == "CONNECT":
        message = (
            "CONNECT is not served: this is an API server, not a forward proxy. Send requests "
            "such as POST /v1/chat/completions to it directly."
        )
    elif not path.startswith("/"):
        message = "The request target must be a path, such as /v1/chat/completions."
    elif _CONTROL.search(path):
        message = "The request path contains a control character (an encoded CR or LF?)."
    else:
        message = "The request target matches nothing this server serves."
    return Refusal(InvalidRequest(message, headers=_CLOSE), "bad_target")


def respond(err: ProxyError, request_id: str) -> web.Response:
    """The answer to a request that no handler saw: one the connection ends with."""
    response = web.Response(
        body=err.to_json(), status=err.status, content_type="application/json"
    )
    headers = response.headers
    headers.update(err.headers)
    headers["X-Request-Id"] = request_id
    # Refused at once: nothing upstream, and no measurable time of the proxy's own.
    headers["Server-Timing"] = "upstream;dur=0.00, proxy;dur=0.00"
    response.force_close()
    return response


def report(
    metrics: Metrics, refusal: Refusal, request_id: str | None, *, quiet: bool = False
) -> None:
    """Counts a refusal and logs it: once, with its kind and never the request's bytes.

    `quiet`: a debug line, for what scanners and TLS clients on the plain port send all day.
    """
    metrics.rejected(refusal.reason)
    err = refusal.error
    log.log(
        logging.DEBUG if quiet else logging.WARNING,
        "refused a malformed request: %s",
        err.message,
        extra={"request_id": request_id, "status": err.status, "reason": refusal.reason},
    )


def check_content_encoding(request: web.Request) -> None:
    """Refuses a body in a Content-Encoding that aiohttp would not decode: it would reach the
    handler as the encoded bytes. Called by the front before any handler reads the body."""
    encoding = request.headers.get("Content-Encoding")
    if encoding is None or not request.body_exists:
        return
    if encoding.isascii() and encoding.lower() in DECODED_ENCODINGS:
        return
    request.app[METRICS].rejected("unsupported_encoding")
    raise UnsupportedMediaType(ENCODINGS_HINT)
