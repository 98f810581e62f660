"""The one error tree of the proxy and its one renderer.

Every failure a client can see is a ProxyError: it knows its HTTP status, the OpenAI error
`type` and `code`, and a message that is safe to show (no secrets, no stack traces).
"""

from __future__ import annotations

from typing import Any

import orjson


class ProxyError(Exception):
    # Subclasses set these; an instance may refine them (an upstream's own status or code).
    status: int = 500
    type: str = "server_error"
    code: str | None = "internal_error"
    # Set on an upstream failure that came after the upstream may have acted on the request
    # (a Letta message sent): failover then reports it instead of trying the next upstream.
    delivered: bool = False

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.body())


class InvalidRequest(ProxyError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request_error"


class PreviousResponseNotFound(InvalidRequest):
    """A `previous_response_id` that does not verify: one answer for every reason, so a caller
    learns nothing about which check failed (tampered, expired, another key or route, garbage).
    """

    code = "previous_response_not_found"

    def __init__(self) -> None:
        super().__init__(
            "Previous response not found: the id is unknown, expired, or was issued for another "
            "API key or model. Start a new response without `previous_response_id`, sending the "
            "whole conversation in `input`.",
            param="previous_response_id",
        )


class AuthenticationFailed(ProxyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class NotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        # The client's own word, cut as the access line cuts it: a name of megabytes would
        # come back whole in every 404.
        if len(model) > 256:
            model = model[:256] + "…"
        super().__init__(
            f"The model `{model}` does not exist or you do not have access to it.",
            param="model",
        )


class MethodNotAllowed(ProxyError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class Conflict(ProxyError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class PayloadTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RequestTimeout(ProxyError):
    """The client stopped sending its request part-way."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class HeadersTooLarge(ProxyError):
    status = 431
    type = "invalid_request_error"
    code = "request_header_fields_too_large"


class UnsupportedMediaType(ProxyError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class RateLimited(ProxyError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class UpstreamClientError(ProxyError):
    """An upstream refused the request as the client's fault: its 4xx status is kept."""

    type = "invalid_request_error"
    code = "upstream_rejected"

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code)
        self.status = status
        if error_type:
            self.type = error_type


class UpstreamUnavailable(ProxyError):
    """The upstream could not be reached (refused, reset, DNS)."""

    status = 502
    type = "upstream_error"
    code = "upstream_unavailable"


class UpstreamFailed(ProxyError):
    """The upstream answered, but with a server error or something that is not valid."""

    status = 502
    type = "upstream_error"
    code = "upstream_error"


class UpstreamTimeout(ProxyError):
    status = 504
    type = "upstream_error"
    code = "upstream_timeout"


class ServiceUnavailable(ProxyError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


class InternalError(ProxyError):
    """A bug in the proxy. The message shown never carries the exception's text."""

    def __init__(self, request_id: str | None = None) -> None:
        ref = f" (request id {request_id})" if request_id else ""
        super().__init__(f"The proxy failed to handle the request{ref}.")
