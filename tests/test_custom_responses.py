"""The Responses API on custom routes: the same chunks, another writer. Sync and stream for
each API of §7, through the `openai` SDK and the stream checks of tests/responses_assert.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from tests.custom_e2e import API_IDS, APIS, DIFY, Api, custom_env, serve_api
from tests.fake_agents import Reply
from tests.responses_assert import output_text
from tests.responses_client import comparable, post_raw, stream_final
from tests.test_custom_unlisted import RELAY, RELAY_STREAM, FakeRelay, relay_event, serve

__all__ = ["custom_env"]

CHAT = {"X-Session-Id": "chat-0"}


@pytest.mark.parametrize("api", APIS, ids=API_IDS)
async def test_responses_sync_and_stream_carry_the_answer_and_agree(
    api: Api, tmp_path: Path
) -> None:
    async with serve_api(api, tmp_path) as served:
        reply = await served.client().responses.create(
            model=api.model, input="Hello", extra_headers=CHAT)
        final, _ = await stream_final(served.proxy, {"model": api.model, "input": "Hello"},
                                      headers=CHAT)
        status, _, raw = await post_raw(served.proxy, {"model": api.model, "input": "Hello"},
                                        headers=CHAT)
    assert status == 200
    assert reply.output_text == api.text
    assert output_text(final) == api.text
    assert reply.status == final["status"] == "completed"
    assert reply.store is False
    prompt, completion, total = api.usage or (0, 0, 0)
    assert reply.usage is not None
    assert (reply.usage.input_tokens, reply.usage.output_tokens,
            reply.usage.total_tokens) == (prompt, completion, total)
    # The sync answer is the stream's final object.
    assert comparable(orjson.loads(raw)) == comparable(final)


async def test_responses_instructions_and_input_items_reach_the_agent_as_the_turn(
    tmp_path: Path,
) -> None:
    async with serve_api(DIFY, tmp_path) as served:
        await served.client().responses.create(
            model=DIFY.model, instructions="Be brief.",
            input=[{"role": "user", "content": [{"type": "input_text", "text": "Hi there"}]}],
            extra_headers=CHAT,
        )
    (call,) = served.fake.chats()
    # Dify's route drops the client's system text (client_system: drop, the default).
    assert call.json["query"] == "Hi there"


async def test_responses_previous_response_id_is_refused_on_a_custom_route(
    tmp_path: Path,
) -> None:
    async with serve_api(DIFY, tmp_path) as served:
        with pytest.raises(openai.BadRequestError) as info:
            await served.client().responses.create(
                model=DIFY.model, input="Hello", previous_response_id="resp_abc")
    body: Any = info.value.body
    assert body["param"] == "previous_response_id"
    assert served.fake.chats() == []


async def test_responses_stream_keeps_an_upstream_event_with_bytes_that_are_not_utf8(
    tmp_path: Path,
) -> None:
    # Dify's JSON with one invalid byte in its text: the text arrives with U+FFFD for it,
    # never dropped while the answer still says "completed".
    body = (b'data: {"event": "message", "conversation_id": "c1", "answer": "caf\xe9 ok"}\n\n'
            b'data: {"event": "message_end", "conversation_id": "c1"}\n\n')
    async with serve_api(DIFY, tmp_path) as served:
        served.fake.replies.append(Reply(body=body))
        final, _ = await stream_final(served.proxy, {"model": DIFY.model, "input": "Hello"},
                                      headers=CHAT)
    assert final["status"] == "completed"
    assert output_text(final) == "caf\ufffd ok"


async def test_responses_an_upstream_content_filter_finish_is_incomplete_for_that_reason(
    tmp_path: Path,
) -> None:
    stream = (*RELAY_STREAM[:-1], relay_event("finished", {"reason": "content_filter"}))
    fake = FakeRelay()
    headers = {"X-Session-Id": "relay-chat"}
    async with serve(RELAY, fake, tmp_path) as served:
        fake.replies.extend([Reply(parts=stream), Reply(parts=stream)])
        reply = await served.client().responses.create(
            model="relay", input="Hello", extra_headers=headers)
        final, _ = await stream_final(served.proxy, {"model": "relay", "input": "Hello"},
                                      headers=headers)
    assert reply.status == final["status"] == "incomplete"
    assert reply.incomplete_details is not None
    assert reply.incomplete_details.reason == "content_filter"
    assert final["incomplete_details"] == {"reason": "content_filter"}
    assert reply.output_text == output_text(final) == "Hello world"
