"""Cancelling a turn the client left, on a server that issues its session ids in the stream
(`session.from_response`) and whose cancel names that session: the cancel goes out once,
with the id the stream reported, however late it came; never a leaked task."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web

from proxy.app_keys import DRAIN
from tests.conftest import wait_for
from tests.custom_e2e import Served, post_stream
from tests.fake_agents import FakeAgent, Recorded, Reply
from tests.test_custom_unlisted import serve

CHAT = {"X-Session-Id": "chat-1"}

ISSUER = """\
upstreams:
  issuer:
    kind: custom
    url: {url}/issuer
    mode: stream
    session:
      from_response: session
    request:
      path: /turns
      body: {{input: "{{{{ input }}}}", session: "{{{{ session.id? }}}}"}}
    stream:
      framing: sse
      rules:
        - when: {{kind: delta}}
          text: text
          capture: {{turn: turn}}
        - when: {{kind: done}}
          end: true
    cancel:
      path: "/sessions/{{{{ session.id }}}}/turns/{{{{ captured.turn }}}}/stop"
    timeouts: {{first_event: 5}}
models:
  issuer: {{upstream: issuer}}
"""


def event(**data: Any) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


class FakeIssuer(FakeAgent):
    chat_paths = (r"/issuer/turns",)

    def __init__(self, cancel_status: int = 204, cancel_hangs: bool = False) -> None:
        super().__init__()
        self.cancelled: list[Recorded] = []
        self.cancel_status = cancel_status
        self.cancel_hangs = cancel_hangs

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/issuer/turns", self.turn)
        app.router.add_post("/issuer/sessions/{tail:.+}", self.cancel)
        return app

    async def turn(self, request: web.Request) -> web.StreamResponse:
        await self.record(request)
        return await self.answer(request, self.next_reply(Reply(parts=(
            event(kind="delta", text="Hi", turn="t-1", session="s-1"), event(kind="done")))))

    async def cancel(self, request: web.Request) -> web.Response:
        recorded = await self.record(request)
        recorded.path = request.raw_path
        self.cancelled.append(recorded)
        if self.cancel_hangs:
            await self.wait_unless_gone(request, asyncio.Event())
        return web.json_response({"message": "no such turn"}, status=self.cancel_status)


async def leave_while_held(served: Served, held: Reply) -> None:
    """A streaming client that goes away while the upstream holds its answer."""
    stream = asyncio.create_task(post_stream(served, "issuer", headers=CHAT))
    await held.held.wait()
    await wait_for(lambda: served.in_flight == 1)
    stream.cancel()
    await asyncio.gather(stream, return_exceptions=True)
    await wait_for(lambda: served.in_flight == 0)


@pytest.mark.parametrize("late", [False, True], ids=["with-the-text", "after-the-client-left"])
async def test_a_left_turn_is_cancelled_once_in_the_session_the_stream_reported(
    late: bool, tmp_path: Path
) -> None:
    # When the id comes late, the answer goes on after it (the stream is cut unfinished).
    first = event(kind="delta", text="Hi", turn="t-1", **({} if late else {"session": "s/1"}))
    later = (event(kind="delta", text=" there", session="s/1"), b": more\n\n", b"")
    held = Reply(parts=(first, *later) if late else (first, event(kind="done")),
                 hold_after=1, abort_after=3 if late else None)
    fake = FakeIssuer()
    async with serve(ISSUER, fake, tmp_path) as served:
        fake.replies.append(held)
        await leave_while_held(served, held)
        held.release.set()
        await wait_for(lambda: bool(fake.cancelled))
    (cancel,) = fake.cancelled
    assert cancel.path == "/issuer/sessions/s%2F1/turns/t-1/stop"


async def test_a_left_turn_that_ends_without_naming_its_session_is_not_cancelled(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    held = Reply(parts=(event(kind="delta", text="Hi", turn="t-1"),), hold_after=1)
    fake = FakeIssuer()
    with caplog.at_level(logging.INFO):
        async with serve(ISSUER, fake, tmp_path) as served:
            fake.replies.append(held)
            await leave_while_held(served, held)
            # The answer ends without ever naming its session: nothing to cancel it by.
            held.release.set()
            await wait_for(lambda: fake.completed == 1)
            await served.client().chat.completions.create(
                model="issuer", messages=[{"role": "user", "content": "Next"}],
                extra_headers=CHAT)
    assert fake.cancelled == []
    assert "Task was destroyed" not in caplog.text
    assert "never retrieved" not in caplog.text


@pytest.mark.parametrize("hangs", [False, True], ids=["fails", "hangs"])
async def test_a_cancel_that_fails_or_hangs_is_logged_once_and_leaks_no_task(
    hangs: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    held = Reply(parts=(event(kind="delta", text="Hi", turn="t-1", session="s-1"),
                        event(kind="done")), hold_after=1)
    fake = FakeIssuer(cancel_status=500, cancel_hangs=hangs)
    with caplog.at_level(logging.INFO):
        async with serve(ISSUER, fake, tmp_path) as served:
            fake.replies.append(held)
            await leave_while_held(served, held)
            await wait_for(lambda: "cancelling a turn on upstream issuer failed" in caplog.text)
            # The session is free again: its next turn runs.
            await served.client().chat.completions.create(
                model="issuer", messages=[{"role": "user", "content": "Next"}],
                extra_headers=CHAT)
            held.release.set()
    assert [c.path for c in fake.cancelled] == ["/issuer/sessions/s-1/turns/t-1/stop"]
    assert caplog.text.count("cancelling a turn on upstream issuer failed") == 1
    assert "Task was destroyed" not in caplog.text
    assert "never retrieved" not in caplog.text


def error_end(events: list[Any]) -> dict[str, Any]:
    """The error of a stream that ended with an error event and `[DONE]`."""
    assert events[-1] == "[DONE]"
    error: dict[str, Any] = events[-2]["error"]
    return error


@pytest.mark.parametrize("bad", ["s" * 513, "s-1\r\nX-Evil: 1"], ids=["too-long", "control"])
async def test_a_bad_reported_session_id_fails_the_turn_and_is_never_sent_back(
    bad: str, tmp_path: Path
) -> None:
    fake = FakeIssuer()
    bad_turn = (event(kind="delta", text="Hi", turn="t-1", session=bad), event(kind="done"))
    async with serve(ISSUER, fake, tmp_path) as served:
        fake.replies.extend([Reply(parts=bad_turn), Reply(parts=bad_turn)])
        error = error_end(await post_stream(served, "issuer", headers=CHAT))
        assert error["code"] == "upstream_error"
        assert "session id" in error["message"]
        assert bad not in error["message"]
        client = served.client()
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(
                model="issuer", messages=[{"role": "user", "content": "Again"}],
                extra_headers=CHAT)
        assert caught.value.status_code == 502
        assert caught.value.code == "upstream_error"
        await client.chat.completions.create(
            model="issuer", messages=[{"role": "user", "content": "Next"}], extra_headers=CHAT)
    # The bad id was remembered for no later turn of the chat.
    assert [chat.json.get("session") for chat in fake.chats()] == [None, None, None]


# How the proxy let go of a turn still running -> the client's end (the stream's error code,
# a sync answer's status) and why the cancel's log line says it was cancelled.
LET_GO = {
    "drain": ("service_unavailable", 503, "because the proxy was shutting down"),
    "idle-timeout": ("upstream_timeout", 504, "after its first_event or idle timeout ran out"),
}


@pytest.mark.parametrize("streams", [True, False], ids=["stream", "sync"])
@pytest.mark.parametrize("ending", list(LET_GO))
async def test_a_turn_the_proxy_let_go_of_is_cancelled_and_logged_with_why(
    streams: bool, ending: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    code, status, why = LET_GO[ending]
    caplog.set_level(logging.INFO, "proxy.upstreams.custom_calls")
    held = Reply(parts=(event(kind="delta", text="Hi", turn="t-1", session="s-1"),
                        event(kind="done")), hold_after=1)
    fake = FakeIssuer()
    routes = ISSUER if ending == "drain" else ISSUER.replace(
        "timeouts: {{first_event: 5}}", "timeouts: {{first_event: 5, idle: 0.2}}")
    assert (routes == ISSUER) == (ending == "drain")

    def cancel_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.getMessage().startswith("cancelled a turn")]

    async with serve(routes, fake, tmp_path) as served:
        fake.replies.append(held)
        if streams:
            turn = asyncio.create_task(post_stream(served, "issuer", headers=CHAT))
        else:
            turn = asyncio.create_task(served.client().chat.completions.create(
                model="issuer", messages=[{"role": "user", "content": "Hi"}],
                extra_headers=CHAT))
        if ending == "drain":
            await held.held.wait()
            drain = served.app[DRAIN]
            drain.timeout = 0.05
            await drain.wait()
        if streams:
            assert error_end(await turn)["code"] == code
        else:
            with pytest.raises(openai.APIStatusError) as caught:
                await turn
            assert caught.value.status_code == status
        await wait_for(lambda: bool(cancel_lines()))
    assert [c.path for c in fake.cancelled] == ["/issuer/sessions/s-1/turns/t-1/stop"]
    assert cancel_lines() == [f"cancelled a turn on upstream issuer {why}"]
