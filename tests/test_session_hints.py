"""A session hint counts whole, however long: two hints that differ only far into them are two
sessions (issue 13, item 11)."""

from __future__ import annotations

import pytest

from proxy.sessions import session_hint
from tests.conftest import ProxyFactory
from tests.fake_letta import FakeLetta

HI = [{"role": "user", "content": "hi"}]
PREFIX = "s" * 600


def routes(url: str) -> str:
    return (
        f"upstreams:\n  letta: {{kind: letta, url: '{url}'}}\n"
        "models:\n  support: {upstream: letta, agent: support-bot}\n"
    )


async def test_long_session_ids_that_differ_late_get_their_own_conversations(
    make_proxy: ProxyFactory, letta: tuple[FakeLetta, str]
) -> None:
    state, url = letta
    client = (await make_proxy(routes(url))).client()

    async def conversation_of(session: str) -> str:
        await client.chat.completions.create(
            model="support", messages=HI, extra_headers={"X-Session-Id": session}
        )
        path = str(state.message_posts()[-1].path)
        assert path.startswith("/v1/conversations/conv-"), path
        return path

    first = await conversation_of(PREFIX + "-alice")
    second = await conversation_of(PREFIX + "-bob")
    again = await conversation_of(PREFIX + "-alice")
    assert first != second
    assert again == first
    assert len(state.conversations) == 2


@pytest.mark.parametrize(
    ("headers", "body", "from_user", "short"),
    [
        pytest.param({"X-Session-Id": "{}"}, {}, False, "session:chat-42", id="x-session-id"),
        pytest.param({"X-LibreChat-Conversation-Id": "{}"}, {}, False,
                     "librechat:support:chat-42", id="librechat"),
        pytest.param({"X-OpenWebUI-Chat-Id": "{}"}, {}, False, "openwebui:chat-42",
                     id="openwebui"),
        pytest.param({}, {"user": "{}"}, True, "user:chat-42", id="user-field"),
    ],
)
def test_every_hint_source_is_bounded_and_keeps_its_tail(
    headers: dict[str, str], body: dict[str, str], from_user: bool, short: str
) -> None:
    def hint(value: str) -> str | None:
        return session_hint(
            {k: v.format(value) for k, v in headers.items()},
            {k: v.format(value) for k, v in body.items()},
            "support",
            from_user=from_user,
        )

    huge = "h" * 1_000_000
    one, other = hint(huge + "1"), hint(huge + "2")
    assert one is not None and other is not None
    assert one != other
    assert len(one) <= 600 and len(other) <= 600
    # Short hints stay as they were: sessions made before this change keep their conversation.
    assert hint("chat-42") == short
