"""One model sem runs: its spec, its own phase, its replicas, and what the API shows of it.

A model's phase changes only through `ModelEntry.transition`, which checks the table in
states.py and records the event that says so (`model_added`, `model_removing`, ...). The state
it shows is its phase, or while it is active its best replica's.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from supervisor.cache_job import Job
from supervisor.config import ModelSpec
from supervisor.estimate import MemoryEstimate
from supervisor.events import EventKind, EventLog
from supervisor.replica import Replica
from supervisor.states import LEAVING_PHASES, ModelPhase, ModelState, can_enter, shown_state
from supervisor.store import Origin

# The event that records a model entering each phase.
_ENTERED: dict[ModelPhase, EventKind] = {
    ModelPhase.DOWNLOADING: EventKind.MODEL_DOWNLOADING,
    ModelPhase.ACTIVE: EventKind.MODEL_ADDED,
    ModelPhase.FAILED: EventKind.MODEL_FAILED,
    ModelPhase.UNLOADED: EventKind.MODEL_UNLOADED,
    ModelPhase.DRAINING: EventKind.MODEL_REMOVING,
    ModelPhase.REMOVED: EventKind.MODEL_REMOVED,
}


@dataclass
class ModelEntry:
    spec: ModelSpec
    model_ref: str  # what the engine's --model gets: a local folder
    estimate: MemoryEstimate | None  # None while its files are being cached
    events: EventLog = field(repr=False)
    origin: Origin = "api"  # models.yaml or a runtime add
    replicas: list[Replica] = field(default_factory=list)
    phase: ModelPhase = ModelPhase.NEW  # set by `transition` only
    rollout: asyncio.Task[None] | None = None  # replacing replicas after a spec change
    download: Job | None = None  # caching its hf:// source first (phase `downloading`)
    failure: str = ""  # why it could not be cached or sized (phase `failed`)
    # Unix time it last became active or a replica of it ready (residency and idle count from it).
    loaded_at: float = 0.0
    load_seconds: float | None = None  # measured start-to-ready time of its engines (elastic.py)
    unloaded_why: str = ""  # why it is unloaded (phase `unloaded`)
    rollout_failure: str = ""  # why its last new spec was not applied (it runs the old one)

    def transition(self, new: ModelPhase, reason: str) -> None:
        """Enter phase `new` (if the table allows it) and record the event that says why."""
        if not can_enter(self.phase, new):
            raise RuntimeError(f"{self.spec.name}: illegal transition {self.phase} -> {new}")
        old, self.phase = self.phase, new
        if new is ModelPhase.FAILED:
            self.failure = reason
        if new is ModelPhase.ACTIVE:
            self.loaded_at = time.time()
        if new is ModelPhase.UNLOADED:
            self.unloaded_why = reason
        kind = _ENTERED[new]
        if old is ModelPhase.UNLOADED and new is ModelPhase.ACTIVE:
            kind = EventKind.MODEL_LOADING
        self.events.emit(kind, self.spec.name, reason, old=old.value, new=new.value)

    @property
    def leaving(self) -> bool:
        """Removed: draining or gone. A reload that lists it again makes a new model."""
        return self.phase in LEAVING_PHASES

    def free_replica_id(self) -> str:
        """The first `<name>-<n>` no current replica has: a rollout's new replica runs beside
        the one it replaces, so ids are not positions."""
        taken = {r.id for r in self.replicas}
        return next(i for n in itertools.count() if (i := f"{self.spec.name}-{n}") not in taken)

    @property
    def state(self) -> ModelState:
        return shown_state(self.phase, [r.state for r in self.replicas])

    @property
    def sized(self) -> MemoryEstimate:
        assert self.estimate is not None, "replicas exist only once the model is sized up"
        return self.estimate

    @property
    def reason(self) -> str:
        if self.failure:  # kept while a failed model is removed
            return self.failure
        if self.rollout_failure and not self.leaving:
            return self.rollout_failure
        if self.download is not None:
            return self.download.describe()
        if self.phase is ModelPhase.UNLOADED:
            return self.unloaded_why
        # The reason of the replica that decides the aggregate state says most.
        state = self.state
        for replica in self.replicas:
            if replica.state.value == state.value:
                return replica.reason
        return "removing" if self.leaving else ""

    def snapshot(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "state": self.state.value,
            "reason": self.reason,
            "spec": self.spec.model_dump(),
            "origin": self.origin,
            "estimate": self.estimate.to_json() if self.estimate else None,
            "memory": self.estimate.memory_json() if self.estimate else None,
            "download": self.download.to_json() if self.download else None,
            "replicas": [r.snapshot() for r in self.replicas],
        }
