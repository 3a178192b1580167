"""The supervisor's Prometheus metrics, in a registry owned by this object (no module globals).

Two sources:
- State, read at scrape time (`render`): model and replica states (one gauge per state, 1 for
  the current one), time pending and a bounded `reason_kind` (the reason's text stays in the
  API: it holds numbers and would make a new series at every change), memory per device
  (total, measured free and used, reserved by sem and by which replica, used by which
  replica where NVML tells per process: gpu_usage.py), downloads, and the
  engines' own `vllm:` metrics with `model` and `replica` labels (engine_metrics.py).
- Counters derived from the event log, which this object follows: restarts and give-ups by
  cause, placement decisions by outcome. Nothing else in the supervisor updates a metric.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from supervisor.engine_metrics import EngineScraper, Rate, Relabelled, Scrape, Target, Throughput
from supervisor.events import Event, EventLog
from supervisor.gpu_usage import Attribution, ProcessMemory, attribute
from supervisor.manager import Manager
from supervisor.states import ModelState, ReplicaState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Cause(StrEnum):
    """Why a replica's engine went down (from the reason replica.py gives)."""

    EXITED = "exited"  # the engine process ended while ready
    EXITED_STARTING = "exited_starting"  # ... before it was ever healthy
    UNHEALTHY = "unhealthy"  # /health failed several times in a row
    START_TIMEOUT = "start_timeout"  # no /health 200 within the start timeout
    CANNOT_START = "cannot_start"  # the engine command could not even be run
    INTERNAL = "internal"  # a bug in the supervisor's lifecycle task
    OTHER = "other"


class PendingKind(StrEnum):
    """Why a replica waits for placement, in few words (placement.py's reasons)."""

    MEMORY = "memory"  # no device has the memory free
    ENGINE_STARTING = "engine_starting"  # room, but another engine is starting on that GPU
    QUEUED = "queued"  # behind a replica that waited too long (no overtaking)
    NO_DEVICES = "no_devices"
    NOT_PLANNED = "not_planned"  # not looked at by the scheduler yet


_CAUSES = (
    ("engine exited with code", "while starting", Cause.EXITED_STARTING),
    ("engine exited with code", "", Cause.EXITED),
    ("/health failed", "", Cause.UNHEALTHY),
    ("no /health 200 within", "", Cause.START_TIMEOUT),
    ("cannot start engine", "", Cause.CANNOT_START),
    ("internal error", "", Cause.INTERNAL),
)
_PENDING = (
    ("another engine is starting", PendingKind.ENGINE_STARTING),
    ("queued behind", PendingKind.QUEUED),
    ("no devices", PendingKind.NO_DEVICES),
    ("largest free is", PendingKind.MEMORY),
    ("have that free", PendingKind.MEMORY),
)


def cause_of(reason: str) -> Cause:
    for start, contains, cause in _CAUSES:
        if reason.startswith(start) and contains in reason:
            return cause
    return Cause.OTHER


def pending_kind(reason: str) -> PendingKind:
    for text, kind in _PENDING:
        if text in reason:
            return kind
    return PendingKind.NOT_PLANNED


def model_of(replica_id: str) -> str:
    """`<model>-<n>` -> `<model>` (replica ids are made that way, manager.py)."""
    return replica_id.rpartition("-")[0] or replica_id


@dataclass
class Snapshot:
    """What one scrape reads: devices measured now, and the engines' metrics."""

    devices: list[dict[str, Any]]
    engines: Scrape
    used: Attribution | None  # GPU memory per replica, where measured per process


# Elastic events (elastic.py, autoscaler.py) -> the `action` label they count under.
_ELASTIC_ACTIONS = {"model_loading": "load", "model_unloaded": "unload", "evicting": "evict",
                    "scaled": "scale"}  # fmt: skip


