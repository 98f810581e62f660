"""Prometheus metrics and the per-request record they are made from.

Every chat request fills one `Exchange` (proxy/exchange.py) as it goes (model, upstream,
first token, status); the front wrapper (proxy/front.py) hands it to `Metrics.observe` and to
the access log (proxy/access_log.py) when the request ends, so the handlers never talk to
Prometheus on the hot path themselves. In one process `observe` adds to plain numbers that a
collector exposes at scrape time (proxy/request_series.py).

With `--workers N` the parent process sets PROMETHEUS_MULTIPROC_DIR before it starts the
workers, so prometheus_client keeps every value in a file per process there; `/metrics` in any
worker then merges all of them, and one scrape gives the totals of the whole pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

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

from proxy.errors import ServiceUnavailable
from proxy.exchange import Exchange
from proxy.request_series import DURATION, OVERHEAD, REQUESTS, TTFT, RequestSeries

if TYPE_CHECKING:
    from proxy.upstreams.base import Upstream

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST

# An event that carries generated output: text, reasoning, or the start of a tool call. The
# role chunk that opens every stream does not count, so the time to it is not "first token".
_TOKEN = re.compile(
    rb'"(?:content|reasoning_content|reasoning)"\s*:\s*"(?!")|"tool_calls"\s*:\s*\[\s*\{'
)

# Why a request was refused before any handler ran (`agentproxy_rejected_requests`), and which
# wait a too-slow connection overran (`agentproxy_connection_timeouts`); each series exists
# from the start, at 0, for alerts on its rate.
REJECT_REASONS = (
    "bad_request_line", "bad_header", "header_too_large", "bad_framing", "bad_body",
    "unsupported_encoding", "bad_target",
)
TIMEOUT_PHASES = ("header", "body")


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
        # The series every request feeds: plain numbers exposed at scrape time in one
        # process (proxy/request_series.py); prometheus_client's own objects with --workers,
        # whose values must reach its multiprocess files.
        self.observe: Callable[[Exchange, float, float | None], None]
        if self.multiprocess_dir:
            self._shared = _SharedSeries(reg)
            self.observe = self._shared.observe
        else:
            series = RequestSeries()
            reg.register(series)
            self.observe = series.observe
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
        self.rejected_requests = Counter(
            "agentproxy_rejected_requests",
            "Requests refused as malformed before any handler ran (refused by the HTTP parser, "
            "a target that is not a path, a body that cannot be decoded, an unsupported "
            "Content-Encoding), by reason.",
            ["reason"], registry=reg,
        )
        self.connection_timeouts = Counter(
            "agentproxy_connection_timeouts",
            "Connections closed for a client too slow to send: no complete first request head "
            "within --header-timeout (header), no body byte for --body-timeout (body).",
            ["phase"], registry=reg,
        )
        for reason in REJECT_REASONS:
            self.rejected_requests.labels(reason)
        for phase in TIMEOUT_PHASES:
            self.connection_timeouts.labels(phase)
        self.tasks = TaskCount()
        reg.register(self.tasks)
        self._version: str | None = None
        # Open streams are counted here and handed to the gauge when a scrape asks (`flush`),
        # or at once in multiprocess mode, where any worker's scrape must see them.
        self._open = 0
        self._open_flushed = 0
        for result in ("success", "error"):
            self.reloads.labels(result)

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
        """Hands the count of open streams to its gauge. On the event loop, before `render`."""
        self._flush_open()

    def upstream_error(self, upstream: str, code: str | None) -> None:
        self.upstream_errors.labels(upstream, code or "error").inc()

    def failover(self, upstream: Upstream) -> None:
        """The request left `upstream` for the next one (failover.Failover reports it)."""
        self.failovers.labels(upstream.name).inc()

    def rejected(self, reason: str) -> None:
        """A request refused as malformed: rare, so counted at once."""
        self.rejected_requests.labels(reason).inc()

    def timed_out(self, phase: str) -> None:
        self.connection_timeouts.labels(phase).inc()

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
            if not os.path.isdir(self.multiprocess_dir):
                # Removed under the running workers (a temporary-files cleaner): their values
                # are in files nobody can open any more, and no scrape will see them again.
                raise ServiceUnavailable(
                    f"The metrics directory of the workers ({MULTIPROC_ENV}) was removed; "
                    "restart the proxy to count again."
                )
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
            registry.register(self.tasks)
            return generate_latest(registry)
        return generate_latest(self.registry)


class _SharedSeries:
    """The per-request series as prometheus_client's Counter and Histograms, for the
    multiprocess mode: each value goes to this worker's file, which any worker's scrape
    merges."""

    def __init__(self, reg: CollectorRegistry) -> None:
        self.requests = Counter(
            REQUESTS.name, REQUESTS.documentation, REQUESTS.labels, registry=reg
        )
        self.duration, self.ttft, self.overhead = (
            Histogram(spec.name, spec.documentation, spec.labels, buckets=spec.buckets,
                      registry=reg)
            for spec in (DURATION, TTFT, OVERHEAD)
        )
        # The labelled children of each (route, upstream, status), looked up once: `labels()`
        # takes a lock and checks its arguments on every call.
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram, Histogram]] = {}

    def observe(self, ex: Exchange, duration: float, overhead: float | None) -> None:
        key = (ex.route, ex.upstream, ex.status)
        children = self._children.get(key)
        if children is None:
            route, upstream, status = key
            children = self._children[key] = (
                self.requests.labels(route, upstream, str(status)),
                self.duration.labels(route, upstream),
                self.ttft.labels(route, upstream),
            )
        requests, durations, ttfts = children
        requests.inc()
        durations.observe(duration)
        if ex.ttft is not None:
            ttfts.observe(ex.ttft)
        if overhead is not None:
            self.overhead.observe(overhead)
