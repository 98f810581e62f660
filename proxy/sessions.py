"""Session hints: which conversation of a stateful upstream a request belongs to."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

# A hint longer than this is kept as a digest of the whole of it: bounded in memory, and two
# hints that differ anywhere stay two sessions. Shorter hints are kept as they are, so the
# sessions that existing clients already have keep their upstream threads.
MAX_HINT = 512


def session_hint(
    headers: Mapping[str, str], body: Mapping[str, Any], model: str, *, from_user: bool
) -> str | None:
    """The caller's session hint, in the order of precedence the design fixes.

    The hint is not yet namespaced by API key: that happens where it becomes an upstream
    thread, so two keys never share one.
    """
    hint = headers.get("X-Session-Id")
    if hint:
        return _bounded("session:" + hint)
    hint = headers.get("X-LibreChat-Conversation-Id")
    if hint:
        # LibreChat keeps one conversation id when the user switches models mid-chat.
        return _bounded(f"librechat:{model}:{hint}")
    hint = headers.get("X-OpenWebUI-Chat-Id")
    if hint:
        return _bounded("openwebui:" + hint)
    if from_user:
        user = body.get("user")
        if isinstance(user, str) and user:
            return _bounded("user:" + user)
    return None


def _bounded(hint: str) -> str:
    if len(hint) <= MAX_HINT:
        return hint
    # A header that is not UTF-8 arrives as surrogate-escaped text: hash its bytes as sent.
    # The source's prefix ("session:" ...) is hashed too, so sources stay apart; a digest
    # starts with a NUL, which no header value holds, so it never equals a short hint.
    digest = hashlib.sha256(hint.encode("utf-8", "surrogateescape")).hexdigest()
    return "\0sha256:" + digest
