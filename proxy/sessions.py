"""Session hints: which conversation of a stateful upstream a request belongs to."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
        return _clip("session:" + hint)
    hint = headers.get("X-LibreChat-Conversation-Id")
    if hint:
        # LibreChat keeps one conversation id when the user switches models mid-chat.
        return _clip(f"librechat:{model}:{hint}")
    hint = headers.get("X-OpenWebUI-Chat-Id")
    if hint:
        return _clip("openwebui:" + hint)
    if from_user:
        user = body.get("user")
        if isinstance(user, str) and user:
            return _clip("user:" + user)
    return None


def _clip(hint: str) -> str:
    return hint[:MAX_HINT]
