"""The chat completions API: `POST /v1/chat/completions`, sync and streaming.

Chunks are written as they are (one `data:` event each); an openai upstream's stream takes
the byte fast path instead (`Call.raw`), since nothing in it needs translating.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from proxy.app_keys import HTTP, METRICS
from proxy.chat_request import parse_chat_request
from proxy.chunks import Comment, Out, TextRun
from proxy.dispatch import serve
from proxy.errors import ProxyError
from proxy.handlers import accept, json_response, read_body, resolve_model
from proxy.ingress.streaming import relay
from proxy.sessions import session_hint
from proxy.sse import DONE, KEEPALIVE, encode_data, error_event
from proxy.upstreams.base import Call


class ChatEncoder:
    __slots__ = ()

    def batch(self, batch: list[Out]) -> bytes:
        encoded: list[bytes] = []
        for out in batch:
            if isinstance(out, Comment):
                encoded.append(KEEPALIVE)
            elif isinstance(out, TextRun):
                encoded += [encode_data(orjson.dumps(chunk)) for chunk in out.chunks()]
            else:
                encoded.append(encode_data(orjson.dumps(out)))
        return b"".join(encoded)

    def error(self, err: ProxyError) -> bytes:
        return error_event(err)

    def end(self) -> bytes:
        return DONE


_ENCODER = ChatEncoder()


async def chat_completions(request: web.Request) -> web.StreamResponse:
    exchange, table, grant = accept(request)
    raw = await read_body(request)
    app = request.app
    chat = parse_chat_request(raw)
    route, model, upstream_model = resolve_model(table, chat.model, grant)
    exchange.model, exchange.route, exchange.stream = model, route.name, chat.stream
    hint = None
    if route.stateful:
        hint = session_hint(
            request.headers, chat.body, model, from_user=route.spec.session.from_user
        )
    call = Call(
        body=chat.body,
        client_model=model,
        upstream_model=upstream_model,
        stream=chat.stream,
        include_usage=chat.include_usage,
        headers=request.headers,
        key_id=grant.key_id,
        route=route.spec,
        exchange=exchange,
        session_hint=hint,
        raw=True,
    )
    served = await serve(route, call, app[HTTP], app[METRICS])
    answer = served.answer
    if answer is not None:
        served.lease.release()
        return json_response(answer.body(), headers=answer.headers)
    return await relay(request, served, _ENCODER)
