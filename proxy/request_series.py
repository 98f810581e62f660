"""The per-request metrics of one process, kept as plain numbers and exposed at scrape time.

prometheus_client's Counter.inc and Histogram.observe take a lock each and the histogram walks
its bounds in Python: the three series a request feeds (its count, its duration, the proxy's
overhead) cost a sync request about 3.5 % of its CPU that way. Here a request adds to a few
integers and floats (a bisect finds the bucket), and `RequestSeries.collect` builds the same
families from them when a scrape asks, through prometheus_client's public collector API: the
exposition text is what the Counter and Histograms wrote, `_created` samples included.

Only for one process: with `--workers N` every value must reach prometheus_client's
multiprocess files, so `Metrics` feeds its own Counter and Histograms instead.
"""

from __future__ import annotations

import os
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from proxy.exchange import Exchange


class SeriesSpec(NamedTuple):
    """One per-request series, as both modes expose it (this collector, or prometheus_client's
    own objects with `--workers`: proxy/metrics.py)."""

    name: str
    documentation: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()


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

REQUESTS = SeriesSpec(
    "agentproxy_requests", "Chat completion requests, by route, upstream and status.",
    ("model", "upstream", "status"),
)
DURATION = SeriesSpec(
    "agentproxy_request_duration_seconds",
    "Time from the request's arrival to its last byte, streams included.",
    ("model", "upstream"), DURATION_BUCKETS,
)
TTFT = SeriesSpec(
    "agentproxy_time_to_first_token_seconds",
    "Time from a streaming request's arrival to the first event with generated output.",
    ("model", "upstream"), TTFT_BUCKETS,
)
OVERHEAD = SeriesSpec(
    "agentproxy_overhead_seconds",
    "The proxy's own time per request: the time to the response headers (the whole "
    "request when not streaming) minus the time spent waiting for the upstream.",
    (), OVERHEAD_BUCKETS,
)


def _created_series() -> bool:
    # prometheus_client's own switch for `_created` samples, read the way it reads it.
    return os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False").lower() not in (
        "true", "1", "t",
    )


class Series:
    """One histogram's observations: a count per bucket (a bucket per upper bound, the
    smallest bound not below the value, then +Inf) and their sum, cumulated only when
    exposed, as prometheus_client's Histogram keeps them."""

    __slots__ = ("bounds", "counts", "created", "names", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        # The `le` labels, in prometheus_client's spelling of a bound (+Inf last).
        self.names: list[str] = [
            floatToGoString(bound)  # type: ignore[no-untyped-call]
            for bound in (*self.bounds, float("inf"))
        ]
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.created = time.time()

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for name, count in zip(self.names, self.counts, strict=True):
            total += count
            out.append((name, total))
        return out


class Tally:
    """The requests of one (route, upstream, status), and the series they feed."""

    __slots__ = ("count", "created", "duration", "ttft")

    def __init__(self, duration: Series, ttft: Series) -> None:
        self.count = 0
        self.created = time.time()
        self.duration = duration
        self.ttft = ttft


class RequestSeries(Collector):
    """`agentproxy_requests`, `agentproxy_request_duration_seconds`,
    `agentproxy_time_to_first_token_seconds` and `agentproxy_overhead_seconds` of this
    process."""

    def __init__(self) -> None:
        self._tallies: dict[tuple[str, str, int], Tally] = {}
        # Per (route, upstream): shared by the tallies of every status.
        self._durations: dict[tuple[str, str], Series] = {}
        self._ttfts: dict[tuple[str, str], Series] = {}
        self._overhead = Series(OVERHEAD.buckets)
        self._created = _created_series()

    def observe(self, ex: Exchange, duration: float, overhead: float | None) -> None:
        key = (ex.route, ex.upstream, ex.status)
        tally = self._tallies.get(key)
        if tally is None:
            tally = self._tallies[key] = self._tally(key)
        tally.count += 1
        # Each series' bucket (a bisect) and sum, written out: no call per series.
        series = tally.duration
        series.counts[bisect_left(series.bounds, duration)] += 1
        series.sum += duration
        ttft = ex.ttft
        if ttft is not None:
            series = tally.ttft
            series.counts[bisect_left(series.bounds, ttft)] += 1
            series.sum += ttft
        if overhead is not None:
            series = self._overhead
            series.counts[bisect_left(series.bounds, overhead)] += 1
            series.sum += overhead

    def _tally(self, key: tuple[str, str, int]) -> Tally:
        pair = key[:2]
        duration = self._durations.get(pair)
        if duration is None:
            duration = self._durations[pair] = Series(DURATION.buckets)
            self._ttfts[pair] = Series(TTFT.buckets)
        return Tally(duration, self._ttfts[pair])

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            REQUESTS.name, REQUESTS.documentation, labels=list(REQUESTS.labels)
        )
        for (route, upstream, status), tally in list(self._tallies.items()):
            requests.add_metric(
                [route, upstream, str(status)], tally.count,
                created=tally.created if self._created else None,
            )
        yield requests
        yield self._histogram(DURATION, list(self._durations.items()))
        yield self._histogram(TTFT, list(self._ttfts.items()))
        yield self._histogram(OVERHEAD, [((), self._overhead)])

    def _histogram(
        self, spec: SeriesSpec, series: Iterable[tuple[tuple[str, ...], Series]],
    ) -> HistogramMetricFamily:
        family = HistogramMetricFamily(spec.name, spec.documentation, labels=list(spec.labels))
        for labels, one in series:
            family.add_metric(list(labels), one.buckets(), one.sum)
            if self._created:
                family.add_sample(
                    spec.name + "_created", dict(zip(spec.labels, labels, strict=True)),
                    one.created,
                )
        return family
