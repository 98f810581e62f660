"""What a custom upstream asks besides the chat turn itself: the session's lookup and create
requests, the cancel of a turn the client left, the model listing and the probe; and the
state of a turn in flight, which the cancel reads on.

Every request here is one JSON call answered within first_event under its own Deadlines, its
status mapped by custom_refusal.py and its message scrubbed of the upstream's credentials.
The chat turn itself is in custom.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import orjson
from multidict import CIMultiDictProxy
from yarl import URL

from proxy.config import UpstreamSpec
from proxy.errors import ProxyError, ServiceUnavailable, UpstreamFailed
from proxy.exchange import Exchange
from proxy.state import AppState
from proxy.upstreams.custom_extract import id_text, session_id_of
from proxy.upstreams.custom_reader import StreamReader
from proxy.upstreams.custom_refusal import refusal
from proxy.upstreams.custom_render import nested_too_deeply
from proxy.upstreams.custom_requests import RequestSpec
from proxy.upstreams.custom_sessions import SessionCache
from proxy.upstreams.custom_spec import CustomSpec
from proxy.upstreams.custom_template import CAPTURED_PREFIX
from proxy.upstreams.custom_values import with_captured
from proxy.upstreams.deadlines import Deadlines
from proxy.upstreams.http import HttpUpstream
from proxy.upstreams.http_errors import read_answer, read_error_body

__all__ = ["CANCEL_BUDGET", "TIMED_OUT", "CustomCalls", "TurnInFlight", "left_because", "let_go"]

log = logging.getLogger(__name__)

# The whole of a cancel: reading on for the values it needs, and the request itself.
CANCEL_BUDGET: Final = 2.0
_NONE: Final[frozenset[int]] = frozenset()
CLIENT_LEFT: Final = "after the client left"
TIMED_OUT: Final = "after its first_event or idle timeout ran out"


@dataclass(slots=True)
class TurnInFlight:
    """One chat turn in flight: how to read its answer, and what closing it must do."""

    values: dict[str, Any]
    # Where an id the answer reports is remembered (None: a random session key, which no
    # later turn will have).
    remember: str | None
    lock_key: str | None
    resp: aiohttp.ClientResponse
    deadlines: Deadlines
    # Read event by event (a StreamReader, made when reading starts) or as one JSON body.
    streamed: bool
    exchange: Exchange
    reader: StreamReader | None = None
    session_id: str | None = None
    at_eof: bool = False
    # The upstream ended the answer itself (its end, an error, EOF): nothing to cancel.
    finished: bool = False
    closed: bool = False
    # Why a turn left unfinished is cancelled, for the log (see left_because).
    cause: str = CLIENT_LEFT


class CustomCalls(HttpUpstream):
    """The adapter of a custom upstream, but for the chat turn (custom.Custom)."""

    def __init__(self, spec: UpstreamSpec, state: AppState) -> None:
        super().__init__(spec, state)
        self.custom = custom = spec.options_as(CustomSpec)
        # The base in its encoded form: rendered targets are encoded already, and a URL
        # built from both must not be normalised again (a `%2F` in a value stays one).
        self._root = str(URL(self.base))
        self._label = f"Upstream '{self.name}'"
        session = custom.session
        self._sessions = SessionCache(session.cache)
        # The server issues the session ids: never derived, only remembered or looked up.
        self._issued = session.lookup is not None or session.from_response is not None
        cancel = custom.cancel
        self._cancel_needs = frozenset(
            name[len(CAPTURED_PREFIX) :]
            for name in (cancel.names if cancel is not None else ())
            if name.startswith(CAPTURED_PREFIX)
        )
        # An issued id may first come in the answer the client left: the cancel waits for it.
        self._cancel_needs_id = (
            cancel is not None and self._issued and "session.id" in cancel.names
        )

    def _url(self, target: str) -> URL:
        return URL(self._root + target, encoded=True)

    async def _refused(self, resp: aiohttp.ClientResponse) -> ProxyError:
        try:
            body = await read_error_body(resp)
        finally:
            resp.release()
        return self.scrubbed(
            refusal(self.name, self.custom.error_message, resp.status, body, resp.headers)
        )

    # -- the session's own requests ----------------------------------------------------------

    async def _lookup(
        self, http: aiohttp.ClientSession, exchange: Exchange, values: Mapping[str, Any]
    ) -> str | None:
        lookup = self.custom.session.lookup
        assert lookup is not None
        found = await self._request(http, exchange, lookup.request, values)
        return session_id_of(lookup.id(found, "message"), self._label)

    async def _ensure_session(
        self,
        http: aiohttp.ClientSession,
        exchange: Exchange,
        key: str | None,
        values: Mapping[str, Any],
        again: bool,
    ) -> bool:
        """Creates the session unless it was created within `cache` seconds (remembered under
        `key`; None: a random session, created every time); True when it was not created now
        (so a 404 may mean it is gone)."""
        create = self.custom.session.create
        assert create is not None
        sid = values["session.id"]
        if key is not None and not again and sid is not None and self._sessions.get(key) == sid:
            return True
        await self._request(http, exchange, create.request, values, ok=create.ok, parse=False)
        if key is not None and sid is not None:
            self._sessions.put(key, sid)
        return False

    async def _cancel(self, turn: TurnInFlight, http: aiohttp.ClientSession) -> None:
        """The block's `cancel` request for a turn the client left (a background task);
        releases the turn's session lock at its end."""
        cancel = self.custom.cancel
        assert cancel is not None
        # A record of its own: the deadlines of the cancel call interrupt this task only.
        exchange = Exchange(0.0, "custom-cancel", asyncio.current_task())
        reader = turn.reader
        captured: dict[str, Any] = reader.captured if reader is not None else {}
        try:
            async with asyncio.timeout(CANCEL_BUDGET):
                # The values come from the stream: read on a little for them, unless the
                # answer ends meanwhile (then there is nothing to cancel).
                if (
                    reader is not None
                    and not self._has_cancel_values(turn, reader)
                    and not await self._read_on(turn, reader)
                ):
                    return
                turn.resp.close()
                missing = sorted(self._cancel_needs - captured.keys())
                values = turn.values
                if self._cancel_needs_id and values["session.id"] is None:
                    reported = reader.session_id if reader is not None else None
                    if reported is None:
                        missing.append("its session id")
                    values = {**values, "session.id": reported}
                if missing:
                    log.warning(
                        "could not cancel a turn on upstream %s: the stream never sent %s",
                        self.name, ", ".join(missing),
                    )
                    return
                await self._request(
                    http, exchange, cancel, with_captured(values, captured), parse=False
                )
            log.info("cancelled a turn on upstream %s %s", self.name, turn.cause)
        except (ProxyError, TimeoutError) as exc:
            message = exc.message if isinstance(exc, ProxyError) else "no answer in time"
            log.warning("cancelling a turn on upstream %s failed: %s", self.name,
                        self.scrub(message))
        finally:
            turn.resp.close()
            if turn.lock_key is not None:
                self.state.session_locks.release(turn.lock_key)

    def _has_cancel_values(self, turn: TurnInFlight, reader: StreamReader) -> bool:
        return self._cancel_needs <= reader.captured.keys() and not (
            self._cancel_needs_id
            and turn.values["session.id"] is None
            and reader.session_id is None
        )

    async def _read_on(self, turn: TurnInFlight, reader: StreamReader) -> bool:
        """Reads the abandoned stream until the cancel's values came; False when the answer
        ended meanwhile (nothing left to cancel)."""
        content = turn.resp.content
        try:
            while not self._has_cancel_values(turn, reader):
                data = await content.readany()
                if not data:
                    return False
                reader.feed(data)
                if reader.done:
                    return False
        except (aiohttp.ClientError, UpstreamFailed):
            return False
        return True

    async def _request(
        self,
        http: aiohttp.ClientSession,
        exchange: Exchange,
        request: RequestSpec,
        values: Mapping[str, Any],
        *,
        ok: frozenset[int] = _NONE,
        parse: bool = True,
    ) -> Any:
        """One call of the block besides the chat call (lookup, create, cancel, models),
        answered within first_event; its parsed JSON when `parse`."""
        url = self._url(request.target(values))
        body = request.render_body(values)
        try:
            data = None if body is None else orjson.dumps(body)
        except orjson.JSONEncodeError:  # a captured value too deep (cancel)
            raise nested_too_deeply() from None
        deadlines = self.deadlines(exchange)
        try:
            status, raw, headers = await deadlines.answer(
                self._fetch(http, request.method, url, data)
            )
        except BaseException as exc:
            raise self.failure(exc, answered=False) from None
        finally:
            deadlines.close()
        if not (200 <= status < 300 or status in ok):
            raise self.scrubbed(refusal(self.name, self.custom.error_message, status, raw, headers))
        if not parse:
            return None
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamFailed(
                f"{self._label} answered {request.method} {url.path} with a body that is not "
                "JSON."
            ) from None

    async def _fetch(
        self, http: aiohttp.ClientSession, method: str, url: URL, data: bytes | None
    ) -> tuple[int, bytes, CIMultiDictProxy[str]]:
        async with self.send(http, method, url, data=data) as resp:
            if 200 <= resp.status < 300:
                raw = await read_answer(resp, self.name)
            else:
                raw = await read_error_body(resp)
            return resp.status, raw, resp.headers

    # -- models and probes -------------------------------------------------------------------

    async def list_models(
        self, http: aiohttp.ClientSession, exchange: Exchange
    ) -> list[dict[str, Any]]:
        """The block's `models` listing: one card per item, its `id` the route's `{{ model }}`
        (unique ids, in the upstream's order)."""
        models = self.custom.models
        if models is None:
            return []
        listing = await self._request(http, exchange, models.request, {})
        items = models.items(listing, "message")
        if not isinstance(items, list):
            raise UpstreamFailed(
                f"{self._label} answered its models request without a list where `items` "
                "points."
            )
        cards: list[dict[str, Any]] = []
        seen: set[str] = set()
        for item in items:
            ident = id_text(models.id(item, "message"))
            if ident is None or ident in seen:
                continue
            seen.add(ident)
            card: dict[str, Any] = {"id": ident}
            name = models.name(item, "message") if models.name is not None else None
            if isinstance(name, str) and name:
                card["name"] = name
            cards.append(card)
        return cards

    async def probe(self, http: aiohttp.ClientSession, exchange: Exchange) -> None:
        """`check --probe`: the `models` request where the block has one, else a GET of the
        url, where any answer below 500 says the server is there (agent APIs rarely serve
        their root: 404 and 405 are normal)."""
        if self.custom.models is not None:
            await self.list_models(http, exchange)
            return
        deadlines = self.deadlines(exchange)
        try:
            status = await deadlines.answer(self._status(http))
        except BaseException as exc:
            raise self.failure(exc, answered=False) from None
        finally:
            deadlines.close()
        if status >= 500:
            raise UpstreamFailed(f"{self._label} answered a GET of its url with HTTP {status}.")

    async def _status(self, http: aiohttp.ClientSession) -> int:
        async with self.send(http, "GET", self._url("")) as resp:
            return resp.status


def left_because(exchange: Exchange) -> str:
    """Why the request let go of a turn still running: read when the turn is closed, while
    the drain's reason is still recorded (a sync answer) or its error already set (a stream,
    whose writer took the reason). A turn the upstream's deadline ended says so itself
    (TIMED_OUT): its reason was taken when the read raised."""
    reason = exchange.interrupted
    if reason == "drain" or exchange.error == ServiceUnavailable.code:
        return "because the proxy was shutting down"
    if reason == "send" or exchange.error == "send_timeout":
        return "after the client stopped reading"
    return CLIENT_LEFT


def let_go(turn: TurnInFlight) -> None:
    # A connection read to its end goes back to the pool; one cut short is closed.
    if turn.at_eof:
        turn.resp.release()
    else:
        turn.resp.close()
