"""The gateway's Prometheus metrics, in a registry owned by the app (no module globals).

Per model: requests by route and outcome, queue depth and in-flight (read from admission at
scrape time), time in queue, time to first token (streams), end-to-end latency, generated tokens,
retries by kind.

Counted in plain numbers (`ModelMetrics`) and turned into metric families only when scraped
(`_RequestCollector`): every request updates five of them, and prometheus_client's own counters
and histograms take a lock for each update, which cost about a tenth of a request's CPU on the
gateway's hot path. The event loop is their only writer (scrapes run on it too), so no lock is
needed.
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from gateway.admission import Admission
from gateway.errors import GatewayError
from gateway.routes import RouteWatcher

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_BOUNDS = [str(float(b)) for b in _LATENCY_BUCKETS] + ["+Inf"]  # as prometheus_client writes them


class _AdmissionCollector(Collector):
    def __init__(self, watcher: RouteWatcher, admission: Admission) -> None:
        self._watcher = watcher
        self._admission = admission

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "sem_gateway_queue_depth", "Requests waiting for a slot", labels=["model"]
        )
        in_flight = GaugeMetricFamily(
            "sem_gateway_in_flight", "Requests being served by an engine", labels=["model"]
        )
        ready = GaugeMetricFamily(
            "sem_gateway_ready_replicas", "Replicas the gateway routes to", labels=["model"]
        )
        for name, route in sorted(self._watcher.table.models.items()):
            depth.add_metric([name], self._admission.queued(name))
            in_flight.add_metric([name], self._admission.in_flight(name))
            ready.add_metric([name], len(route.ready_replicas))
        yield depth
        yield in_flight
        yield ready


class Latency:
    """One model's histogram of seconds: a count per bucket (not cumulative) and their sum."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * len(_BOUNDS)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(_LATENCY_BUCKETS, seconds)] += 1  # `le`: bound >= seconds
        self.sum += seconds

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative, as Prometheus has them."""
        total, out = 0, []
        for bound, count in zip(_BOUNDS, self.counts, strict=True):
            total += count
            out.append((bound, float(total)))
        return out


class ModelMetrics:
    """One model's numbers."""

    __slots__ = ("generated_tokens", "label", "queue_seconds", "request_seconds", "requests",
                 "retries", "ttft_seconds")  # fmt: skip

    def __init__(self, label: str) -> None:
        self.label = label
        self.requests: dict[tuple[str, str], int] = {}  # (route, outcome) -> requests
        self.queue_seconds = Latency()
        self.ttft_seconds = Latency()
        self.request_seconds = Latency()
        self.generated_tokens = 0
        # kind (gateway.journey.Retry) -> requests; both shown from the start, so that rate()
        # sees the first retry
        self.retries = {"replay": 0, "resume": 0}

    def count(self, route: str, outcome: str) -> None:
        key = (route, outcome)
        self.requests[key] = self.requests.get(key, 0) + 1

    def retried(self, kind: str) -> None:
        self.retries[kind] = self.retries.get(kind, 0) + 1


class _RequestCollector(Collector):
    """Every model's numbers as metric families, at scrape time."""

    def __init__(self, models: dict[str, ModelMetrics]) -> None:
        self._models = models

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        requests = CounterMetricFamily(
            "sem_gateway_requests", "Requests by model, route and outcome",
            labels=["model", "route", "outcome"],
        )  # fmt: skip
        latencies = {
            "queue_seconds": ("sem_gateway_queue_seconds", "Time from arrival to a slot"),
            "ttft_seconds": ("sem_gateway_time_to_first_token_seconds",
                             "Arrival to the first streamed chunk"),
            "request_seconds": ("sem_gateway_request_seconds", "Arrival to the last byte"),
        }  # fmt: skip
        histograms = {
            attr: HistogramMetricFamily(name, doc, labels=["model"])
            for attr, (name, doc) in latencies.items()
        }
        tokens = CounterMetricFamily(
            "sem_gateway_generated_tokens", "Completion tokens (usage; streams: one per chunk)",
            labels=["model"],
        )  # fmt: skip
        retries = CounterMetricFamily(
            "sem_gateway_retries", "Requests sent again after an engine failed them: `replay`"
            " (nothing had reached the client) or `resume` (a stream went on from where it broke)",
            labels=["model", "kind"],
        )  # fmt: skip
        for label, model in sorted(self._models.items()):
            for (route, outcome), count in sorted(model.requests.items()):
                requests.add_metric([label, route, outcome], count)
            for attr, family in histograms.items():
                latency: Latency = getattr(model, attr)
                family.add_metric([label], latency.buckets(), latency.sum)
            tokens.add_metric([label], model.generated_tokens)
            for kind, count in sorted(model.retries.items()):
                retries.add_metric([label, kind], count)
        yield requests
        yield from histograms.values()
        yield tokens
        yield retries


class GatewayMetrics:
    def __init__(self, watcher: RouteWatcher, admission: Admission) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._models: dict[str, ModelMetrics] = {}
        self.registry.register(_RequestCollector(self._models))
        self.registry.register(_AdmissionCollector(watcher, admission))

    def model(self, label: str) -> ModelMetrics:
        found = self._models.get(label)
        if found is None:
            found = self._models[label] = ModelMetrics(label)
        return found

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Observation:
    """One request's timings and tokens, filled in by the handler as it goes."""

    __slots__ = ("_ttft_seen", "metrics", "outcome", "route", "start", "tokens")

    def __init__(self, metrics: ModelMetrics, route: str) -> None:
        self.metrics = metrics
        self.route = route
        self.start = time.perf_counter()
        self.tokens = 0
        self.outcome: str | None = None  # set where the ending says more than the exception
        self._ttft_seen = False

    def admitted(self) -> None:
        self.metrics.queue_seconds.observe(time.perf_counter() - self.start)

    def first_token(self) -> None:
        """The first streamed bytes went to the client (time to first token)."""
        if not self._ttft_seen:
            self._ttft_seen = True
            self.metrics.ttft_seconds.observe(time.perf_counter() - self.start)

    def finished(self, exc: BaseException | None) -> None:
        """The request ended, with `exc` or (None) without."""
        metrics = self.metrics
        metrics.count(self.route, self.outcome or outcome_of(exc))
        metrics.request_seconds.observe(time.perf_counter() - self.start)
        metrics.generated_tokens += self.tokens


def outcome_of(exc: BaseException | None) -> str:
    """The `outcome` label of a request that ended with `exc` (None: it went well)."""
    if exc is None:
        return "ok"
    if isinstance(exc, GatewayError):
        return exc.type
    if isinstance(exc, asyncio.CancelledError):
        return "client_gone"
    return "error"
