"""The watch's wheel: far deadlines cost no timer, and still fire on time once near.

The wheel's tick and horizon are shortened here so that the path a default deadline takes
(parked, then given a timer of its own as it nears) runs in a fraction of a second.
"""

from __future__ import annotations

import asyncio
from unittest import mock

import aiohttp
import pytest

from proxy.config import Timeouts
from proxy.errors import UpstreamTimeout
from proxy.upstreams import watch as watch_module
from proxy.upstreams.watch import Watch


@pytest.fixture(autouse=True)
def short_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch_module, "_TICK", 0.05)
    monkeypatch.setattr(watch_module, "_HORIZON", 0.1)


def silent_upstream() -> aiohttp.StreamReader:
    return aiohttp.StreamReader(mock.Mock(), 2**16, loop=asyncio.get_running_loop())


def make_watch(keepalive: float | None, first_event: float = 30.0) -> Watch:
    timeouts = Timeouts(first_event=first_event, idle=30.0)
    return Watch("up", timeouts, keepalive, asyncio.get_running_loop().time())


def parked(watch: Watch) -> bool:
    return watch in watch_module._wheel(asyncio.get_running_loop()).parked


async def test_a_far_deadline_parks_in_the_wheel_instead_of_taking_a_timer() -> None:
    watch = make_watch(keepalive=15.0)
    watch.arm()
    assert parked(watch) and watch._handle is None
    watch.disarm()
    assert not parked(watch) and watch._handle is None


async def test_a_parked_keepalive_gets_a_timer_as_it_nears_and_arrives() -> None:
    watch = make_watch(keepalive=0.3)
    watch.arm()
    assert parked(watch)
    content = silent_upstream()
    assert await watch.read(content) is None  # a keep-alive is due
    # The next one is far again: parked, not timed.
    assert parked(watch)
    content.feed_data(b"data: x\n\n")
    assert await watch.read(content) == b"data: x\n\n"
    watch.disarm()


async def test_a_parked_first_event_deadline_still_ends_the_wait() -> None:
    watch = make_watch(keepalive=None, first_event=0.3)
    watch.arm()
    assert parked(watch)
    with pytest.raises(UpstreamTimeout, match=r"sent no event within 0\.3 s"):
        await watch.read(silent_upstream())
    watch.disarm()


async def test_a_keepalive_set_after_the_headers_counts_from_the_request() -> None:
    watch = make_watch(keepalive=None)
    watch.arm()
    await asyncio.sleep(0.2)
    watch.set_keepalive(0.25)  # due 0.05 s from now: nearer than the horizon
    assert not parked(watch) and watch._handle is not None
    assert await watch.read(silent_upstream()) is None
    watch.disarm()


async def test_the_wheel_stops_ticking_when_nothing_is_parked() -> None:
    wheel = watch_module._wheel(asyncio.get_running_loop())
    watch = make_watch(keepalive=15.0)
    watch.arm()
    assert wheel._handle is not None
    watch.disarm()
    await asyncio.sleep(0.15)
    assert wheel._handle is None
