"""Session keys for upstreams that keep sessions (the `custom` kind, `openai` upstreams with a
`session_header`), derived from (caller's API key, session hint): no state.

Most agent servers let the caller choose the session id, so a stateless proxy derives it:
the same key and hint give the same id on every worker and after every restart, two keys
never share one, and the id reveals neither the key nor the hint. `session.key` is `ap-` +
32 hex digits; `session.uuid` is the same digest as a UUID, for servers that take only UUIDs
(LangGraph threads).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "WITHOUT_HINT",
    "SessionKeys",
    "WithoutHint",
    "caller_id",
    "session_key",
    "session_keys",
    "session_uuid",
]

WithoutHint = Literal["new", "per_key", "stateless"]
WITHOUT_HINT: Final[tuple[str, ...]] = ("new", "per_key", "stateless")

_PREFIX: Final = "ap-"
# Distinct messages per use, so a session id can never equal a caller id or a per-key id.
_HINT_DOMAIN: Final = b"agentproxy custom session\0"
_PER_KEY_DOMAIN: Final = b"agentproxy custom per-key session"
_CALLER_DOMAIN: Final = b"agentproxy custom caller"


def _derive(key_id: str, message: bytes) -> str:
    digest = hmac.new(key_id.encode(), message, hashlib.sha256).hexdigest()
    return _PREFIX + digest[:32]


def session_key(key_id: str, hint: str) -> str:
    """The session key of one (API key, hint). The whole hint is hashed, however long."""
    # A hint from a header that was not UTF-8 holds surrogateescape'd bytes: hash those bytes.
    return _derive(key_id, _HINT_DOMAIN + hint.encode("utf-8", "surrogateescape"))


def session_uuid(key: str) -> str:
    """`session.uuid`: the key's 128 bits as a UUID with the version-4 and variant bits set,
    so servers that insist on a random-looking UUID accept it. Deterministic."""
    return str(uuid.UUID(hex=key[len(_PREFIX) :], version=4))


def caller_id(key_id: str) -> str:
    """`caller`: one stable opaque id per API key, for "user" fields that must not vary."""
    return _derive(key_id, _CALLER_DOMAIN)


@dataclass(frozen=True, slots=True)
class SessionKeys:
    """What a request's session placeholders hold.

    `stateless` means the request has no session: the adapter sends the
    `session.stateless` variant of the request and `session.id` is null. `key` and `uuid`
    are still set (random per request), so a template that needs some id never gets null.
    """

    key: str
    uuid: str
    stateless: bool = False


def session_keys(key_id: str, hint: str | None, without_hint: WithoutHint) -> SessionKeys:
    """The session of one request, from its hint or, without one, by `without_hint`."""
    if hint is not None:
        key = session_key(key_id, hint)
    elif without_hint == "per_key":
        key = _derive(key_id, _PER_KEY_DOMAIN)
    else:
        key = _PREFIX + secrets.token_hex(16)
    return SessionKeys(key, session_uuid(key), hint is None and without_hint == "stateless")
