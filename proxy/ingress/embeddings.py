"""`POST /v1/embeddings`: a pass-through to the upstreams that serve it (`Upstream.embeds`).

The body goes on as the client sent it with `model` rewritten to the upstream's name, and
the answer comes back with the client's name for the model; everything else, `encoding_format`
included, is untouched (openai-python asks for base64 and decodes it itself). A route whose
upstreams do not all serve embeddings, or a request without `model`, is a 400 naming `model`,
before any upstream call.
Failover and circuits are those of a chat turn.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.app_keys import HTTP, METRICS
from proxy.dispatch import with_failover
from proxy.errors import InvalidRequest
from proxy.failover import Lease
from proxy.handlers import accept, json_response, read_body, resolve_model
from proxy.json_body import load_object
from proxy.upstreams.base import Answer, Call

__all__ = ["embeddings", "parse_embeddings_request"]


def parse_embeddings_request(raw: bytes) -> dict[str, Any]:
    """The body, checked as far as the proxy needs it: an object with `input`, and `model`
    a non-empty string. The rest is the upstream's to judge."""
    body = load_object(raw)
    model = body.get("model")
    if model is None:
        # Not the first model of the table, as chat would take: vectors are only comparable
        # with those of one model, so the client must name it (OpenAI requires it too).
        raise InvalidRequest("Missing required parameter: 'model'.", param="model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' must be a non-empty string.", param="model")
    text = body.get("input")
    if text is None or text == "" or text == []:
        raise InvalidRequest(
            "Missing required parameter: 'input' (a string, an array of strings, or token "
            "arrays).",
            param="input",
        )
    return body


async def embeddings(request: web.Request) -> web.Response:
    exchange, table, grant = accept(request)
    raw = await read_body(request)
    app = request.app
    body = parse_embeddings_request(raw)
    route, model, upstream_model = resolve_model(table, body.get("model"), grant)
    exchange.model, exchange.route = model, route.name
    if not all(upstream.embeds for upstream in route.upstreams):
        raise InvalidRequest(
            f"The model {model} does not support embeddings: only models served by openai "
            "upstreams do.",
            param="model",
        )
    call = Call(
        body=body,
        client_model=model,
        upstream_model=upstream_model,
        stream=False,
        include_usage=False,
        headers=request.headers,
        key_id=grant.key_id,
        route=route.spec,
        exchange=exchange,
    )
    http = app[HTTP]

    async def attempt(lease: Lease) -> tuple[Lease, Answer]:
        return lease, await lease.upstream.embed(call, http)

    lease, answer = await with_failover(route, exchange, app[METRICS], attempt)
    lease.release()
    exchange.upstream = lease.upstream.name
    exchange.upstream_ms = answer.upstream_ms
    return json_response(answer.body(), headers=answer.headers)
