"""The Responses API: `POST /v1/responses`, sync and streaming, on every route kind.

The request is translated to a chat turn (proxy/ingress/responses_request.py), served like
any chat turn (proxy/dispatch.py), and its chunks written as Responses events by a
ResponsesWriter; a sync answer is the same writer fed the answer's chunks, so it equals the
stream's final object. An upstream with `native_responses` gets the client's request instead
(`model` rewritten) and its answer is relayed as it is (proxy/ingress/responses_native.py).

Decisions:
* State. Routes whose upstreams do not `chain` keep nothing: every answer says
  `store: false`, and `previous_response_id`, `conversation` and `background: true` are a 400
  naming the parameter, before any upstream call (never silently dropped). Letta routes chain:
  the response id is signed (proxy/response_ids.py) over the model name the client used, the
  Letta conversation that served the turn, and the caller's key fingerprint; such an answer
  says `store: true`, since the conversation is kept (by Letta, not by the proxy).
* A `previous_response_id` is verified before any upstream call; whatever is wrong with it
  (tampered, expired, another key's or another model's, garbage) is one
  `previous_response_not_found` 400. The adapter then forks that conversation, and a session
  hint on the same request is ignored: the id names the branch.
* Without `previous_response_id`, a Letta route picks the conversation by the session-hint
  rules of chat. Where those would use the agent's default thread, which has no conversation
  id to continue from, the turn runs in a new conversation instead: a Responses request
  without `previous_response_id` starts a conversation, as it does at OpenAI.
* `GET/DELETE /v1/responses/{id}`, `.../cancel`, `.../input_items` are a 404: nothing is
  stored to retrieve.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import orjson
from aiohttp import web

from proxy.app_keys import HTTP, METRICS, RESPONSE_IDS, TABLES
from proxy.chunks import Out
from proxy.dispatch import serve
from proxy.errors import InvalidRequest, NotFound
from proxy.handlers import accept, authenticate, json_response, read_body, resolve_model
from proxy.ingress.responses_items import new_item_base
from proxy.ingress.responses_native import NativeEncoder, tracked
from proxy.ingress.responses_object import completion_response, response_base
from proxy.ingress.responses_request import (
    in_client_terms,
    parse_responses_request,
    refuse_state,
)
from proxy.ingress.responses_writer import ResponsesWriter
from proxy.ingress.streaming import relay
from proxy.response_ids import PREFIX as RESPONSE_PREFIX
from proxy.response_ids import ResponseIds, new_response_id
from proxy.sessions import session_hint
from proxy.upstreams.base import ByteStream, Call

__all__ = ["create_response", "render_sync", "stored_response", "unoffered_endpoint"]


async def create_response(request: web.Request) -> web.StreamResponse:
    exchange, table, grant = accept(request)
    raw = await read_body(request)
    app = request.app
    parsed = parse_responses_request(raw)
    route, model, upstream_model = resolve_model(table, parsed.model, grant)
    exchange.model, exchange.route, exchange.stream = model, route.name, parsed.stream
    chains = route.chains
    refuse_state(parsed, chains=chains)
    ids = app[RESPONSE_IDS]
    fork_from = None
    if parsed.previous_response_id is not None:
        fork_from = ids().verify(parsed.previous_response_id, model, grant.key_id).conversation
    hint = None
    if route.stateful and fork_from is None:
        hint = session_hint(
            request.headers, parsed.chat, model, from_user=route.spec.session.from_user
        )
    native: dict[str, Any] | None = None
    if route.native_responses:
        # Already parsed and checked once: this copy is what a native upstream gets.
        native = orjson.loads(raw)
    call = Call(
        body=parsed.chat,
        client_model=model,
        upstream_model=upstream_model,
        stream=parsed.stream,
        include_usage=True,
        headers=request.headers,
        key_id=grant.key_id,
        route=route.spec,
        exchange=exchange,
        session_hint=hint,
        fork_from=fork_from,
        new_conversation=chains,
        responses=native,
    )
    try:
        served = await serve(route, call, app[HTTP], app[METRICS])
    except InvalidRequest as err:
        # The adapter checked the chat messages translated from `input`.
        in_client_terms(parsed, err)
        raise
    answer = served.answer
    if answer is not None:
        served.lease.release()
        if served.native or answer.completion is None:
            return json_response(answer.body(), headers=answer.headers)
        if answer.chunks is not None:
            writer = _writer(ids, model, grant.key_id, answer.session, parsed.echo, events=False)
            final = render_sync(writer, [answer.chunks])
        else:
            # A whole completion (an openai upstream's): its object at once, no writer.
            response_id, store, item_base = _identity(ids, model, grant.key_id, answer.session)
            now = time.time()
            final = completion_response(
                answer.completion,
                response_base(response_id, model, now, parsed.echo, store), item_base, now,
            )
        return json_response(orjson.dumps(final), headers=answer.headers)
    stream = served.stream
    assert stream is not None
    if served.native and isinstance(stream, ByteStream):
        native_encoder = NativeEncoder(model, parsed.echo)
        if served.first is not None:
            native_encoder.see(served.first)
        served.stream = tracked(stream, native_encoder)
        return await relay(request, served, native_encoder)
    writer = _writer(ids, model, grant.key_id, stream.session, parsed.echo)
    return await relay(request, served, writer)


def _writer(
    ids: Callable[[], ResponseIds], model: str, key_id: str, session: str | None, echo: Any,
    *, events: bool = True,
) -> ResponsesWriter:
    response_id, store, item_base = _identity(ids, model, key_id, session)
    return ResponsesWriter(
        response_id, model, time.time(), echo, store=store, events=events, item_base=item_base
    )


def _identity(
    ids: Callable[[], ResponseIds], model: str, key_id: str, session: str | None
) -> tuple[str, bool, str]:
    """A response's id, its `store`, and the base of its item ids: a signed id that continues
    `session` where the upstream served the turn in a conversation, else a plain unique id of
    a response kept nowhere."""
    if session is None:
        response_id = new_response_id()
        # Unique to the response, so its item ids are too.
        return response_id, False, response_id[len(RESPONSE_PREFIX):]
    # A signed id's start is the same for every turn of a conversation: the item ids draw
    # their own.
    return ids().mint(model, session, key_id), True, new_item_base()


# What the Responses API offers beside responses that the proxy cannot: the reason for each.
_UNOFFERED: dict[str, str] = {
    "compact": (
        "This proxy does not compact conversations: OpenAI's compaction item is readable only "
        "by OpenAI's models. Compact on the client, or resend a shorter conversation in "
        "`input`."
    ),
    "input_tokens": (
        "This proxy does not count input tokens: the count depends on the upstream model's "
        "tokenizer, which the proxy does not have. A response's `usage` reports what was used."
    ),
}


async def unoffered_endpoint(request: web.Request) -> web.Response:
    """`POST /v1/responses/compact` and `/input_tokens`: a 404 saying why, not a 405 from
    the stored-response routes that the same paths would otherwise match."""
    authenticate(request, request.app[TABLES].current)
    raise NotFound(_UNOFFERED[request.path.rsplit("/", 1)[1]])


async def stored_response(request: web.Request) -> web.Response:
    """`GET/DELETE /v1/responses/{id}`, `/cancel`, `/input_items`: nothing is stored."""
    authenticate(request, request.app[TABLES].current)
    raise NotFound(
        "This proxy stores no responses, so none can be retrieved, deleted, cancelled or "
        "listed. To continue a conversation, send `previous_response_id` (models that keep "
        "conversations, such as Letta agents) or resend the conversation in `input`.",
        param="response_id",
    )


def render_sync(writer: ResponsesWriter, batches: Iterable[Sequence[Out]]) -> dict[str, Any]:
    """The sync answer: the stream's final object, from the same writer fed the same chunks
    (made with `events=False`, since nobody reads the events of a sync answer)."""
    writer.start()
    for batch in batches:
        writer.feed(batch)
    writer.finish()
    return writer.final()
