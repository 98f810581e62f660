"""OpenAI chat request -> Letta request body, and session -> Letta conversation (sans-IO).

A Letta agent keeps its own history, while OpenAI clients (Open WebUI, LibreChat) resend the
whole chat on every turn: only the messages after the last assistant reply are new to the
agent. System prompts and tool results belong to the client's world, not the agent's: the
agent has its own system prompt and runs its own tools.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

import aiohttp

from proxy.errors import InvalidRequest, UpstreamTimeout
from proxy.exchange import Exchange
from proxy.sse import SSEDecoder
from proxy.upstreams.deadlines import Deadlines
from proxy.upstreams.letta_translator import LettaTranslator

SESSION_PREFIX = "agentproxy-session:"

# Why a run was cancelled, for the log line that says so: an operator must tell a client that
# left from an upstream that failed.
CLIENT_LEFT: Final = "the client left"
UPSTREAM_FAILED: Final = "the upstream's stream failed"


@dataclass(slots=True)
class LettaRun:
    """One Letta run in flight: what closing it must release or cancel."""

    agent_id: str
    lock_key: str
    # The conversation the turn runs in; None for the agent's default thread.
    conversation: str | None
    resp: aiohttp.ClientResponse
    translator: LettaTranslator
    # The turn's deadlines, from the moment the message was sent (not from the lookups).
    deadlines: Deadlines
    exchange: Exchange
    decoder: SSEDecoder = field(default_factory=SSEDecoder)
    saw_done: bool = False
    closed: bool = False
    # Why the stream ended before the run did (see cancel_cause).
    cause: str = CLIENT_LEFT

    @property
    def finished_upstream(self) -> bool:
        """Letta ended the run itself: nothing left to cancel."""
        return self.saw_done or self.translator.stop_reason is not None


def cancel_cause(exc: BaseException, exchange: Exchange) -> str:
    """Why the exception that ended a run's stream leaves the run to be cancelled."""
    if isinstance(exc, GeneratorExit):  # the writer stopped taking the stream
        return CLIENT_LEFT
    if isinstance(exc, asyncio.CancelledError):
        reason = exchange.interrupted
        if reason == "drain":
            return "the proxy's shutdown"
        if reason == "send":
            return "the client stopped reading"
        return CLIENT_LEFT
    if isinstance(exc, UpstreamTimeout | TimeoutError):
        return "the upstream timed out"
    return UPSTREAM_FAILED

_DROPPED_ROLES = frozenset({"assistant", "tool", "function"})
_SYSTEM_ROLES = frozenset({"system", "developer"})


def _forces_a_call(choice: Any) -> bool:
    if choice is None or choice in ("auto", "none"):
        return False
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        allowed = choice.get("allowed_tools")
        return not (isinstance(allowed, dict) and allowed.get("mode") == "auto")
    return True


_NO_LOGPROBS: Final = "This model reports no log probabilities."
_NO_CALLS: Final = (
    "This model cannot be made to call a tool: it never calls the client's tools (an agent "
    "runs its own)."
)
_TEXT_ONLY: Final = "This model answers in text only, never audio."
# The chat parameters that ask for another kind of answer than one choice of free text, and
# what each may hold without asking for one. The kinds that answer with one choice of free
# text (echo, letta, custom) refuse the rest rather than answer something else; parameters
# whose answer is still the one asked for (sampling, `max_tokens`, `stop`, `tools` without a
# forced call, `user`, `metadata`...) are ignored: the table in docs/http.md.
_UNSERVED: Final[dict[str, tuple[Callable[[Any], bool], str]]] = {
    "n": (lambda v: v is None or (type(v) is int and v == 1),
          "This model gives one choice per request, never several."),
    "logprobs": (lambda v: v is None or v is False, _NO_LOGPROBS),
    "top_logprobs": (lambda v: v is None or (type(v) is int and v == 0), _NO_LOGPROBS),
    "response_format": (
        lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
        "This model answers in free text: it cannot be held to JSON or a JSON schema.",
    ),
    "tool_choice": (lambda v: not _forces_a_call(v), _NO_CALLS),
    "function_call": (lambda v: v is None or v in ("auto", "none"), _NO_CALLS),
    "modalities": (
        lambda v: v is None or (isinstance(v, list) and all(m == "text" for m in v)), _TEXT_ONLY
    ),
    "audio": (lambda v: v is None, _TEXT_ONLY),
    "web_search_options": (
        lambda v: v is None,
        "This model cannot be asked to search the web: an agent uses its own tools.",
    ),
    # Scores or blocking the client would rely on, which nothing here produces.
    "moderation": (lambda v: v is None, "This model runs no moderation of its input or output."),
}


