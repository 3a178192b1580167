"""The gateway's Prometheus metrics, in a registry owned by the app (no module globals).

Per model: requests by route and outcome, queue depth and in-flight (read from admission at
scrape time), time in queue, time to first token (streams), end-to-end latency, generated tokens.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.admission import Admission
from gateway.errors import GatewayError
from gateway.routes import RouteWatcher

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


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


class GatewayMetrics:
    def __init__(self, watcher: RouteWatcher, admission: Admission) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "sem_gateway_requests", "Requests by model, route and outcome",
            ["model", "route", "outcome"], registry=self.registry,
        )  # fmt: skip
        self.queue_seconds = Histogram(
            "sem_gateway_queue_seconds", "Time from arrival to a slot", ["model"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.ttft_seconds = Histogram(
            "sem_gateway_time_to_first_token_seconds", "Arrival to the first streamed chunk",
            ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.request_seconds = Histogram(
            "sem_gateway_request_seconds", "Arrival to the last byte", ["model"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.generated_tokens = Counter(
            "sem_gateway_generated_tokens", "Completion tokens (usage; streams: one per chunk)",
            ["model"], registry=self.registry,
        )  # fmt: skip
        self.retries = Counter(
            "sem_gateway_retries", "Requests sent again after an engine failed them: `replay`"
            " (nothing had reached the client) or `resume` (a stream went on from where it broke)",
            ["model", "kind"], registry=self.registry,
        )  # fmt: skip
        self.registry.register(_AdmissionCollector(watcher, admission))
        self._models: dict[str, ModelMetrics] = {}

    def model(self, label: str) -> ModelMetrics:
        """The metrics of one model, their labelled children looked up once (`.labels()` costs
        more than the observation itself)."""
        found = self._models.get(label)
        if found is None:
            found = self._models[label] = ModelMetrics(self, label)
        return found

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ModelMetrics:
    """One model's labelled metric children."""

    def __init__(self, metrics: GatewayMetrics, label: str) -> None:
        self._requests = metrics.requests
        self.label = label
        self.queue_seconds = metrics.queue_seconds.labels(label)
        self.ttft_seconds = metrics.ttft_seconds.labels(label)
        self.request_seconds = metrics.request_seconds.labels(label)
        self.generated_tokens = metrics.generated_tokens.labels(label)
        self.replays = metrics.retries.labels(label, "replay")
        self.resumes = metrics.retries.labels(label, "resume")
        self._outcomes: dict[tuple[str, str], Counter] = {}

    def requests(self, route: str, outcome: str) -> Counter:
        key = (route, outcome)
        found = self._outcomes.get(key)
        if found is None:
            found = self._outcomes[key] = self._requests.labels(self.label, route, outcome)
        return found


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
        metrics.requests(self.route, self.outcome or outcome_of(exc)).inc()
        metrics.request_seconds.observe(time.perf_counter() - self.start)
        if self.tokens:
            metrics.generated_tokens.inc(self.tokens)


def outcome_of(exc: BaseException | None) -> str:
    """The `outcome` label of a request that ended with `exc` (None: it went well)."""
    if exc is None:
        return "ok"
    if isinstance(exc, GatewayError):
        return exc.type
    if isinstance(exc, asyncio.CancelledError):
        return "client_gone"
    return "error"
