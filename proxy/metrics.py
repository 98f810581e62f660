"""Prometheus metrics, the per-request record they are made from, and the access log line.

Every chat request fills one `Exchange` (proxy/exchange.py) as it goes (model, upstream,
first token, status);
the front wrapper (proxy/app.py) hands it to `Metrics.observe` and to `log_exchange` when the
request ends, so the handlers never talk to Prometheus on the hot path themselves.

With `--workers N` the parent process sets PROMETHEUS_MULTIPROC_DIR before it starts the
workers, so prometheus_client keeps every value in a file per process there; `/metrics` in any
worker then merges all of them, and one scrape gives the totals of the whole pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from proxy.exchange import Exchange

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST

# Seconds. Agent turns (tool loops, Letta's memory edits) run for minutes, so the upper buckets
# go far past what a bare model server needs.
DURATION_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# The proxy's own share is meant to stay well under a millisecond.
OVERHEAD_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)

# An event that carries generated output: text, reasoning, or the start of a tool call. The
# role chunk that opens every stream does not count, so the time to it is not "first token".
_TOKEN = re.compile(
    rb'"(?:content|reasoning_content|reasoning)"\s*:\s*"(?!")|"tool_calls"\s*:\s*\[\s*\{'
)

access_log = logging.getLogger("agentproxy.access")


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def has_token(event: bytes) -> bool:
    return _TOKEN.search(event) is not None


class TaskCount(Collector):
    """`agentproxy_asyncio_tasks`: the tasks of this process's event loop, counted at scrape
    time (the scrape's own handler included). A live value of one process, never written to
    the multiprocess files: with `--workers N` it is the count of the worker that answered.

    `render` runs in a thread, where no loop is running, so the scrape handler calls `sample`
    on the loop first; collected on the loop itself (tests), it counts directly.
    """

    def __init__(self) -> None:
        self._count: int | None = None

    def sample(self) -> None:
        self._count = len(asyncio.all_tasks())

    def collect(self) -> Iterator[Metric]:
        count = self._count
        # Off the event loop (render's thread) there is none to count: the count `sample` took.
        with contextlib.suppress(RuntimeError):
            count = len(asyncio.all_tasks())
        if count is not None:
            yield GaugeMetricFamily(
                "agentproxy_asyncio_tasks",
                "Tasks of this process's event loop, counted at scrape time.",
                value=count,
            )


class Metrics:
    """The proxy's metrics. One instance per application, each with its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.multiprocess_dir = multiprocess_dir()
        self.registry = reg = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "agentproxy_requests", "Chat completion requests, by route, upstream and status.",
            ["model", "upstream", "status"], registry=reg,
        )
        self.duration = Histogram(
            "agentproxy_request_duration_seconds",
            "Time from the request's arrival to its last byte, streams included.",
            ["model", "upstream"], buckets=DURATION_BUCKETS, registry=reg,
        )
        self.ttft = Histogram(
            "agentproxy_time_to_first_token_seconds",
            "Time from a streaming request's arrival to the first event with generated output.",
            ["model", "upstream"], buckets=TTFT_BUCKETS, registry=reg,
        )
        self.overhead = Histogram(
            "agentproxy_overhead_seconds",
            "The proxy's own time per request: the time to the response headers (the whole "
            "request when not streaming) minus the time spent waiting for the upstream.",
            buckets=OVERHEAD_BUCKETS, registry=reg,
        )
        self.open_streams = Gauge(
            "agentproxy_open_streams", "Streaming responses being relayed now.",
            registry=reg, multiprocess_mode="livesum",
        )
        self.upstream_errors = Counter(
            "agentproxy_upstream_errors",
            "Upstream failures, by upstream and error code (before or during a stream).",
            ["upstream", "code"], registry=reg,
        )
        self.failovers = Counter(
            "agentproxy_failovers",
            "Requests that an upstream failed before anything reached the client and that the "
            "next upstream of the route then took, by the upstream that failed.",
            ["upstream"], registry=reg,
        )
        self.reloads = Counter(
            "agentproxy_reloads", "Route table reloads, by result (success or error).",
            ["result"], registry=reg,
        )
        self.table_info = Gauge(
            "agentproxy_route_table_info", "The route table being served (1) by content hash.",
            ["version"], registry=reg, multiprocess_mode="livemax",
        )
        self.table_loaded = Gauge(
            "agentproxy_route_table_loaded_timestamp_seconds",
            "When the route table being served was loaded (Unix time).",
            registry=reg, multiprocess_mode="livemax",
        )
        self.tasks = TaskCount()
        reg.register(self.tasks)
        self._version: str | None = None
        # A request's figures are added up here, in plain ints and floats, and handed to
        # prometheus_client when a scrape asks (`flush`): its values take a lock each (and in
        # multiprocess mode write to a file), several per request. In multiprocess mode every
        # request is flushed at once, so a scrape of any worker still gives exact totals.
        self._pending: dict[tuple[str, str, int], _Tally] = {}
        self._overhead = _Buckets(self.overhead)
        self._open = 0
        self._open_flushed = 0
        for result in ("success", "error"):
            self.reloads.labels(result)

    def observe(self, ex: Exchange, duration: float, overhead: float | None) -> None:
        key = (ex.route, ex.upstream, ex.status)
        tally = self._pending.get(key)
        if tally is None:
            tally = self._pending[key] = _Tally(self, key)
        tally.count += 1
        tally.duration.add(duration)
        if ex.ttft is not None:
            tally.ttft.add(ex.ttft)
        if overhead is not None:
            self._overhead.add(overhead)
        if self.multiprocess_dir:
            # Only what this request touched: the other tallies hold nothing.
            tally.flush()
            self._overhead.flush()

    def stream_opened(self) -> None:
        self._open += 1
        if self.multiprocess_dir:
            self._flush_open()

    def stream_closed(self) -> None:
        self._open -= 1
        if self.multiprocess_dir:
            self._flush_open()

    def _flush_open(self) -> None:
        if self._open != self._open_flushed:
            self._open_flushed = self._open
            self.open_streams.set(self._open)

    def flush(self) -> None:
        """Hands what was added up since the last flush to prometheus_client. On the event
        loop: the tallies are the loop's."""
        for tally in self._pending.values():
            tally.flush()
        self._overhead.flush()
        self._flush_open()

    def upstream_error(self, upstream: str, code: str | None) -> None:
        self.upstream_errors.labels(upstream, code or "error").inc()

    def failover(self, upstream: str) -> None:
        self.failovers.labels(upstream).inc()

    def reloaded(self, ok: bool) -> None:
        self.reloads.labels("success" if ok else "error").inc()

    def table(self, version: str, loaded_at: float) -> None:
        previous, self._version = self._version, version
        if previous == version:
            return
        if previous is not None:
            if self.multiprocess_dir:
                # A file-backed series cannot be removed; 0 says "no longer served here".
                self.table_info.labels(previous).set(0)
            else:
                self.table_info.remove(previous)
        self.table_info.labels(version).set(1)
        self.table_loaded.set(loaded_at)

    def render(self) -> bytes:
        """The exposition text; merges every worker's files in multiprocess mode. Call
        `flush` first, on the loop (render itself may run in a thread)."""
        if self.multiprocess_dir:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
            registry.register(self.tasks)
            return generate_latest(registry)
        return generate_latest(self.registry)


