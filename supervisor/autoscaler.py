"""Replica autoscaling, carried out: snapshots for autoscale_policy, its decisions applied.

Run by the elastic loop (elastic.py) after its own decisions, every gateway report. A replica
added queues for placement like any other; one removed is the one that costs least to lose (not
yet serving, else the least busy as the gateway reports it), drained and stopped.
"""

from __future__ import annotations

import time

from supervisor.autoscale_policy import (
    ScaleDecision,
    ScaleMemory,
    ScaleSettings,
    ScaleView,
    Waiting,
    decide_scale,
)  # fmt: skip
from supervisor.demand import DemandBoard
from supervisor.events import EventKind, EventLog
from supervisor.models import ModelEntry
from supervisor.placement import DeviceView
from supervisor.registry import Registry
from supervisor.replica import Replica
from supervisor.states import ModelPhase, ReplicaState

_COMING_UP = frozenset({ReplicaState.PENDING, ReplicaState.STARTING, ReplicaState.RESTARTING})


class Autoscaler:
    def __init__(
        self,
        registry: Registry,
        demand: DemandBoard,
        events: EventLog,
        settings: ScaleSettings,
        drain_timeout: float,
    ) -> None:
        self._registry = registry
        self._demand = demand
        self._events = events
        self.settings = settings
        self._drain_timeout = drain_timeout
        self._memory: dict[str, ScaleMemory] = {}

    def step(self, entries: list[ModelEntry], devices: list[DeviceView],
             waiting: list[Waiting]) -> ScaleDecision:  # fmt: skip
        """Scale the active models with a replica range; nothing without a fresh report."""
        if self._demand.report is None:
            return ScaleDecision()
        scaled = {e.spec.name: e for e in entries
                  if e.phase is ModelPhase.ACTIVE and e.spec.autoscale is not None}  # fmt: skip
        views = [self.view(e) for e in scaled.values()]
        decision = decide_scale(views, devices, waiting, self._memory, time.time(),
                                self.settings)  # fmt: skip
        self._memory = decision.memory
        for scale in decision.scales:
            entry = scaled[scale.model]
            self._events.emit(EventKind.SCALED, scale.model, scale.reason, delta=scale.delta)
            if scale.delta > 0:
                self._registry.add_replica(entry)
            else:
                self._registry.retire_replica(entry, self._least_needed(entry),
                                              self._drain_timeout)  # fmt: skip
        return decision

    def view(self, entry: ModelEntry) -> ScaleView:
        autoscale = entry.spec.autoscale
        assert autoscale is not None
        live = [r for r in entry.replicas if not r.done and r.state is not ReplicaState.DRAINING]
        demand = self._demand.model(entry.spec.name)
        return ScaleView(
            name=entry.spec.name, replicas=len(live), min=autoscale.min, max=autoscale.max,
            target=autoscale.target_queue_per_replica, slots=entry.spec.max_num_seqs,
            queued=demand.queued if demand else 0, in_flight=demand.in_flight if demand else 0,
            coming_up=any(r.state in _COMING_UP for r in live), priority=entry.spec.priority,
            need=entry.sized.per_device, tensor_parallel=entry.spec.tensor_parallel,
        )  # fmt: skip

    def _least_needed(self, entry: ModelEntry) -> Replica:
        live = [r for r in entry.replicas if not r.done and r.state is not ReplicaState.DRAINING]

        def cost(replica: Replica) -> tuple[int, int]:
            load = self._demand.replica(replica.id)
            serving = replica.state is ReplicaState.READY
            return (int(serving), load.in_flight if load else 0)

        return min(live, key=cost)
