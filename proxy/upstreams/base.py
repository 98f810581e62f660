"""What every upstream kind implements, what a request hands it, and what it hands back.

A request hands an adapter a frozen `Call`; the adapter hands back a value: an `Answer` (a
whole completion, for clients that did not stream) or a stream. Nothing travels back on the
call. There are two kinds of stream:

* `ChunkStream` yields batches of the internal chunk language (proxy/chunks.py). Every kind
  can give one; it is what every ingress writer reads.
* `ByteStream` yields chat-completions SSE bytes as an `openai` upstream framed them: the fast
  path, taken only when the call says the ingress can pass them on untouched (`Call.raw`).

Both end by raising the stream's terminal error (a ProxyError) instead of ending quietly when
the upstream's stream broke, and neither yields the final `[DONE]`, which the writer adds.

What an adapter can do beyond a chat turn is a capability of its class or instance, read by the
ingress and the dispatch, never a comparison of kind names: `stateful` (sessions), `chains`
(continues `previous_response_id` itself), `embeds` (`/embeddings`) and `native_responses`
(relays `/responses` as its upstream serves it). A result that served a turn in an upstream
conversation says which one in `session`, so a Responses id can name it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar

import aiohttp
import orjson
from multidict import MultiMapping

from proxy.chunks import Out, chat_chunks, held_size
from proxy.config import ModelSpec, UpstreamSpec
from proxy.exchange import Exchange
from proxy.openai_types import ChatChunk, ChatCompletion
from proxy.state import AppState
from proxy.upstreams.deadlines import Deadlines
from proxy.upstreams.http_errors import MAX_ANSWER, answer_too_large

T = TypeVar("T")


class Call(NamedTuple):
    """One chat turn, as an ingress hands it to an upstream adapter: the chat-completions
    body (the Responses ingress translates to it first) and what the route and the client's
    request say about it. Immutable; a NamedTuple rather than a frozen dataclass, whose
    `__init__` costs a microsecond more on every request (one `object.__setattr__` a field)."""

    body: dict[str, Any]
    client_model: str
    upstream_model: str | None
    stream: bool
    include_usage: bool
    # The server's: a header the client sent on several lines is each of them.
    headers: MultiMapping[str]
    key_id: str
    route: ModelSpec
    # The per-request record: request id, and the task that deadlines interrupt.
    exchange: Exchange
    session_hint: str | None = None
    # The ingress passes an openai upstream's chat SSE bytes on as they are.
    raw: bool = False
    # Continue from this upstream conversation (a verified `previous_response_id`): an
    # upstream that `chains` forks it and runs the turn in the fork.
    fork_from: str | None = None
    # The turn must run in a conversation that can be continued later: where no session hint
    # selects one, a new conversation rather than the agent's default thread.
    new_conversation: bool = False
    # The client's Responses body, for an upstream with `native_responses` to relay as is.
    responses: Mapping[str, Any] | None = None


class Answer(NamedTuple):
    """A whole answer. `raw` is an openai upstream's body when it can be relayed as it is;
    `completion` is None only for an answer in another API's shape (a native Responses or an
    embeddings body), which `raw` then holds. `session`: the upstream conversation that served
    the turn, where the upstream keeps them."""

    completion: ChatCompletion | None
    headers: tuple[tuple[str, str], ...] = ()
    upstream_ms: float = 0.0
    raw: bytes | None = None
    session: str | None = None
    # The chunks `completion` accumulates, where the adapter had them: a writer of another API
    # reads these rather than chunks rebuilt from the completion, which has lost their order
    # (text, then a tool summary, then text again).
    chunks: list[ChatChunk] | None = None

    def body(self) -> bytes:
        return self.raw if self.raw is not None else orjson.dumps(self.completion)


async def hold_answer(batches: AsyncIterator[list[Out]], who: str) -> list[ChatChunk]:
    """The chunks of a whole answer (for a client that did not stream); UpstreamFailed once
    what they hold passes MAX_ANSWER: an upstream that streams without end must not make the
    proxy hold an answer without end. Counted as the batches come, not summed again."""
    chunks: list[ChatChunk] = []
    size = 0
    async for batch in batches:
        size += held_size(batch)
        if size > MAX_ANSWER:
            raise answer_too_large(who)
        chunks.extend(chat_chunks(batch))
    return chunks


class Stream(Generic[T]):
    """The events of one upstream answer, and what must be let go when it ends.

    Iterating yields the events themselves (no wrapper per event); `aclose()` stops the
    deadlines, closes the generator and then runs `on_close` exactly once, even if iteration
    never started, which a bare async generator would not do.
    """

    __slots__ = ("_deadlines", "_events", "_on_close", "headers", "session", "upstream_ms")

    def __init__(
        self,
        events: AsyncGenerator[T, None],
        *,
        on_close: Callable[[], Awaitable[None]] | None = None,
        deadlines: Deadlines | None = None,
        headers: tuple[tuple[str, str], ...] = (),
        upstream_ms: float = 0.0,
        session: str | None = None,
    ) -> None:
        self._events = events
        self._on_close = on_close
        self._deadlines = deadlines
        self.headers = headers
        self.upstream_ms = upstream_ms
        # The upstream conversation that serves the turn (see Answer.session).
        self.session = session

    def __aiter__(self) -> AsyncIterator[T]:
        return self._events

    async def aclose(self) -> None:
        if self._deadlines is not None:
            self._deadlines.close()
        try:
            await self._events.aclose()
        finally:
            on_close, self._on_close = self._on_close, None
            if on_close is not None:
                await on_close()


class ChunkStream(Stream[list[Out]]):
    __slots__ = ()


class ByteStream(Stream[bytes]):
    """SSE bytes as the upstream framed them: chat events (`Call.raw`), or Responses events
    from an upstream with `native_responses`. Whole events per item; comments alone."""

    __slots__ = ()


class Upstream(ABC):
    """One configured upstream. Adapters raise only ProxyError subclasses.

    `open_stream` returns only once the upstream accepted the request, so the ingress commits
    the 200 after that; errors raised while iterating become the stream's terminal error.
    """

    kind: ClassVar[str] = ""
    # It continues a Responses `previous_response_id` itself (`Call.fork_from`) and reports
    # the conversation of each turn; routes of other kinds refuse the stateful fields.
    chains: ClassVar[bool] = False
    # It serves `POST /embeddings` (`embed`).
    embeds: ClassVar[bool] = False

    @property
    def wants_session(self) -> bool:
        """Requests to it carry a session hint even if its kind keeps no sessions (an
        `openai` upstream with a `session_header`)."""
        return False

    def __init__(self, spec: UpstreamSpec, state: AppState) -> None:
        self.spec = spec
        self.name = spec.name
        self.state = state
        self.health = state.health.get(spec)

    @abstractmethod
    async def complete(self, call: Call, http: aiohttp.ClientSession) -> Answer:
        """The whole answer."""

    @abstractmethod
    async def open_stream(
        self, call: Call, http: aiohttp.ClientSession
    ) -> ChunkStream | ByteStream:
        """The answer's events, after the upstream accepted the request."""

    @property
    def native_responses(self) -> bool:
        """It relays a Responses request to its upstream's own `/responses` (`respond`,
        `open_responses`) instead of translating it to a chat turn."""
        return False

    async def respond(self, call: Call, http: aiohttp.ClientSession) -> Answer:
        """The upstream's own Responses object for `call.responses` (`raw`)."""
        raise NotImplementedError(f"upstream kind {self.kind} does not relay /responses")

    async def open_responses(self, call: Call, http: aiohttp.ClientSession) -> ByteStream:
        """The upstream's own Responses events for `call.responses`."""
        raise NotImplementedError(f"upstream kind {self.kind} does not relay /responses")

    async def embed(self, call: Call, http: aiohttp.ClientSession) -> Answer:
        """The upstream's embeddings answer for `call.body` (`raw`)."""
        raise NotImplementedError(f"upstream kind {self.kind} does not serve embeddings")

    async def list_models(
        self, http: aiohttp.ClientSession, exchange: Exchange
    ) -> list[dict[str, Any]]:
        """Model cards the upstream offers, for `prefix/*` routes."""
        return []

    async def probe(self, http: aiohttp.ClientSession, exchange: Exchange) -> None:
        """`check --probe`: raises a ProxyError if the upstream does not answer as expected."""
        await self.list_models(http, exchange)

    async def probe_route(
        self, route: ModelSpec, http: aiohttp.ClientSession, exchange: Exchange
    ) -> list[tuple[str, str]]:
        """`check --probe` of one route to this upstream: (route key, message) for each
        problem (a Letta agent that does not resolve: `agent`)."""
        return []
