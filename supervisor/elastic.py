"""Elastic models: load on demand, unload when idle, evict to make room (policy: elastic_policy),
and autoscale replicas (autoscaler.py).

The controller wakes at every gateway report (about once a second, and at once when a request
finds no ready replica), snapshots the models and the devices, asks `elastic_policy.decide` what
to do (the bound on a request's wait is the gateway's own --queue-timeout, from its report), and
does it through the registry: `load` (the model's replicas queue for placement) and
`unload` (they drain and stop; each stop releases memory and wakes the scheduler). Every
decision is an event with its reason.

It also measures each model's load time (an engine it spawned, from starting to ready) and keeps
it in sem.db's `meta` table (key `load_seconds/<model>`): the swap cost the policy weighs, and
what the route table tells the gateway so a request that cannot be served within its bound gets
an honest Retry-After at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import replace

from supervisor.autoscaler import Autoscaler
from supervisor.config import LoadMode
from supervisor.demand import DemandBoard
from supervisor.elastic_policy import (
    Decision,
    ElasticSettings,
    ModelView,
    UnloadWhy,
    decide,
    waiting_for_memory,
)  # fmt: skip
from supervisor.events import EventKind, EventLog
from supervisor.models import ModelEntry
from supervisor.registry import Registry
from supervisor.replica import Replica
from supervisor.reservations import device_views
from supervisor.scheduler import Scheduler
from supervisor.states import ModelPhase, ReplicaState
from supervisor.store import Store

log = logging.getLogger("sem.elastic")

ADOPTED = "re-adopted"  # the placement reason of an engine taken over at start (restore.py)
_META_KEY = "load_seconds/"
ASSUMED_LOAD_SECONDS = 30.0  # a model's swap cost before its first measured load


class Elastic:
    """Owns the elastic loop and the load-time measurements."""

    def __init__(
        self,
        registry: Registry,
        scheduler: Scheduler,
        demand: DemandBoard,
        events: EventLog,
        store: Store,
        settings: ElasticSettings,
        drain_timeout: float = 30.0,
    ) -> None:
        self._registry = registry
        self._scheduler = scheduler
        self._demand = demand
        self._events = events
        self._store = store
        self.settings = settings
        self._drain_timeout = drain_timeout
        self._starting: dict[str, float] = {}  # replica id -> time.monotonic() it spawned
        self._holding: set[tuple[str, str]] = set()  # (model, victim) of the last round's holds
        self._task: asyncio.Task[None] | None = None
        self.autoscaler = Autoscaler(registry, demand, events, settings.scale, drain_timeout)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="elastic")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # -- load-time measurement ---------------------------------------------------------------

    def note_replica(self, replica: Replica) -> None:
        """A replica changed state: time spawned engines from starting to ready."""
        if replica.state is ReplicaState.STARTING:
            adopted = replica.placement is not None and replica.placement.reason == ADOPTED
            if not adopted:
                self._starting[replica.id] = time.monotonic()
        elif replica.state is ReplicaState.READY:
            if (entry := self._registry.find(replica.model)) is not None:
                # Idle time and residency count from when it can serve: a request that waited
                # through a long load must not make the model look idle the moment it is ready.
                entry.loaded_at = max(entry.loaded_at, time.time())
            if (began := self._starting.pop(replica.id, None)) is not None:
                self._measured(replica.model, time.monotonic() - began)

    def _measured(self, model: str, seconds: float) -> None:
        entry = self._registry.find(model)
        if entry is None:
            return
        entry.load_seconds = seconds
        self._store.set_meta(_META_KEY + model, f"{seconds:.3f}")
        self._events.emit(EventKind.LOAD_MEASURED, model, f"loaded in {seconds:.1f}s",
                          seconds=seconds)  # fmt: skip

    def _recall(self, entry: ModelEntry) -> bool:
        """The model's load time as sem.db remembers it, if not measured in this run; True if
        one was found."""
        if entry.load_seconds is not None:
            return False
        stored = self._store.get_meta(_META_KEY + entry.spec.name)
        if stored is None:
            return False
        entry.load_seconds = float(stored)
        return True

    # -- the loop ----------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            await self._demand.wait_change(1.0)
            try:
                self.step()
            except Exception:
                log.exception("elastic step failed; retrying at the next report")

    def step(self) -> Decision:
        """One round: snapshot, decide, act. Returns what was decided (for tests)."""
        entries = [e for e in self._registry.entries() if e.phase in _ELASTIC_PHASES]
        if any([self._recall(e) for e in entries]):
            self._registry.publish()
        views = [self.view(e) for e in entries]
        devices = device_views(self._scheduler.devices, self._registry.replicas())
        report = self._demand.report
        settings = self.settings
        if report is not None and report.queue_timeout is not None:
            settings = replace(settings, wait_bound=report.queue_timeout)  # the gateway's own
        decision = decide(views, devices, time.time(), settings, demand_known=report is not None)
        by_name = {e.spec.name: e for e in entries}
        holding = {(h.model, h.victim) for h in decision.holds}
        for hold in decision.holds:
            if (hold.model, hold.victim) not in self._holding:  # once a hold, not every round
                self._events.emit(EventKind.SWAP_HELD, hold.victim, hold.reason,
                                  for_model=hold.model, seconds=round(hold.seconds, 1))  # fmt: skip
        self._holding = holding
        for unload in decision.unloads:
            if unload.why is UnloadWhy.EVICTED:
                self._events.emit(EventKind.EVICTING, unload.model, unload.reason,
                                  for_model=unload.for_model, freed=unload.freed)  # fmt: skip
            self._registry.unload(by_name[unload.model], unload.reason, self._drain_timeout)
        for load in decision.loads:
            self._registry.load(by_name[load.model], load.reason)
        self.autoscaler.step(entries, devices, waiting_for_memory(views))
        return decision

    def view(self, entry: ModelEntry) -> ModelView:
        """The policy's snapshot of one model."""
        demand = self._demand.model(entry.spec.name)
        now = time.monotonic()
        pending = [r for r in entry.replicas if r.state is ReplicaState.PENDING and not r.started]
        reserved: dict[str, int] = {}
        for r in entry.replicas:
            if r.holds_reservation and r.placement is not None:
                for device_id in r.placement.device_ids:
                    reserved[device_id] = reserved.get(device_id, 0) + r.placement.per_device
        return ModelView(
            name=entry.spec.name, loaded=entry.phase is ModelPhase.ACTIVE,
            need=entry.sized.per_device, tensor_parallel=entry.spec.tensor_parallel,
            priority=entry.spec.priority, evictable=entry.spec.may_evict,
            on_demand=entry.spec.load is LoadMode.ON_DEMAND,
            idle_unload=entry.spec.idle_seconds,
            queued=demand.queued if demand else 0, in_flight=demand.in_flight if demand else 0,
            last_used=max(demand.last_request if demand else 0.0, entry.loaded_at),
            loaded_at=entry.loaded_at,
            load_seconds=entry.load_seconds or ASSUMED_LOAD_SECONDS,
            waited=max((now - r.pending_since for r in pending), default=0.0),
            oldest_wait=demand.oldest_wait if demand else 0.0,
            pending=bool(pending), reserved=reserved,
        )  # fmt: skip


# Sized-up models that may be loaded, unloaded or evicted.
_ELASTIC_PHASES = frozenset({ModelPhase.ACTIVE, ModelPhase.UNLOADED})
