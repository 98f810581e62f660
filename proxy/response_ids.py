"""Response ids: plain unique ones for stateless routes, signed self-contained ones for chaining.

A route that keeps conversations upstream (Letta) can continue from a `previous_response_id`
with no database: the id itself carries the upstream conversation id and when it was issued,
and an HMAC-SHA256 binds those to the route and to the caller's key fingerprint. Any replica,
or a restarted process, that has the same secret can check it.

Wire format, after `resp_`, base64url without padding (so `[A-Za-z0-9_-]` only) of

    version (1 byte) | issued_at (6 bytes, big-endian Unix seconds) | len(kid) (1) | kid
    | conversation (UTF-8, the rest) | HMAC-SHA256 (32 bytes)

The MAC covers a domain tag, the route and the key fingerprint (each length-prefixed, not
stored: the verifier supplies them) and every byte before it. The id is signed, not
encrypted: its holder can read the conversation id, never forge or move one.

`AGENTPROXY_ID_SECRET` holds the keys: a plain value is one key (key id `0`); for rotation,
`kid2:secretB,kid1:secretA` — the first key signs, every listed key verifies, so an old key id
keeps working until it is removed. Without the variable the process makes a random key, warns
once, and its ids last until it restarts (and are not shared between `--workers`).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import itertools
import logging
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from proxy.errors import PreviousResponseNotFound

__all__ = [
    "DEFAULT_MAX_AGE",
    "ENV_SECRET",
    "Claims",
    "IdSecretError",
    "ResponseIds",
    "new_response_id",
    "parse_secret",
]

log = logging.getLogger(__name__)

ENV_SECRET: Final = "AGENTPROXY_ID_SECRET"
DEFAULT_MAX_AGE: Final = 30 * 24 * 3600.0
"""Seconds a signed id stays valid: long enough to come back to a conversation next week."""
CLOCK_SKEW: Final = 300.0
"""Replicas' clocks may disagree this much: an id issued slightly "in the future" still counts."""
MIN_SECRET_CHARS: Final = 16
MAX_ID_CHARS: Final = 2048
"""Longer strings are refused before any decoding: no work for a megabyte of garbage."""

PREFIX: Final = "resp_"
_VERSION: Final = 1
_MAC_LEN: Final = 32
_TIME_LEN: Final = 6
_HEAD_LEN: Final = 1 + _TIME_LEN + 1
_DOMAIN: Final = b"agentproxy/response-id/v1\x00"
_KID = re.compile(r"[A-Za-z0-9_-]{1,32}")
_PLAIN_KID: Final = "0"
_EPHEMERAL_KID: Final = "local"


