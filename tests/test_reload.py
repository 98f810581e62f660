"""The live route table: edits, the kubelet's ConfigMap swap and SIGHUP reach new requests;
requests in flight keep their table; a broken file changes nothing but the report."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

import proxy.routing as proxy_routing
from proxy.app import create_app
from proxy.app_keys import DRAIN
from proxy.config import MAX_BYTES
from proxy.reload import TableHolder, watch
from tests.conftest import KEY, ProxyFactory, closed_port, serving
from tests.fake_openai import FakeOpenAI
from tests.processes import _start as start_process
from tests.processes import eventually, serve_process

FAST = 0.02  # seconds between looks at the file: the tests wait on conditions, not on time


def echo_routes(*models: str) -> str:
    listed = "".join(f"  {m}:\n    upstream: demo\n" for m in models)
    return f"upstreams:\n  demo:\n    kind: echo\nmodels:\n{listed}"


def version_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


async def get_json(url: str) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as http, http.get(
        url, headers={"Authorization": f"Bearer {KEY}"}
    ) as resp:
        return resp.status, await resp.json()


async def model_ids(url: str) -> list[str]:
    status, body = await get_json(url + "/v1/models")
    assert status == 200
    data = body["data"]
    assert isinstance(data, list)
    return [m["id"] for m in data]


def metric(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


async def test_an_edit_reaches_new_requests_and_readyz_shows_the_new_version(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy(echo_routes("first"), reload_interval=FAST)
    _, before = await get_json(proxy.url + "/readyz")
    new = echo_routes("second", "first")
    proxy.routes.write_text(new)

    async def reloaded() -> bool:
        return await model_ids(proxy.url) == ["second", "first"]

    await eventually(reloaded, "the edited table to be served")
    status, ready = await get_json(proxy.url + "/readyz")
    assert status == 200
    assert ready["version"] == version_of(new) != before["version"]
    assert isinstance(ready["loaded_at"], float) and isinstance(before["loaded_at"], float)
    assert ready["loaded_at"] > before["loaded_at"]
    assert ready["last_error"] is None
    reply = await proxy.client().chat.completions.create(
        model="second", messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].message.content == "hi"


async def test_a_key_an_edit_removes_is_refused_though_it_was_just_accepted(
    make_proxy: ProxyFactory,
) -> None:
    leaving = "sk-leaving-000000000000"
    proxy = await make_proxy(
        echo_routes("first") + f"auth:\n  keys:\n    - key: {leaving}\n", reload_interval=FAST
    )
    hi: list[Any] = [{"role": "user", "content": "hi"}]
    # Accepted once: the proxy now remembers this Authorization header.
    await proxy.client(leaving).chat.completions.create(model="first", messages=hi)
    proxy.routes.write_text(echo_routes("first"))

    async def refused() -> bool:
        try:
            await proxy.client(leaving).chat.completions.create(model="first", messages=hi)
        except openai.AuthenticationError:
            return True
        return False

    await eventually(refused, "the removed key to be refused")
    reply = await proxy.client().chat.completions.create(model="first", messages=hi)
    assert reply.choices[0].message.content == "hi"


def kubelet_projection(directory: Path, stamp: str, text: str) -> None:
    """Writes a ConfigMap volume update the way the kubelet does: a new timestamped
    directory, a `..data_tmp` symlink to it, renamed over `..data` in one step."""
    target = directory / stamp
    target.mkdir()
    (target / "routes.yaml").write_text(text)
    old = os.readlink(directory / "..data") if (directory / "..data").is_symlink() else None
    os.symlink(stamp, directory / "..data_tmp")
    os.rename(directory / "..data_tmp", directory / "..data")
    if not (directory / "routes.yaml").is_symlink():
        os.symlink("..data/routes.yaml", directory / "routes.yaml")
    if old is not None:
        shutil.rmtree(directory / old)


async def test_a_configmap_symlink_swap_is_noticed(tmp_path: Path) -> None:
    volume = tmp_path / "config"
    volume.mkdir()
    kubelet_projection(volume, "..2026_01_01_00_00_00.000000001", echo_routes("before"))
    holder = TableHolder(volume / "routes.yaml", (KEY,))
    async with serving(create_app(holder, reload_interval=FAST)) as url:
        assert await model_ids(url) == ["before"]
        kubelet_projection(volume, "..2026_01_01_00_01_00.000000002", echo_routes("after"))

        async def swapped() -> bool:
            return await model_ids(url) == ["after"]

        await eventually(swapped, "the swapped ConfigMap to be served")
        assert sorted(p.name for p in volume.iterdir()) == [
            "..2026_01_01_00_01_00.000000002", "..data", "routes.yaml"
        ]


async def test_a_broken_file_keeps_the_last_good_table_and_fixing_it_recovers(
    make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.reload")
    good = echo_routes("steady")
    proxy = await make_proxy(good, reload_interval=FAST)
    proxy.routes.write_text(good + "  broken:\n    upstream: nowhere\n")

    async def reported() -> bool:
        _, ready = await get_json(proxy.url + "/readyz")
        return ready["last_error"] is not None

    await eventually(reported, "readyz to report the error")
    status, ready = await get_json(proxy.url + "/readyz")
    assert status == 200 and ready["status"] == "ready"
    assert ready["version"] == version_of(good)
    # The file's name, the line and the path; never the absolute path (readyz needs no key).
    assert str(ready["last_error"]).startswith("routes.yaml:8 models.broken.upstream: ")
    assert str(proxy.routes.parent) not in str(ready["last_error"])

    # Several more looks at the unchanged broken file must not repeat the error.
    seen = proxy.holder.last_attempt

    async def looked_again() -> bool:
        return proxy.holder.last_attempt > seen + 3 * FAST

    await eventually(looked_again, "the watcher to look at the file again")
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert "routes.yaml:8 models.broken.upstream" in errors[0].getMessage()
    assert await model_ids(proxy.url) == ["steady"]
    reply = await proxy.client().chat.completions.create(
        model="steady", messages=[{"role": "user", "content": "still here"}]
    )
    assert reply.choices[0].message.content == "still here"
    async with aiohttp.ClientSession() as http, http.get(proxy.url + "/metrics") as resp:
        text = await resp.text()
    assert metric(text, "agentproxy_reloads_total", result="error") == 1.0

    fixed = echo_routes("steady", "fixed")
    proxy.routes.write_text(fixed)

    async def recovered() -> bool:
        _, ready = await get_json(proxy.url + "/readyz")
        return ready["last_error"] is None and ready["version"] == version_of(fixed)

    await eventually(recovered, "the fixed file to be served")
    assert await model_ids(proxy.url) == ["steady", "fixed"]
    async with aiohttp.ClientSession() as http, http.get(proxy.url + "/metrics") as resp:
        text = await resp.text()
    assert metric(text, "agentproxy_reloads_total", result="success") == 1.0
    assert metric(text, "agentproxy_route_table_info", version=version_of(fixed)) == 1.0
    assert metric(text, "agentproxy_route_table_info", version=version_of(good)) is None


async def test_a_missing_file_is_reported_and_its_return_recovers(
    make_proxy: ProxyFactory,
) -> None:
    good = echo_routes("steady")
    proxy = await make_proxy(good, reload_interval=FAST)
    proxy.routes.unlink()

    async def reported() -> bool:
        _, ready = await get_json(proxy.url + "/readyz")
        return "cannot read the file" in str(ready["last_error"])

    await eventually(reported, "readyz to report the missing file")
    assert await model_ids(proxy.url) == ["steady"]
    proxy.routes.write_text(good)

    async def recovered() -> bool:
        _, ready = await get_json(proxy.url + "/readyz")
        return ready["last_error"] is None

    await eventually(recovered, "the restored file to clear the error")
    assert proxy.holder.current.version == version_of(good)


def fake_routes(fake: FakeOpenAI, upstream_model: str) -> str:
    return f"""
