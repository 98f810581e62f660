"""The deadline owner: far deadlines cost no timer and still fire on time once near, and its
interruptions never swallow one that is not its own (the drain's, the client's).

The wheel's tick and horizon are shortened here so that the path a default deadline takes
(parked, then given a timer of its own as it nears) runs in a fraction of a second.
"""

from __future__ import annotations

import asyncio
import time
from unittest import mock

import aiohttp
import pytest

from proxy.config import Timeouts
from proxy.errors import UpstreamTimeout
from proxy.exchange import DRAIN, Exchange
from proxy.upstreams.deadlines import Deadlines, Wheel
from tests.conftest import wait_for


def silent_upstream() -> aiohttp.StreamReader:
    return aiohttp.StreamReader(mock.Mock(), 2**16, loop=asyncio.get_running_loop())


def record() -> Exchange:
    return Exchange(time.perf_counter(), "req_test", asyncio.current_task())


def make(
    wheel: Wheel, keepalive: float | None, first_event: float = 30.0, ex: Exchange | None = None
) -> Deadlines:
    timeouts = Timeouts(first_event=first_event, idle=30.0)
    return Deadlines("up", timeouts, ex or record(), wheel, keepalive)


def short_wheel() -> Wheel:
    return Wheel(tick=0.05, horizon=0.1)


async def test_a_far_deadline_parks_in_the_wheel_and_closing_takes_it_out() -> None:
    wheel = short_wheel()
    deadlines = make(wheel, keepalive=15.0)
    assert wheel.parked == 1
    deadlines.close()
    assert wheel.parked == 0


async def test_a_parked_keepalive_arrives_on_time_and_parks_again() -> None:
    wheel = short_wheel()
    deadlines = make(wheel, keepalive=0.3)
    content = silent_upstream()
    started = time.monotonic()
    assert await deadlines.read(content) is None  # a keep-alive is due
    assert time.monotonic() - started >= 0.25
    # The next one is far again: parked, not timed.
    assert wheel.parked == 1
    content.feed_data(b"data: x\n\n")
    assert await deadlines.read(content) == b"data: x\n\n"
    deadlines.close()


async def test_bytes_relayed_as_they_came_count_as_sent_to_the_client() -> None:
    # The read's protocol taken inline, ending in relayed(): what was read went straight to
    # the client, so the next keep-alive is due a whole pace after it, not after the request.
    deadlines = make(short_wheel(), keepalive=0.3)
    content = silent_upstream()
    await asyncio.sleep(0.2)
    content.feed_data(b"data: x\n\n")
    deadlines.waiting = True
    assert await content.readany() == b"data: x\n\n"
    deadlines.relayed()
    relayed = time.monotonic()
    assert await deadlines.read(content) is None  # a keep-alive is due
    assert time.monotonic() - relayed >= 0.25
    deadlines.close()


async def test_a_parked_first_event_deadline_still_ends_the_wait() -> None:
    deadlines = make(short_wheel(), keepalive=None, first_event=0.3)
    with pytest.raises(UpstreamTimeout, match=r"sent no event within 0\.3 s"):
        await deadlines.read(silent_upstream())
    deadlines.close()


async def test_first_event_bounds_the_wait_for_an_answer() -> None:
    deadlines = make(short_wheel(), keepalive=None, first_event=0.2)
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    with pytest.raises(UpstreamTimeout, match=r"first_event"):
        await deadlines.answer(never)
    deadlines.close()


async def test_a_keepalive_set_after_the_headers_counts_from_the_request() -> None:
    wheel = short_wheel()
    deadlines = make(wheel, keepalive=None)
    await asyncio.sleep(0.2)
    started = time.monotonic()
    deadlines.set_keepalive(0.25)  # due 0.05 s from now: nearer than the horizon
    assert wheel.parked == 0
    assert await deadlines.read(silent_upstream()) is None
    assert time.monotonic() - started < 0.2
    deadlines.close()


async def test_the_wheel_stops_ticking_when_nothing_is_parked() -> None:
    wheel = short_wheel()
    deadlines = make(wheel, keepalive=15.0)
    assert wheel.ticking
    deadlines.close()
    await wait_for(lambda: not wheel.ticking, 2.0)


async def test_a_drain_during_a_read_is_not_taken_by_the_read() -> None:
    ex = record()
    deadlines = make(short_wheel(), keepalive=15.0, ex=ex)
    asyncio.get_running_loop().call_later(0.05, ex.interrupt, "drain")
    with pytest.raises(asyncio.CancelledError):
        await deadlines.read(silent_upstream())
    # The front (or the stream writer) takes it, and the request carries on.
    assert ex.take(DRAIN) == "drain"
    deadlines.close()


async def test_a_client_that_leaves_as_a_deadline_fires_still_cancels_the_request() -> None:
    async def request() -> None:
        ex = record()
        deadlines = make(short_wheel(), keepalive=None, first_event=0.2, ex=ex)
        try:
            await deadlines.read(silent_upstream())
        finally:
            deadlines.close()

    task = asyncio.create_task(request())
    await asyncio.sleep(0.15)
    # aiohttp cancels the handler when the client leaves; the deadline fires right after.
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
