"""`/metrics` after real traffic, the per-request log line, and both with several workers."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import socket
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.logs import JsonFormatter, TextFormatter
from tests.conftest import KEY, ProxyFactory
from tests.fake_openai import FakeOpenAI
from tests.processes import eventually, serve_process

ECHO_ONLY = "upstreams: {demo: {kind: echo}}\nmodels: {echo: {upstream: demo}}\n"


def routes_for(fake: FakeOpenAI) -> str:
    return f"""
upstreams:
  fake:
    kind: openai
    url: {fake.url}/v1
  demo:
    kind: echo
models:
  mistral:
    upstream: fake
  "local/*":
    upstream: fake
  echo:
    upstream: demo
"""


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): float(s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


async def scrape(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as resp:
        assert resp.status == 200  # no key: scrapers have none
        assert resp.headers["Content-Type"].startswith("text/plain")
        return await resp.text()


async def test_metrics_count_requests_latency_streams_and_upstream_errors(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    proxy = await make_proxy(routes_for(fake_openai))
    client = proxy.client()
    hello: Any = [{"role": "user", "content": "hello there"}]
    await client.chat.completions.create(model="mistral", messages=hello)
    stream = await client.chat.completions.create(
        model="mistral", messages=hello, stream=True
    )
    assert [c async for c in stream]
    await client.chat.completions.create(model="local/qwen-2.5", messages=hello)
    await client.chat.completions.create(model="echo", messages=hello)
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="nope", messages=hello)
    fake_openai.mode = "html500"
    with pytest.raises(openai.APIStatusError):
        await client.chat.completions.create(model="mistral", messages=hello)

    text = await scrape(proxy.url)
    requests = "agentproxy_requests_total"
    assert value(text, requests, model="mistral", upstream="fake", status="200") == 2
    assert value(text, requests, model="mistral", upstream="fake", status="502") == 1
    # A `prefix/*` route is one label value, whatever model names clients send through it.
    assert value(text, requests, model="local/*", upstream="fake", status="200") == 1
    assert value(text, requests, model="echo", upstream="demo", status="200") == 1
    assert value(text, requests, model="", upstream="", status="404") == 1
    duration = "agentproxy_request_duration_seconds_count"
    assert value(text, duration, model="mistral", upstream="fake") == 3
    ttft = "agentproxy_time_to_first_token_seconds_count"
    assert value(text, ttft, model="mistral", upstream="fake") == 1
    # Not the 502: the upstream never answered, so its share of the time is unknown.
    assert value(text, "agentproxy_overhead_seconds_count") == 5
    assert value(text, "agentproxy_open_streams") == 0
    errors = "agentproxy_upstream_errors_total"
    assert value(text, errors, upstream="fake", code="upstream_error") == 1
    version = proxy.holder.current.version
    assert value(text, "agentproxy_route_table_info", version=version) == 1
    assert value(text, "agentproxy_reloads_total", result="success") == 0
    assert value(text, "agentproxy_reloads_total", result="error") == 0


async def test_open_streams_counts_a_stream_while_it_runs(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    fake_openai.mode = "stream_hang"
    proxy = await make_proxy(routes_for(fake_openai))
    stream = await proxy.client().chat.completions.create(
        model="mistral", messages=[{"role": "user", "content": "wait"}], stream=True
    )
    chunks = stream.__aiter__()
    await chunks.__anext__()
    assert value(await scrape(proxy.url), "agentproxy_open_streams") == 1
    fake_openai.release.set()
    assert [c async for c in chunks]

    async def closed() -> bool:
        return value(await scrape(proxy.url), "agentproxy_open_streams") == 0

    await eventually(closed, "the stream to be counted as closed")


async def test_one_log_line_per_request_with_its_fields_and_no_secrets(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agentproxy.access")
    proxy = await make_proxy(routes_for(fake_openai))
    secret_text = "my diary says the launch code is 0000"
    stream = await proxy.client().chat.completions.create(
        model="mistral", messages=[{"role": "user", "content": secret_text}], stream=True,
        extra_headers={"X-Request-Id": "req-from-client"},
    )
    assert [c async for c in stream]
    records = [r for r in caplog.records if r.name == "agentproxy.access"]
    assert len(records) == 1
    record = records[0]
    fields = vars(record)
    assert record.getMessage() == "POST /v1/chat/completions"
    assert fields["request_id"] == "req-from-client"
    assert fields["model"] == "mistral" and fields["upstream"] == "fake"
    assert fields["status"] == 200 and fields["stream"] is True
    assert fields["duration_ms"] >= fields["ttft_ms"] > 0
    assert fields["bytes"] > 0
    text_line = TextFormatter().format(record)
    json_line = json.loads(JsonFormatter().format(record))
    assert "request_id=req-from-client" in text_line and "model=mistral" in text_line
    assert json_line["upstream"] == "fake" and json_line["status"] == 200
    for line in (text_line, json.dumps(json_line)):
        assert KEY not in line and "launch code" not in line and "\n" not in line


async def test_the_log_line_is_not_built_when_its_level_is_off(
    make_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the log line was built although nobody reads it")

    monkeypatch.setattr("proxy.front.log_exchange", refuse)
    logging.getLogger("agentproxy.access").setLevel(logging.WARNING)
    try:
        proxy = await make_proxy(ECHO_ONLY)
        reply = await proxy.client().chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "quiet"}]
        )
        assert reply.choices[0].message.content == "quiet"
    finally:
        logging.getLogger("agentproxy.access").setLevel(logging.NOTSET)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def echo_status(url: str) -> int:
    """The status of one echo chat request on a connection of its own."""
    async with aiohttp.ClientSession() as http, http.post(
        url + "/v1/chat/completions",
        json={"model": "echo", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {KEY}"},
    ) as resp:
        return resp.status


async def test_with_two_workers_any_scrape_gives_the_totals(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(ECHO_ONLY)
    metrics_dir = tmp_path / "metrics"
    sent = 24
    async with serve_process(
        routes, port=free_port(), workers=2, env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    ) as served:
        for _ in range(sent):
            # A new connection each time, so SO_REUSEPORT spreads them over both workers.
            assert await echo_status(served.url) == 200
        writers = {p.name.rsplit("_", 1)[1] for p in metrics_dir.glob("counter_*.db")}
        assert len(writers) == 2, "both workers should have served some requests"
        for _ in range(8):
            async with aiohttp.ClientSession() as http, http.get(served.url + "/metrics") as r:
                text = await r.text()
            total = "agentproxy_requests_total"
            assert value(text, total, model="echo", upstream="demo", status="200") == sent
            assert value(text, "agentproxy_open_streams") == 0
        served.proc.send_signal(signal.SIGTERM)
        assert await served.exit_code() == 0


async def test_a_scrape_after_the_workers_metrics_directory_was_removed_is_a_clear_503(
    tmp_path: Path,
) -> None:
    # A temporary-files cleaner may remove it under the running workers: the scrape was a
    # 500 `internal_error` with a traceback in the log, at every scrape.
    routes = tmp_path / "routes.yaml"
    routes.write_text(ECHO_ONLY)
    metrics_dir = tmp_path / "metrics"
    async with serve_process(
        routes, port=free_port(), workers=2, env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    ) as served:
        shutil.rmtree(metrics_dir)
        async with aiohttp.ClientSession() as http, http.get(served.url + "/metrics") as r:
            assert r.status == 503
            error = (await r.json())["error"]
        assert error["code"] == "service_unavailable"
        assert "PROMETHEUS_MULTIPROC_DIR" in error["message"]
        assert str(tmp_path) not in error["message"]
        # The requests themselves are served as before.
        assert await echo_status(served.url) == 200
        served.proc.send_signal(signal.SIGTERM)
        assert await served.exit_code() == 0
    assert "Traceback" not in served.output()


async def test_asyncio_tasks_gauge_counts_the_loops_tasks_at_scrape_time(
    make_proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    proxy = await make_proxy(routes_for(fake_openai))
    # The fake upstream serves from this same loop: a keep-alive connection that the proxy
    # pools to it is a task here until the pool lets it go (30 s). One request first pools
    # it, so it counts in `idle` too, whether the stream reuses it or it closes after.
    await proxy.client().chat.completions.create(
        model="mistral", messages=[{"role": "user", "content": "hi"}]
    )
    fake_openai.mode = "stream_hang"
    idle = value(await scrape(proxy.url), "agentproxy_asyncio_tasks")
    assert idle is not None and idle >= 1  # at least the scrape's own handler
    stream = await proxy.client().chat.completions.create(
        model="mistral", messages=[{"role": "user", "content": "wait"}], stream=True
    )
    chunks = stream.__aiter__()
    await chunks.__anext__()
    busy = value(await scrape(proxy.url), "agentproxy_asyncio_tasks")
    assert busy is not None and busy > idle
    fake_openai.release.set()
    assert [c async for c in chunks]
    # An open keep-alive connection has a task of its own in aiohttp's server.
    await proxy.close_clients()

    async def back_to_idle() -> bool:
        now = value(await scrape(proxy.url), "agentproxy_asyncio_tasks")
        return now is not None and now <= idle

    await eventually(back_to_idle, "the stream's tasks to end")


def test_each_request_lands_in_the_bucket_of_its_duration_and_in_the_sum() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from proxy.exchange import Exchange
    from proxy.metrics import Metrics

    metrics = Metrics(CollectorRegistry())
    for duration in (0.3, 0.25, 400.0):  # inside a bucket, on a bound, past the last
        ex = Exchange(0.0, "req_x")
        ex.route, ex.upstream, ex.status = "m", "u", 200
        metrics.observe(ex, duration, 0.0002)
    metrics.flush()
    metrics.flush()  # a second flush adds nothing twice
    text = generate_latest(metrics.registry).decode()
    bucket = "agentproxy_request_duration_seconds_bucket"
    assert value(text, bucket, model="m", upstream="u", le="0.1") == 0
    assert value(text, bucket, model="m", upstream="u", le="0.25") == 1
    assert value(text, bucket, model="m", upstream="u", le="0.5") == 2
    assert value(text, bucket, model="m", upstream="u", le="300.0") == 2
    assert value(text, bucket, model="m", upstream="u", le="+Inf") == 3
    assert value(text, "agentproxy_request_duration_seconds_sum", model="m", upstream="u") == (
        pytest.approx(400.55)
    )
    assert value(text, "agentproxy_requests_total", model="m", upstream="u", status="200") == 3
    assert value(text, "agentproxy_overhead_seconds_bucket", le="0.00025") == 3


def test_the_request_series_expose_what_prometheus_clients_own_objects_would() -> None:
    """One process keeps its per-request series as plain numbers (proxy/request_series.py);
    a scrape must read exactly what prometheus_client's Counter and Histograms, fed the same
    requests, would have written."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from proxy.exchange import Exchange
    from proxy.metrics import Metrics
    from proxy.request_series import DURATION_BUCKETS, OVERHEAD_BUCKETS, TTFT_BUCKETS

    ours = Metrics(CollectorRegistry())
    reference = CollectorRegistry()
    requests = Counter("agentproxy_requests", "", ["model", "upstream", "status"],
                       registry=reference)
    duration = Histogram("agentproxy_request_duration_seconds", "", ["model", "upstream"],
                         buckets=DURATION_BUCKETS, registry=reference)
    ttft = Histogram("agentproxy_time_to_first_token_seconds", "", ["model", "upstream"],
                     buckets=TTFT_BUCKETS, registry=reference)
    overhead = Histogram("agentproxy_overhead_seconds", "", buckets=OVERHEAD_BUCKETS,
                         registry=reference)
    cases = [
        ("a", "u1", 200, 0.004, None, 0.0001),  # on the first bound
        ("a", "u1", 200, 0.01, 0.01, 0.00011),
        ("a", "u1", 502, 7.5, 0.3, None),  # another status shares the route's histograms
        ("a", "u2", 200, 1000.0, 90.0, 2.0),  # past every bound
        ("b", "u1", 429, 0.0, None, 0.0),
    ]
    for route, upstream, status, seconds, first, own in cases:
        ex = Exchange(0.0, "req_x")
        ex.route, ex.upstream, ex.status, ex.ttft = route, upstream, status, first
        ours.observe(ex, seconds, own)
        requests.labels(route, upstream, str(status)).inc()
        duration.labels(route, upstream).observe(seconds)
        ttft.labels(route, upstream)
        if first is not None:
            ttft.labels(route, upstream).observe(first)
        if own is not None:
            overhead.observe(own)

    def series(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        text = generate_latest(registry).decode()
        return {k: v for k, v in samples(text).items() if "agentproxy_asyncio" not in k[0]
                and not k[0].endswith("_created")
                and any(k[0].startswith(f.name) for f in reference.collect())}

    got = series(ours.registry)
    assert got == series(reference)
    assert len(got) > 80  # every bucket of every series, not an empty match
    created = [k for k in samples(generate_latest(ours.registry).decode())
               if k[0] == "agentproxy_request_duration_seconds_created"]
    assert len(created) == 3  # one per (route, upstream), as the Histogram has