class _Buckets:
    """Observations of one histogram child since its last flush: a count per bucket and
    their sum, as prometheus_client's Histogram keeps them (a bucket per upper bound, the
    smallest bound not below the value, +Inf last; cumulated only when exposed)."""

    __slots__ = ("_bounds", "_child", "_counts", "_sum")

    def __init__(self, child: Histogram) -> None:
        self._child = child
        self._bounds: list[float] = child._upper_bounds
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def add(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def flush(self) -> None:
        counts = self._counts
        if not any(counts):
            return
        # Histogram.observe() adds one observation at a time; these are its own value
        # objects (the same that observe() increments), so what is exposed is the same.
        child = self._child
        child._sum.inc(self._sum)
        for i, n in enumerate(counts):
            if n:
                child._buckets[i].inc(n)
                counts[i] = 0
        self._sum = 0.0


class _Tally:
    """One (route, upstream, status)'s requests since the last flush."""

    __slots__ = ("_counter", "count", "duration", "ttft")

    def __init__(self, metrics: Metrics, key: tuple[str, str, int]) -> None:
        route, upstream, status = key
        self._counter = metrics.requests.labels(route, upstream, str(status))
        self.count = 0
        self.duration = _Buckets(metrics.duration.labels(route, upstream))
        self.ttft = _Buckets(metrics.ttft.labels(route, upstream))

    def flush(self) -> None:
        if self.count:
            self._counter.inc(self.count)
            self.count = 0
        self.duration.flush()
        self.ttft.flush()


def log_exchange(
    request_id: str, method: str, path: str, ex: Exchange, duration: float, sent: int,
    level: int = logging.INFO,
) -> None:
    """One line per request. The caller checks `access_log.isEnabledFor(level)` first."""
    fields: dict[str, Any] = {
        "request_id": request_id,
        "status": ex.status,
        "duration_ms": round(duration * 1000.0, 2),
        "bytes": sent,
    }
    if ex.chat:
        fields["model"] = ex.model[:256]
        fields["upstream"] = ex.upstream
        fields["stream"] = ex.stream
        fields["ttft_ms"] = None if ex.ttft is None else round(ex.ttft * 1000.0, 2)
    if ex.error is not None:
        fields["error"] = ex.error
    access_log.log(level, "%s %s", method, path, extra=fields)