upstreams:
  fake:
    kind: openai
    url: {fake.url}/v1
models:
  m:
    upstream: fake
    model: {upstream_model}
"""


async def test_a_stream_in_flight_finishes_on_the_table_it_started_with(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    fake_openai.mode = "stream_hang"
    proxy = await make_proxy(fake_routes(fake_openai, "old-name"), reload_interval=FAST)
    client = proxy.client()
    stream = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "started before the edit"}],
        stream=True,
    )
    chunks = stream.__aiter__()
    first = await chunks.__anext__()
    assert first.choices[0].delta.role == "assistant"

    new = fake_routes(fake_openai, "new-name")
    proxy.routes.write_text(new)

    async def swapped() -> bool:
        return proxy.holder.current.version == version_of(new)

    await eventually(swapped, "the new table")
    reply = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "after"}]
    )
    assert reply.choices[0].message.content == "after"
    assert fake_openai.received[-1].body is not None
    assert fake_openai.received[-1].body["model"] == "new-name"

    fake_openai.release.set()
    rest = [c async for c in chunks]
    text = "".join(c.choices[0].delta.content or "" for c in [first, *rest] if c.choices)
    assert text == "started before the edit"
    assert rest[-1].choices[0].finish_reason == "stop"
    assert fake_openai.received[0].body is not None
    assert fake_openai.received[0].body["model"] == "old-name"


async def test_sighup_reloads_a_served_process(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(echo_routes("before"))
    # --reload-interval 0: the file is never polled, so only the signal can reload it.
    async with serve_process(routes, "--reload-interval", "0") as served:
        assert await model_ids(served.url) == ["before"]
        new = echo_routes("after")
        routes.write_text(new)
        served.proc.send_signal(signal.SIGHUP)

        async def reloaded() -> bool:
            _, ready = await get_json(served.url + "/readyz")
            return ready["version"] == version_of(new)

        await eventually(reloaded, "SIGHUP to reload the table")
        assert await model_ids(served.url) == ["after"]
        served.proc.send_signal(signal.SIGTERM)
        assert await served.exit_code() == 0
    assert "reloaded: version" in served.output()


async def readyz_text(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(url + "/readyz") as resp:
        assert resp.status == 200
        return await resp.text()


async def test_readyz_names_the_file_not_its_path_and_never_a_value_from_it(
    make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.reload")
    good = echo_routes("steady")
    proxy = await make_proxy(good, reload_interval=FAST)
    secret = "sk-live-5f0c2d9e7a41b3"
    proxy.routes.write_text(
        good + f"  broken:\n    upstream: {secret}\n"
        f"  other:\n    upstream: demo\n    owned_by: 7\n    client_system: {secret}x\n"
    )

    async def reported() -> bool:
        _, ready = await get_json(proxy.url + "/readyz")
        return ready["last_error"] is not None

    await eventually(reported, "readyz to report the error")
    text = await readyz_text(proxy.url)
    _, ready = await get_json(proxy.url + "/readyz")
    assert ready["last_error"] == (
        "routes.yaml:8 models.broken.upstream, routes.yaml:11 models.other.owned_by, "
        "routes.yaml:12 models.other.client_system: not valid; `agentproxy check` prints "
        "the problems"
    )
    assert secret not in text
    assert str(proxy.routes.parent) not in text
    # The log, for the operator, keeps every message.
    assert any(secret in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)


def replace_with(path: Path, make: Any) -> None:
    """Puts something else at `path` in one rename, as an editor or the kubelet would."""
    staged = path.with_name("staged")
    make(staged)
    os.replace(staged, path)


async def test_a_routes_file_over_4_mib_is_refused_and_the_last_table_serves(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy(echo_routes("steady"), reload_interval=FAST)
    # /dev/zero was the report: reading it grew the process to 10 GB.
    replace_with(proxy.routes, lambda p: p.symlink_to("/dev/zero"))

    async def reported() -> bool:
        _, ready = await get_json(proxy.url + "/readyz")
        return ready["last_error"] is not None

    await eventually(reported, "readyz to report the error")
    _, ready = await get_json(proxy.url + "/readyz")
    assert ready["last_error"] == (
        "routes.yaml: cannot read the file: the file is larger than 4 MiB, the limit for a "
        "routes file"
    )
    assert await model_ids(proxy.url) == ["steady"]

    def sparse(path: Path) -> None:
        with path.open("wb") as file:
            file.truncate(MAX_BYTES + 1)

    replace_with(proxy.routes, sparse)
    fixed = echo_routes("steady", "fixed")

    async def still_refused() -> bool:
        return proxy.holder.last_attempt > proxy.holder.current.loaded_at + 4 * FAST

    await eventually(still_refused, "another look at the file")
    assert "larger than 4 MiB" in str(proxy.holder.last_error)
    replace_with(proxy.routes, lambda p: p.write_text(fixed))

    async def recovered() -> bool:
        _, ready = await get_json(proxy.url + "/readyz")
        return ready["last_error"] is None and ready["version"] == version_of(fixed)

    await eventually(recovered, "the fixed file to be served")


needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")


@needs_fifo
async def test_a_fifo_that_nobody_writes_is_reported_and_the_last_table_serves(
    tmp_path: Path,
) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(echo_routes("steady"))
    holder = TableHolder(path, (KEY,), read_timeout=0.05)
    async with serving(create_app(holder, reload_interval=FAST)) as url:
        replace_with(path, os.mkfifo)

        async def reported() -> bool:
            _, ready = await get_json(url + "/readyz")
            return "cannot read the file: not read to its end within 0.05 s" in str(
                ready["last_error"]
            )

        await eventually(reported, "readyz to report the FIFO")
        assert await model_ids(url) == ["steady"]
        reply = await proxy_reply(url)
        assert reply == "still here"


async def proxy_reply(url: str) -> str | None:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    async with client:
        reply = await client.chat.completions.create(
            model="steady", messages=[{"role": "user", "content": "still here"}]
        )
    return reply.choices[0].message.content


def opened_by(pid: int, path: Path) -> bool:
    """Whether process `pid` has `path` open (Linux: /proc/<pid>/fd)."""
    fds = Path(f"/proc/{pid}/fd")
    for fd in fds.iterdir() if fds.is_dir() else ():
        with contextlib.suppress(OSError):
            if os.readlink(fd) == str(path):
                return True
    return False


@needs_fifo
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
async def test_sigterm_ends_a_process_whose_routes_file_became_a_fifo(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(echo_routes("steady"))
    async with serve_process(routes, "--reload-interval", "0.05") as served:
        replace_with(routes, os.mkfifo)

        async def reading_it() -> bool:
            return opened_by(served.proc.pid, routes)

        # The watcher holds the FIFO open, waiting for a writer that never comes.
        await eventually(reading_it, "the watcher to open the FIFO")
        assert await model_ids(served.url) == ["steady"]
        served.proc.send_signal(signal.SIGTERM)
        # Not the read's timeout, not forever: the drain has nothing to wait for.
        assert await served.exit_code(within=15) == 0


async def test_the_watcher_ends_when_told_to_stop_even_if_no_cancellation_reaches_it(
    tmp_path: Path,
) -> None:
    # Python 3.11's wait_for can swallow a cancellation that lands as its wait ends; the app's
    # cleanup sets `stop` first, so the watcher ends either way and the cleanup cannot hang.
    path = tmp_path / "routes.yaml"
    path.write_text(echo_routes("steady"))
    holder = TableHolder(path, (KEY,))
    stop = asyncio.Event()
    before = holder.last_attempt
    task = asyncio.create_task(watch(holder, FAST, None, stop))
    await eventually(lambda: _true(holder.last_attempt > before), "a look at the file")
    stop.set()
    async with asyncio.timeout(10):
        await task  # no cancel: only `stop` ends it


async def _true(value: bool) -> bool:
    return value


ADMIN = "sk-admin-aaaaaaaaaaaaaaaa"
GUEST = "sk-guest-bbbbbbbbbbbbbbbb"


def guarded_routes(*extra_models: str) -> str:
    listed = "".join(f"  {m}: {{upstream: demo}}\n" for m in extra_models)
    return (
        "upstreams:\n  demo: {kind: echo}\nmodels:\n  public: {upstream: demo}\n"
        f"  secret: {{upstream: demo}}\n{listed}auth:\n  keys:\n    - key: {ADMIN}\n"
        f"    - key: {GUEST}\n      models: [public]\n"
    )


async def guest_reaches_secret(proxy: Any) -> bool:
    try:
        await proxy.client(GUEST).chat.completions.create(
            model="secret", messages=[{"role": "user", "content": "hi"}]
        )
    except openai.NotFoundError:
        return False
    return True


async def test_a_file_caught_half_written_is_not_served_until_it_is_complete(
    make_proxy: ProxyFactory,
) -> None:
    # Polling off: each `refresh` is one poll, so the one that lands between the two writes
    # is certain, not a matter of timing.
    proxy = await make_proxy(guarded_routes(), reload_interval=0)
    assert not await guest_reaches_secret(proxy)
    new = guarded_routes("other")
    cut = new.index("      models: [public]")
    with proxy.routes.open("w") as out:
        # The prefix is a valid table in which GUEST may use every model.
        out.write(new[:cut])
        out.flush()
        assert await proxy.holder.refresh() == "unchanged"
        assert not await guest_reaches_secret(proxy)
        assert await model_ids(proxy.url) == ["public", "secret"]
        out.write(new[cut:])

    async def complete_served() -> bool:
        await proxy.holder.refresh()
        return await model_ids(proxy.url) == ["public", "secret", "other"]

    await eventually(complete_served, "the complete file to be served")
    assert not await guest_reaches_secret(proxy)


async def test_a_file_caught_half_written_and_broken_is_not_reported(
    make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.reload")
    proxy = await make_proxy(echo_routes("first"), reload_interval=0)
    new = echo_routes("first", "second")
    with proxy.routes.open("w") as out:
        out.write(new[: new.index("upstream: demo") + len("upstream: de")] + "\n  [")
        out.flush()
        assert await proxy.holder.refresh() == "unchanged"
        out.seek(0)
        out.truncate()
        out.write(new)
    _, ready = await get_json(proxy.url + "/readyz")
    assert ready["last_error"] is None
    assert not [r for r in caplog.records if r.levelno == logging.ERROR]

    async def complete_served() -> bool:
        await proxy.holder.refresh()
        return await model_ids(proxy.url) == ["first", "second"]

    await eventually(complete_served, "the complete file to be served")


def limited_routes(limit: int, key: str, port: int) -> str:
    return (
        f"upstreams:\n  up:\n    kind: openai\n    url: http://127.0.0.1:{port}/v1\n"
        f"    max_concurrency: {limit}\n    circuit: {{failures: {limit}}}\n"
        f"models:\n  m: {{upstream: up}}\nauth:\n  keys:\n    - key: {key}\n"
    )


async def test_a_reload_rejected_late_leaves_the_upstream_limits_and_circuit_as_they_were(
    make_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = closed_port()
    proxy = await make_proxy(limited_routes(1, KEY, port), reload_interval=FAST)
    # A valid file whose build fails after the upstreams are built (stands in for any late
    # failure, such as a bug in an adapter or in key hashing).
    doomed = "sk-doomed-0123456789abcdef"
    real_grant = proxy_routing.make_grant

    def failing_grant(key: str, models: Any) -> Any:
        if key == doomed:
            raise RuntimeError("late build failure")
        return real_grant(key, models)

    monkeypatch.setattr(proxy_routing, "make_grant", failing_grant)
    proxy.routes.write_text(limited_routes(500, doomed, port))

    async def rejected() -> bool:
        _, ready = await get_json(proxy.url + "/readyz")
        return ready["last_error"] is not None

    await eventually(rejected, "the rejected reload to be reported")
    _, ready = await get_json(proxy.url + "/readyz")
    upstream: Any = ready["upstreams"]
    assert upstream["up"]["max_concurrency"] == 1
    assert upstream["up"]["state"] == "closed"
    # `circuit.failures: 1` still holds: one refused connection opens the circuit.
    with pytest.raises(openai.APIStatusError) as caught:
        await proxy.client().chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.status_code == 502
    _, ready = await get_json(proxy.url + "/readyz")
    upstream = ready["upstreams"]
    assert upstream["up"]["state"] == "open"


@pytest.mark.parametrize(
    ("broken", "where"),
    [
        # Each was a RecursionError, ValueError or OverflowError out of the reader: the reload
        # failed with "cannot read the route table (the log has the error)" and a traceback.
        (echo_routes("steady") + "auth: " + "[" * 1000 + "]" * 1000 + "\n", "routes.yaml:7 (file)"),
        (echo_routes("steady").replace("kind: echo", "kind: openai\n    url: http://h/v1\n"
                                       "    circuit: {failures: " + "9" * 5000 + "}"),
         "routes.yaml:5 upstreams.demo.circuit.failures"),
        (echo_routes("steady").replace("kind: echo", 'kind: openai\n    url: "http://[x"'),
         "routes.yaml:4 upstreams.demo.url"),
    ],
    ids=["nesting", "huge-int", "ipv6-url"],
)
async def test_a_reload_of_a_hostile_file_names_the_line_and_keeps_the_table(
    tmp_path: Path, broken: str, where: str
) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(echo_routes("steady"))
    holder = TableHolder(path, (KEY,))
    before = holder.current
    path.write_text(broken)
    assert await holder.refresh(force=True) == "failed"
    assert holder.current is before
    assert str(holder.last_error).startswith(where), holder.last_error
    assert "the log has the error" not in str(holder.last_error)


async def test_a_reload_builds_the_routes_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A table of 100,000 models took a quarter of a second to build on the loop, every
    # request waiting; only the adapters (they share health state with the loop) are built
    # there now.
    path = tmp_path / "routes.yaml"
    path.write_text(echo_routes("first"))
    holder = TableHolder(path, (KEY,))
    loop_thread = threading.get_ident()
    threads: dict[str, int] = {}
    real_route, real_upstream = proxy_routing.Route, proxy_routing.build_upstream

    def route(*args: Any, **kwargs: Any) -> Any:
        threads["route"] = threading.get_ident()
        return real_route(*args, **kwargs)

    def upstream(*args: Any) -> Any:
        threads["upstream"] = threading.get_ident()
        return real_upstream(*args)

    monkeypatch.setattr(proxy_routing, "Route", route)
    monkeypatch.setattr(proxy_routing, "build_upstream", upstream)
    path.write_text(echo_routes("first", "second"))
    assert await holder.refresh(force=True) == "reloaded"
    assert [r.name for r in holder.current.routes] == ["first", "second"]
    assert threads["upstream"] == loop_thread
    assert threads["route"] != loop_thread


async def test_models_asks_the_upstreams_of_every_wildcard_route_at_once(
    make_proxy: ProxyFactory,
) -> None:
    # Asked one after another, N slow upstreams made `/v1/models` wait N times as long.
    asked = 0
    in_flight = 0
    most = 0
    both = asyncio.Event()

    async def models(request: web.Request) -> web.Response:
        nonlocal asked, in_flight, most
        asked += 1
        in_flight += 1
        most = max(most, in_flight)
        if in_flight == 2:
            both.set()
        # Bounded, so that the listing asked alone still ends (and the test fails).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(both.wait(), 5.0)
        in_flight -= 1
        return web.json_response({"object": "list", "data": [{"id": f"m{asked}"}]})

    upstream = web.Application()
    upstream.router.add_get("/v1/models", models)
    async with serving(upstream) as url:
        proxy = await make_proxy(
            f"upstreams:\n  one:\n    kind: openai\n    url: {url}/v1\n"
            f"  two:\n    kind: openai\n    url: {url}/v1\n"
            "models:\n  a/*:\n    upstream: one\n  b/*:\n    upstream: two\n"
        )
        ids = await model_ids(proxy.url)
    assert most == 2
    assert sorted(id[:2] for id in ids) == ["a/", "b/"]


async def test_wildcard_routes_to_one_upstream_ask_it_for_its_models_once(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    proxy = await make_proxy(
        f"upstreams:\n  fake:\n    kind: openai\n    url: {fake_openai.url}/v1\n"
        "models:\n  a/*:\n    upstream: fake\n  b/*:\n    upstream: fake\n"
    )
    ids = await model_ids(proxy.url)
    assert ids == ["a/llama-3-8b", "a/qwen-2.5", "b/llama-3-8b", "b/qwen-2.5"]
    assert [r.path for r in fake_openai.received] == ["/v1/models"]


def has_children(pid: int) -> bool:
    return Path(f"/proc/{pid}/task/{pid}/children").read_text().strip() != ""


async def test_a_sighup_storm_while_the_workers_start_ends_none_of_them(tmp_path: Path) -> None:
    # A worker is a fresh interpreter, which a SIGHUP killed (its default action) until its
    # handlers were set; the parent then ended the others and exited 1.
    routes = tmp_path / "routes.yaml"
    routes.write_text(echo_routes("first"))
    log = tmp_path / "serve.log"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AGENTPROXY_")}
    environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    environ["AGENTPROXY_API_KEYS"] = KEY
    command = [
        sys.executable, "-m", "proxy", "serve", "--routes", str(routes), "--host", "127.0.0.1",
        "--port", str(closed_port()), "--workers", "2",
    ]
    proc = start_process(command, log, environ)
    try:
        async def spawning() -> bool:
            # The parent's own handlers are set before its first worker starts.
            assert proc.poll() is None, log.read_text()
            return has_children(proc.pid)

        await eventually(spawning, "the first worker to start")

        async def listening_through_the_storm() -> bool:
            proc.send_signal(signal.SIGHUP)
            assert proc.poll() is None, log.read_text()
            return log.read_text().count("listening on") == 2

        await eventually(listening_through_the_storm, "both workers to listen")
        url = re.findall(r"listening on (http://\S+) ", log.read_text())[0]
        assert await model_ids(url) == ["first"]
        assert proc.poll() is None, log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        await asyncio.to_thread(proc.wait, 30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


async def test_sighup_while_shutting_down_does_not_read_the_file(tmp_path: Path) -> None:
    # The watcher is gone by the end of the shutdown; a SIGHUP then read (and built) the
    # file on the event loop, which a FIFO at the path held for 5 s.
    path = tmp_path / "routes.yaml"
    path.write_text(echo_routes("first"))
    holder = TableHolder(path, (KEY,))
    app = create_app(holder, reload_interval=0)
    async with serving(app):
        app[DRAIN].begin()
    before = holder.current.version
    path.write_text(echo_routes("first", "second"))
    holder.request_reload()
    assert holder.current.version == before


def pair_of(a_url: str, b_url: str, a_name: str = "a", *, with_a: bool = True) -> str:
    a = f"  {a_name}: {{kind: openai, url: '{a_url}/v1', circuit: {{failures: 1, cooldown: 60}}}}\n"
    route = f"[{a_name}, b]" if with_a else "b"
    return (f"upstreams:\n{a if with_a else ''}  b: {{kind: openai, url: '{b_url}/v1'}}\n"
            f"models:\n  m: {{upstream: {route}}}\n")


async def test_an_upstream_removed_then_named_again_starts_with_a_closed_circuit(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI, second_openai: FakeOpenAI
) -> None:
    routes = pair_of(fake_openai.url, second_openai.url)
    proxy = await make_proxy(routes)
    fake_openai.mode = "error500"
    hi: list[Any] = [{"role": "user", "content": "hi"}]
    await proxy.client().chat.completions.create(model="m", messages=hi)
    _, ready = await get_json(proxy.url + "/readyz")
    assert ready["upstreams"]["a"]["state"] == "open"  # type: ignore[index]
    proxy.routes.write_text(pair_of(fake_openai.url, second_openai.url, with_a=False))
    assert proxy.holder.reload()
    # Back under the same name and URL: the table that served it is gone, and its record too.
    fake_openai.mode = "normal"
    proxy.routes.write_text(routes)
    assert proxy.holder.reload()
    _, ready = await get_json(proxy.url + "/readyz")
    assert ready["upstreams"]["a"]["state"] == "closed"  # type: ignore[index]
    await proxy.client().chat.completions.create(model="m", messages=hi)
    assert len(fake_openai.received) == 2
    assert len(second_openai.received) == 1


async def test_upstream_state_does_not_grow_with_reloads_that_rename_upstreams(
    make_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = closed_port()
    url = f"http://127.0.0.1:{port}"
    proxy = await make_proxy(pair_of(url, url))
    served = len(proxy.holder.state.health)
    for n in range(20):
        proxy.routes.write_text(pair_of(url, url, f"gen{n}"))
        assert proxy.holder.reload()
        assert len(proxy.holder.state.health) == served
    # Rejected after its upstreams were built: their state goes with the table.
    real_grant = proxy_routing.make_grant

    def failing_grant(key: str, models: Any) -> Any:
        if key == "sk-doomed-0123456789abcdef":
            raise RuntimeError("late build failure")
        return real_grant(key, models)

    monkeypatch.setattr(proxy_routing, "make_grant", failing_grant)
    for n in range(5):
        proxy.routes.write_text(pair_of(url, url, f"doomed{n}")
                                + "auth:\n  keys:\n    - key: sk-doomed-0123456789abcdef\n")
        assert not proxy.holder.reload()
        assert len(proxy.holder.state.health) == served
    _, ready = await get_json(proxy.url + "/readyz")
    assert set(ready["upstreams"]) == {"gen19", "b"}  # type: ignore[arg-type]