class IdSecretError(ValueError):
    """`AGENTPROXY_ID_SECRET` cannot be used. The message never contains a secret."""


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified id says: the caller may continue `conversation` on `route`."""

    route: str
    conversation: str
    key_fingerprint: str
    issued_at: int
    kid: str


def new_response_id() -> str:
    """A unique id for a route that keeps no state: nothing can be continued from it, so it
    needs no secrecy, only no twin: a random prefix per process (workers and replicas do not
    collide) and a counter. A random draw per id would cost a getrandom() system call."""
    return f"{PREFIX}{_PLAIN_PREFIX}{next(_PLAIN_COUNTER):08x}"


_PLAIN_PREFIX: Final = f"{secrets.randbits(64):016x}"
_PLAIN_COUNTER: Final = itertools.count(1)


def parse_secret(value: str) -> tuple[tuple[str, bytes], ...]:
    """`kid2:secretB,kid1:secretA` (first signs) or one plain secret (key id `0`)."""
    value = value.strip()
    if not value:
        raise IdSecretError(f"{ENV_SECRET} is set but empty.")
    parts = [part.strip() for part in value.split(",")]
    if not any(_KID.fullmatch(part.partition(":")[0]) and ":" in part for part in parts):
        _check_length(_PLAIN_KID, value)
        return ((_PLAIN_KID, value.encode()),)
    keys: list[tuple[str, bytes]] = []
    for n, part in enumerate(parts, 1):
        kid, colon, secret = part.partition(":")
        if not colon or not _KID.fullmatch(kid):
            raise IdSecretError(
                f"{ENV_SECRET}: entry {n} is not `keyid:secret` (key ids are 1-32 of "
                "A-Z a-z 0-9 _ -); write `kid2:new,kid1:old`, the first key signs. A secret "
                "used alone so far has key id 0: list it as `0:old` to keep its ids working."
            )
        if any(kid == seen for seen, _ in keys):
            raise IdSecretError(f"{ENV_SECRET}: key id {kid!r} appears twice.")
        _check_length(kid, secret)
        keys.append((kid, secret.encode()))
    return tuple(keys)


def _check_length(kid: str, secret: str) -> None:
    if len(secret) < MIN_SECRET_CHARS:
        raise IdSecretError(
            f"{ENV_SECRET}: the secret of key id {kid!r} is shorter than {MIN_SECRET_CHARS} "
            "characters; use e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`."
        )


@functools.cache
def _ephemeral_secret() -> bytes:
    # Cached: one key per process, so every app the process builds accepts its own ids.
    log.warning(
        "%s is not set: response ids are signed with a random key and stop working when this "
        "process restarts (and are not shared with other workers or replicas). Set the same "
        "secret everywhere to chain responses across restarts.",
        ENV_SECRET,
    )
    return secrets.token_bytes(32)


class ResponseIds:
    """Mints and verifies signed response ids with one keyring."""

    __slots__ = ("_keys", "_signing", "max_age")

    def __init__(
        self, keys: Sequence[tuple[str, bytes]], *, max_age: float = DEFAULT_MAX_AGE
    ) -> None:
        if not keys:
            raise IdSecretError("a response id keyring needs at least one key")
        for kid, _ in keys:
            if not _KID.fullmatch(kid):
                raise IdSecretError(f"invalid key id {kid!r}")
        self._keys = dict(keys)
        self._signing = keys[0]
        self.max_age = max_age

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str], *, max_age: float = DEFAULT_MAX_AGE
    ) -> ResponseIds:
        value = environ.get(ENV_SECRET)
        if value is None:
            return cls(((_EPHEMERAL_KID, _ephemeral_secret()),), max_age=max_age)
        return cls(parse_secret(value), max_age=max_age)

    def mint(
        self,
        route: str,
        conversation: str,
        key_fingerprint: str,
        now: float | None = None,
    ) -> str:
        if not conversation:
            raise ValueError("a signed response id needs a conversation id")
        issued = int(time.time() if now is None else now)
        kid, secret = self._signing
        kid_bytes = kid.encode()
        blob = (
            bytes((_VERSION,))
            + issued.to_bytes(_TIME_LEN, "big")
            + bytes((len(kid_bytes),))
            + kid_bytes
            + conversation.encode()
        )
        mac = _mac(secret, route, key_fingerprint, blob)
        return PREFIX + base64.urlsafe_b64encode(blob + mac).rstrip(b"=").decode()

    def verify(
        self,
        token: str,
        route: str,
        key_fingerprint: str,
        now: float | None = None,
    ) -> Claims:
        """The claims of a valid id, else PreviousResponseNotFound — for any input at all."""
        try:
            claims = self._verify(token, route, key_fingerprint)
        except (ValueError, TypeError, LookupError, binascii.Error):
            claims = None
        if claims is None:
            raise PreviousResponseNotFound()
        current = time.time() if now is None else now
        if claims.issued_at > current + CLOCK_SKEW or current - claims.issued_at > self.max_age:
            raise PreviousResponseNotFound()
        return claims

    def _verify(self, token: str, route: str, key_fingerprint: str) -> Claims | None:
        if not isinstance(token, str) or len(token) > MAX_ID_CHARS:
            return None
        if not token.startswith(PREFIX):
            return None
        body = token[len(PREFIX) :].encode("ascii")
        raw = base64.urlsafe_b64decode(body + b"=" * (-len(body) % 4))
        # base64 ignores the unused low bits of the last character: re-encoding refuses every
        # id that differs from the minted one, even in those bits.
        if base64.urlsafe_b64encode(raw).rstrip(b"=") != body:
            return None
        if len(raw) < _HEAD_LEN + _MAC_LEN or raw[0] != _VERSION:
            return None
        kid_len = raw[1 + _TIME_LEN]
        conv_at = _HEAD_LEN + kid_len
        if conv_at >= len(raw) - _MAC_LEN:
            return None
        kid = raw[_HEAD_LEN:conv_at].decode("ascii")
        secret = self._keys.get(kid)
        if secret is None:
            return None
        blob, mac = raw[:-_MAC_LEN], raw[-_MAC_LEN:]
        if not hmac.compare_digest(mac, _mac(secret, route, key_fingerprint, blob)):
            return None
        return Claims(
            route=route,
            conversation=blob[conv_at:].decode("utf-8"),
            key_fingerprint=key_fingerprint,
            issued_at=int.from_bytes(raw[1 : 1 + _TIME_LEN], "big"),
            kid=kid,
        )


def _mac(secret: bytes, route: str, key_fingerprint: str, blob: bytes) -> bytes:
    route_bytes = route.encode("utf-8", "surrogatepass")
    fp_bytes = key_fingerprint.encode("utf-8", "surrogatepass")
    message = b"".join(
        (
            _DOMAIN,
            len(route_bytes).to_bytes(4, "big"),
            route_bytes,
            len(fp_bytes).to_bytes(4, "big"),
            fp_bytes,
            blob,
        )
    )
    return hmac.new(secret, message, hashlib.sha256).digest()