def refuse_unserved(body: Mapping[str, Any]) -> None:
    """Raises InvalidRequest naming the first parameter of a chat body that asks for an answer
    other than one choice of free text (`n: 3`, `logprobs`, a JSON `response_format`, a forced
    tool call, audio, a web search): served as if it were absent, the client would get
    something else than it asked for, without knowing. Checked before any upstream call."""
    if _UNSERVED.keys().isdisjoint(body):
        return
    for name, (serves, message) in _UNSERVED.items():
        if name in body and not serves(body[name]):
            raise InvalidRequest(message, param=name)


def new_turn_start(messages: list[dict[str, Any]]) -> int:
    """The index of the first message after the last assistant message (0 if there is none)."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "assistant":
            return i + 1
    return 0


def to_letta_messages(
    messages: list[dict[str, Any]],
    *,
    client_system: Literal["drop", "prepend"] = "drop",
    index_base: int = 0,
) -> list[dict[str, Any]]:
    """Letta `MessageCreate` dicts for the user messages of `messages`.

    `index_base` is where `messages` starts in the client's list, so that an error's `param`
    names the message the client sent (pass `new_turn_start(...)`).
    """
    out: list[dict[str, Any]] = []
    system_texts: list[str] = []
    for i, message in enumerate(messages, start=index_base):
        role = message.get("role")
        if role == "user":
            out.append(_user_message(message, i))
        elif role in _SYSTEM_ROLES:
            if client_system == "prepend":
                text = _plain_text(message.get("content"), f"messages[{i}].content")
                if text:
                    system_texts.append(text)
        elif role not in _DROPPED_ROLES:
            raise InvalidRequest(
                f"Unsupported message role {role!r} for a Letta agent.",
                param=f"messages[{i}].role",
            )
    if not out:
        raise InvalidRequest(
            "There is no new user message to send to the agent: the conversation must end "
            "with a user message.",
            param="messages",
        )
    if system_texts:
        _prepend(out[0], "\n\n".join(system_texts))
    return out


def letta_body(letta_messages: list[dict[str, Any]], *, stream: bool = True) -> dict[str, Any]:
    """The body for `POST /v1/agents/{id}/messages` and `POST /v1/conversations/{id}/messages`."""
    if not stream:
        # Said explicitly: the conversations route streams unless told otherwise.
        return {"messages": letta_messages, "streaming": False}
    return {
        "messages": letta_messages,
        "streaming": True,
        "stream_tokens": True,
        # The first ping carries the run id, needed to cancel the run if the client leaves.
        "include_pings": True,
    }


def session_summary(api_key_hash: str, hint: str) -> str:
    """The summary that marks the Letta conversation of one (API key, session hint).

    A fixed-length digest: stable across restarts, and it reveals neither the key nor the
    hint to anyone who can list the agent's conversations.
    """
    # A hint from a header that was not UTF-8 holds surrogateescape'd bytes: hash those bytes
    # rather than fail the request.
    raw = f"{api_key_hash}\0{hint}".encode("utf-8", "surrogateescape")
    digest = hashlib.sha256(raw).hexdigest()
    return SESSION_PREFIX + digest[:32]


def pick_conversation(listing: list[dict[str, Any]], token: str) -> str | None:
    """The conversation id for `token` from a `summary_search` listing, or None.

    Letta's search matches substrings, so only an exact summary counts; two first requests
    racing can create two conversations, and every later request must agree on one: the
    oldest.
    """
    best: tuple[datetime, str] | None = None
    for conv in listing:
        if not isinstance(conv, dict) or conv.get("summary") != token:
            continue
        conv_id = conv.get("id")
        if not isinstance(conv_id, str) or not conv_id:
            continue
        rank = (_created_at(conv.get("created_at")), conv_id)
        if best is None or rank < best:
            best = rank
    return best[1] if best else None


_LATEST = datetime.max.replace(tzinfo=UTC)


def _created_at(value: Any) -> datetime:
    # Parsed, not compared as text: "...:46Z" sorts after "...:46.6Z" as a string.
    if not isinstance(value, str):
        return _LATEST
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return _LATEST
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _user_message(message: dict[str, Any], i: int) -> dict[str, Any]:
    content = message.get("content")
    param = f"messages[{i}].content"
    letta: dict[str, Any]
    if isinstance(content, str):
        letta = {"role": "user", "content": content}
    elif isinstance(content, list):
        letta = {
            "role": "user",
            "content": [_part(p, f"{param}[{j}]") for j, p in enumerate(content)],
        }
    else:
        raise InvalidRequest("A user message needs `content`.", param=param)
    name = message.get("name")
    if isinstance(name, str) and name:
        letta["name"] = name
    return letta


def _part(part: Any, param: str) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise InvalidRequest("A content part must be an object.", param=param)
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise InvalidRequest("A text part needs `text`.", param=f"{param}.text")
        return {"type": "text", "text": text}
    if kind == "image_url":
        return _image(part.get("image_url"), f"{param}.image_url")
    # Worded without the part's type: a Responses client sent that part as another type, and
    # the `param` names the field either way.
    raise InvalidRequest(
        "This content part is not supported for Letta agents, which take text and images.",
        param=f"{param}.type",
    )


def _image(image: Any, param: str) -> dict[str, Any]:
    # Some clients send the URL itself rather than {"url": ...}.
    detail: Any = None
    if isinstance(image, dict):
        url = image.get("url")
        detail = image.get("detail")
    else:
        url = image
    if not isinstance(url, str) or not url:
        raise InvalidRequest("An image_url part needs `url`.", param=f"{param}.url")
    scheme = url.split(":", 1)[0].lower()
    if scheme in ("http", "https"):
        return {"type": "image", "source": {"type": "url", "url": url}}
    if scheme == "data":
        header, sep, data = url[5:].partition(",")
        media_type, _, encoding = header.partition(";")
        if not sep or encoding.lower() != "base64" or not media_type.startswith("image/"):
            raise InvalidRequest(
                "An image data URL must look like data:image/<type>;base64,<data>.",
                param=f"{param}.url",
            )
        source: dict[str, Any] = {"type": "base64", "media_type": media_type, "data": data}
        if isinstance(detail, str) and detail:
            source["detail"] = detail
        return {"type": "image", "source": source}
    raise InvalidRequest("An image URL must be http(s) or a base64 data URL.", param=f"{param}.url")


def _plain_text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise InvalidRequest(
                    "A system message may hold only text parts.", param=f"{param}[{j}]"
                )
            text = part.get("text")
            if isinstance(text, str):
                texts.append(text)
        return "\n".join(texts)
    return ""


def _prepend(message: dict[str, Any], text: str) -> None:
    content = message["content"]
    if isinstance(content, str):
        message["content"] = f"{text}\n\n{content}" if content else text
        return
    for part in content:
        if part["type"] == "text":
            part["text"] = f"{text}\n\n{part['text']}" if part["text"] else text
            return
    content.insert(0, {"type": "text", "text": text})


def is_busy(body: bytes) -> bool:
    """Whether a 409 from Letta's message endpoint says the conversation is busy with another
    request (the message was not taken), as opposed to another conflict such as a tool call
    waiting for approval, which waiting does not resolve."""
    text = body.decode("utf-8", "replace").lower()
    return "approval" not in text and ("being processed" in text or "busy" in text)