class SupervisorMetrics:
    """Owns the registry, the event-follower task and the engine scraper (`start`/`aclose`).
    `processes`: per-process GPU memory (NVML), if there are GPUs."""

    def __init__(
        self,
        manager: Manager,
        events: EventLog,
        scraper: EngineScraper,
        processes: ProcessMemory | None = None,
    ) -> None:
        self._manager = manager
        self._events = events
        self._scraper = scraper
        self._processes = processes
        self.throughput = Throughput()
        self.registry = CollectorRegistry(auto_describe=True)
        self.restarts = Counter(
            "sem_supervisor_restarts", "Engine restarts by model and cause",
            ["model", "cause"], registry=self.registry,
        )  # fmt: skip
        self.give_ups = Counter(
            "sem_supervisor_replica_failures", "Replicas given up (state failed) by cause",
            ["model", "cause"], registry=self.registry,
        )  # fmt: skip
        self.placements = Counter(
            "sem_supervisor_placement_decisions", "Placement decisions by outcome: `placed`, or"
            " `pending` (counted when a replica starts waiting or its reason changes)",
            ["model", "outcome"], registry=self.registry,
        )  # fmt: skip
        self.scrape_errors = Counter(
            "sem_supervisor_engine_scrape_errors", "Engine /metrics scrapes that failed",
            ["model", "replica"], registry=self.registry,
        )  # fmt: skip
        self.elastic = Counter(
            "sem_supervisor_elastic_decisions", "Elastic decisions by action: `load` (on demand),"
            " `unload` (idle or evicted), `evict`, `scale_up`, `scale_down`",
            ["model", "action"], registry=self.registry,
        )  # fmt: skip
        self._follower: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Follow the event log from now on."""
        self._follower = asyncio.create_task(self._follow(), name="metrics-events")
        await asyncio.sleep(0)  # let it subscribe before anything else emits

    async def aclose(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
        await self._scraper.aclose()

    async def _follow(self) -> None:
        async for event in self._events.follow():
            self.count(event)

    def count(self, event: Event) -> None:
        """Update the event-derived counters with one event."""
        if event.kind == "placed":
            self.placements.labels(model_of(event.subject), "placed").inc()
        elif event.kind == "pending":
            self.placements.labels(model_of(event.subject), "pending").inc()
        elif (action := _ELASTIC_ACTIONS.get(event.kind)) is not None:
            if event.kind == "scaled":
                action = "scale_up" if event.data.get("delta", 0) > 0 else "scale_down"
            self.elastic.labels(event.subject, action).inc()
        elif event.kind == "transition":
            model, reason = event.data.get("model", ""), str(event.data.get("reason", ""))
            if event.data.get("new") == ReplicaState.RESTARTING:
                self.restarts.labels(model, cause_of(reason)).inc()
            elif event.data.get("new") == ReplicaState.FAILED:
                self.give_ups.labels(model, cause_of(reason)).inc()

    def targets(self) -> list[Target]:
        """The ready replicas, whose engines answer /metrics."""
        return [
            Target(entry.spec.name, r.id, r.url)
            for entry in self._manager.entries()
            for r in entry.replicas
            if r.state is ReplicaState.READY and r.url is not None
        ]

    async def scrape_engines(self) -> Scrape:
        """Scrape every ready engine once; failures counted, rates updated."""
        scrape = await self._scraper.scrape(self.targets())
        for target in scrape.failed:
            self.scrape_errors.labels(target.model, target.replica).inc()
        self.throughput.observe(scrape)
        return scrape

    async def rates(self) -> dict[str, Rate]:
        """Per-model request and token rates, after a fresh scrape of the engines."""
        await self.scrape_engines()
        return self.throughput.rates()

    async def gpu_usage(self) -> Attribution | None:
        """GPU memory used per replica (and by others), measured now; None without NVML."""
        processes = self._processes
        if processes is None:
            return None
        groups = {
            r.process.pgid: r.id
            for entry in self._manager.entries()
            for r in entry.replicas
            if r.process is not None
        }
        return await asyncio.to_thread(lambda: attribute(processes.usage(), groups))

    async def render(self) -> bytes:
        """The exposition text of everything, read now."""
        devices, engines, used = await asyncio.gather(
            self._manager.resources(), self.scrape_engines(), self.gpu_usage()
        )
        now = CollectorRegistry(auto_describe=False)  # this scrape's state only
        now.register(_StateCollector(self._manager, Snapshot(devices, engines, used)))
        now.register(Relabelled(engines))
        return generate_latest(self.registry) + generate_latest(now)


class _StateCollector(Collector):
    def __init__(self, manager: Manager, snapshot: Snapshot) -> None:
        self._manager = manager
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        yield from self._models()
        yield from _devices(self._snapshot.devices)
        if self._snapshot.used is not None:
            yield from _used(self._snapshot.used)
        yield from self._downloads()
        up = GaugeMetricFamily(
            "sem_supervisor_engine_scrape_up",
            "1 if the engine's /metrics answered this scrape", labels=["model", "replica"],
        )  # fmt: skip
        for target in self._snapshot.engines.families:
            up.add_metric([target.model, target.replica], 1)
        for target in self._snapshot.engines.failed:
            up.add_metric([target.model, target.replica], 0)
        yield up

    def _models(self) -> Iterator[Metric]:
        models = GaugeMetricFamily(
            "sem_supervisor_model_state", "1 for the model's current state, else 0",
            labels=["model", "state"],
        )  # fmt: skip
        replicas = GaugeMetricFamily(
            "sem_supervisor_replica_state", "1 for the replica's current state, else 0",
            labels=["model", "replica", "state"],
        )  # fmt: skip
        restarts = GaugeMetricFamily(
            "sem_supervisor_replica_restarts", "Restarts of this replica so far",
            labels=["model", "replica"],
        )  # fmt: skip
        pending = GaugeMetricFamily(
            "sem_supervisor_replica_pending_seconds",
            "How long a pending replica has waited for placement", labels=["model", "replica"],
        )  # fmt: skip
        why = GaugeMetricFamily(
            "sem_supervisor_replica_pending_reason",
            "1 with why a pending replica waits, in few words (the full reason: GET /models)",
            labels=["model", "replica", "reason_kind"],
        )  # fmt: skip
        now = time.monotonic()
        for entry in self._manager.entries():
            name = entry.spec.name
            for state in ModelState:
                models.add_metric([name, state.value], float(entry.state is state))
            for r in entry.replicas:
                for rstate in ReplicaState:
                    replicas.add_metric([name, r.id, rstate.value], float(r.state is rstate))
                restarts.add_metric([name, r.id], r.restarts)
                if r.state is ReplicaState.PENDING and not r.started:
                    pending.add_metric([name, r.id], now - r.pending_since)
                    why.add_metric([name, r.id, pending_kind(r.reason)], 1)
        yield from (models, replicas, restarts, pending, why)

    def _downloads(self) -> Iterator[Metric]:
        done = GaugeMetricFamily(
            "sem_supervisor_download_done_bytes", "Bytes cached so far, per source downloading",
            labels=["source"],
        )  # fmt: skip
        total = GaugeMetricFamily(
            "sem_supervisor_download_total_bytes", "Bytes to cache in all, per source downloading",
            labels=["source"],
        )  # fmt: skip
        cache = self._manager.cache
        running = [j for j in cache.jobs() if j.running] if cache is not None else []
        for job in running:
            done.add_metric([job.key], job.progress.done)
            total.add_metric([job.key], job.progress.total)
        yield done
        yield total
        yield GaugeMetricFamily(
            "sem_supervisor_downloads_active", "Download jobs running", value=len(running)
        )


def _devices(devices: list[dict[str, Any]]) -> Iterator[Metric]:
    """Memory per device, as GET /resources reports it (measured at this scrape)."""
    labels = ["device", "kind", "name"]
    families = {
        key: GaugeMetricFamily(f"sem_supervisor_device_{key}_bytes", doc, labels=labels)
        for key, doc in (
            ("total", "Device memory in all"),
            ("free", "Free device memory, as measured (NVML; the CPU: available memory)"),
            ("used", "Used device memory, as measured (by anyone: total - free)"),
            ("reserved", "Device memory sem reserved for its replicas"),
        )
    }
    by_replica = GaugeMetricFamily(
        "sem_supervisor_device_reserved_by_replica_bytes",
        "Device memory reserved for one replica", labels=["device", "model", "replica"],
    )  # fmt: skip
    for device in devices:
        values = [device["id"], device["kind"], device["name"]]
        used = device["total"] - device["free"]
        for key, value in (("total", device["total"]), ("free", device["free"]),
                           ("used", used), ("reserved", device["reserved"])):  # fmt: skip
            families[key].add_metric(values, value)
        for holder in device["replicas"]:
            replica = holder["replica"]
            by_replica.add_metric([device["id"], model_of(replica), replica], holder["reserved"])
    yield from families.values()
    yield by_replica


def _used(used: Attribution) -> Iterator[Metric]:
    """GPU memory used, process by process (NVML), summed per replica and for the rest."""
    by_replica = GaugeMetricFamily(
        "sem_supervisor_device_used_by_replica_bytes",
        "GPU memory the processes of one replica's engine use (measured)",
        labels=["device", "model", "replica"],
    )  # fmt: skip
    for (device, replica), value in sorted(used.by_replica.items()):
        by_replica.add_metric([device, model_of(replica), replica], value)
    others = GaugeMetricFamily(
        "sem_supervisor_device_used_by_others_bytes",
        "GPU memory used by processes of no sem replica (measured)", labels=["device"],
    )  # fmt: skip
    for device, value in sorted(used.others.items()):
        others.add_metric([device], value)
    yield by_replica
    yield others
