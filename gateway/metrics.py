"""The gateway's Prometheus metrics, in a registry owned by the app (no module globals).

Per model: requests by route and outcome, queue depth and in-flight (read from admission at
scrape time), time in queue, time to first token (streams), end-to-end latency, generated tokens.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

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
        self.registry.register(_AdmissionCollector(watcher, admission))

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class Observation:
    """One request's timings, filled in by the handler as it goes."""

    metrics: GatewayMetrics
    model: str
    start: float = field(default_factory=time.perf_counter)
    tokens: int = 0
    _first_token_seen: bool = False

    def admitted(self) -> None:
        self.metrics.queue_seconds.labels(self.model).observe(time.perf_counter() - self.start)

    def chunk(self) -> None:
        """A streamed chunk went to the client (vLLM sends one token per chunk)."""
        self.tokens += 1
        if not self._first_token_seen:
            self._first_token_seen = True
            elapsed = time.perf_counter() - self.start
            self.metrics.ttft_seconds.labels(self.model).observe(elapsed)


@asynccontextmanager
async def observe(
    metrics: GatewayMetrics, watcher: RouteWatcher, model: str, route: str
) -> AsyncIterator[Observation]:
    """Count the request by outcome and time it; unknown model names share one label."""
    label = model if model in watcher.table.models else "(unknown)"
    obs = Observation(metrics, label)
    outcome = "ok"
    try:
        yield obs
    except GatewayError as exc:
        outcome = exc.type
        raise
    except asyncio.CancelledError:
        outcome = "client_gone"
        raise
    finally:
        metrics.requests.labels(label, route, outcome).inc()
        metrics.request_seconds.labels(label).observe(time.perf_counter() - obs.start)
        if obs.tokens:
            metrics.generated_tokens.labels(label).inc(obs.tokens)
