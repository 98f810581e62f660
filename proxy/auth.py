"""Client API keys: who may call, and which models each key may see."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fnmatch import translate

from proxy.errors import AuthenticationFailed

# Distinct valid Authorization headers remembered (spellings of the configured keys).
_SEEN_MAX = 1024
_BEARER = re.compile(r"\s*bearer\s+(\S+)\s*$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Grant:
    """What one authenticated caller may do. `key_id` namespaces its sessions."""

    key_id: str
    _match: re.Pattern[str] | None

    def allows(self, model: str) -> bool:
        return self._match is None or self._match.match(model) is not None


def make_grant(key: str, patterns: Iterable[str]) -> Grant:
    pats = tuple(patterns)
    # A single regex per key, compiled once per route table, keeps the per-request check cheap.
    match = None if "*" in pats else re.compile("|".join(f"(?:{translate(p)})" for p in pats))
    return Grant(key_id=key_id(key), _match=match)


def key_id(key: str) -> str:
    """A stable, non-reversible name for a key: sessions are namespaced by it, logs may show it."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def generate_key() -> str:
    return "sk-" + secrets.token_urlsafe(24)


def env_keys(value: str | None) -> list[str]:
    """`AGENTPROXY_API_KEYS=k1,k2`: blanks and surrounding spaces are ignored."""
    return [k.strip() for k in (value or "").split(",") if k.strip()]


OPEN_GRANT = Grant(key_id="anonymous", _match=None)


class Authenticator:
    """Checks the presented key against the configured ones.

    Keys are looked up by their SHA-256 digest and then confirmed with a constant-time compare,
    so neither the lookup nor the compare leaks how much of a guessed key was right.
    """

    __slots__ = ("_by_digest", "_seen", "open")

    def __init__(self, grants: Mapping[str, Grant], *, open: bool = False) -> None:
        self._by_digest = {
            hashlib.sha256(key.encode()).digest(): (key.encode(), grant)
            for key, grant in grants.items()
        }
        # Authorization headers already found to hold a valid key. A client sends the same
        # header on every request: one dict lookup instead of a regex, a SHA-256 and a compare.
        # Only valid headers get in, so a hit says nothing about a guess but "exactly right";
        # the table holds it, so a reload that drops a key forgets its header too.
        self._seen: dict[str, Grant] = {}
        self.open = open

    def check(self, authorization: str | None, x_api_key: str | None) -> Grant:
        if authorization:
            seen = self._seen.get(authorization)
            if seen is not None:
                return seen
        presented, from_bearer = _presented_key(authorization, x_api_key)
        if presented is None:
            if self.open:
                return OPEN_GRANT
            # `Basic ...`, or a Bearer value with a space in it: saying "none was sent" would
            # send the client looking for a header it did send.
            why = ("the Authorization header is not 'Bearer <key>'"
                   if authorization and authorization.strip() else "none was sent")
            raise AuthenticationFailed(
                f"Incorrect API key provided: {why}. Send it as "
                "'Authorization: Bearer <key>' or 'X-Api-Key: <key>'."
            )
        # aiohttp decodes header bytes that are not UTF-8 with surrogateescape: encoding back
        # the same way gives the bytes the client sent instead of a UnicodeEncodeError (a 500).
        raw = presented.encode("utf-8", "surrogateescape")
        found = self._by_digest.get(hashlib.sha256(raw).digest())
        if found is not None and hmac.compare_digest(found[0], raw):
            if from_bearer and authorization:
                if len(self._seen) >= _SEEN_MAX:
                    self._seen.clear()
                self._seen[authorization] = found[1]
            return found[1]
        if self.open:
            return OPEN_GRANT
        raise AuthenticationFailed(f"Incorrect API key provided: {_redact(presented)}.")


def _presented_key(
    authorization: str | None, x_api_key: str | None
) -> tuple[str | None, bool]:
    """The key presented, and whether it came from the Authorization header."""
    if authorization:
        m = _BEARER.match(authorization)
        if m:
            return m.group(1), True
    if x_api_key and x_api_key.strip():
        return x_api_key.strip(), False
    return None, False


def _redact(key: str) -> str:
    # OpenAI shows a few characters of a wrong key; a key this short is shown as stars only.
    # Lone surrogates (bytes that were not UTF-8) could not be rendered as JSON.
    key = key.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if len(key) < 12:
        return "*" * len(key)
    return f"{key[:3]}{'*' * 8}{key[-4:]}"
