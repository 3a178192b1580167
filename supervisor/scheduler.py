"""The scheduler: places pending replicas on devices when memory allows, and says why the rest wait.

Replicas start `pending`; a planning round (placement.py decides) places what fits now. The
scheduler re-plans every `recheck_interval`, every `pending_recheck` while a replica waits for
memory (another process may free some: nothing but a new measurement tells), and at once when a
replica releases memory (stopped or failed) or finishes starting (a GPU's one-engine-starting
gate may have opened). Restarts pass the same gate (start_gate.py), which it owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from supervisor.events import EventKind, EventLog
from supervisor.models import ModelEntry
from supervisor.placement import Request, plan
from supervisor.replica import Replica
from supervisor.reservations import device_views
from supervisor.resources import Device, Inventory
from supervisor.start_gate import GateSettings, StartGate
from supervisor.states import ReplicaState

log = logging.getLogger("sem.scheduler")

Models = Callable[[], Iterable[ModelEntry]]


@dataclass(frozen=True)
class SchedulerSettings:
    recheck_interval: float = 10.0
    release_triggers: bool = True  # re-plan at once on a release (off: periodic re-check only)
    starvation_guard: float = 60.0
    # While a replica waits for memory, re-measure this often: nothing tells sem when another
    # process frees GPU memory, and NVML's figures cost microseconds to read.
    pending_recheck: float = 1.0
    gate: GateSettings = field(default_factory=GateSettings)


class Scheduler:
    """Owns the planning rounds and the inventory as last measured."""

    def __init__(self, inventory: Inventory, events: EventLog, settings: SchedulerSettings) -> None:
        self._inventory = inventory
        self._events = events
        self._settings = settings
        self.devices: list[Device] = inventory.devices()
        self.gate = StartGate(self.measure, events, settings.gate)  # restarts, one per GPU
        self._replan = asyncio.Event()
        self._waiting = False  # some replica waited for memory in the last round
        self._stopping = False  # shutting down: nothing more is placed
        self._task: asyncio.Task[None] | None = None

    async def measure(self) -> list[Device]:
        """The devices as they are now (free memory measured)."""
        self.devices = await asyncio.to_thread(self._inventory.devices)
        return self.devices

    def replan(self) -> None:
        """Plan again at once (something may fit now)."""
        self._replan.set()

    def note_change(self, replica: Replica) -> None:
        """React to a replica's transition: a release, or an engine that finished starting."""
        self.gate.note_change(replica)
        if replica.state in (ReplicaState.STOPPED, ReplicaState.FAILED) and replica.placement:
            reserved = replica.placement.reserved()
            self._events.emit(
                EventKind.RELEASED, replica.id,
                f"released {'+'.join(f'{b / 2**30:.2f}' for b in reserved.values())} GiB on"
                f" {'+'.join(reserved)}",
            )  # fmt: skip
            if self._settings.release_triggers:
                self.replan()
        elif replica.state in (ReplicaState.READY, ReplicaState.RESTARTING):
            self.replan()  # a GPU's one-engine-starting gate may have opened

    def start(self, models: Models, publish: Callable[[], None]) -> None:
        """Run planning rounds over `models` until `stop`; `publish` after a wait reason
        changes."""
        self._task = asyncio.create_task(self._loop(models, publish), name="scheduler")

    async def stop(self) -> None:
        """Place nothing more; return once the running round (if any) is over."""
        self._stopping = True
        if self._task is not None:
            self.replan()
            await self._task

    async def _loop(self, models: Models, publish: Callable[[], None]) -> None:
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
        # arrives as the event fires, and the loop would never end.
        while not self._stopping:
            interval = self._settings.recheck_interval
            if self._waiting:
                interval = min(interval, self._settings.pending_recheck)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._replan.wait()
            self._replan.clear()
            if self._stopping:
                return
            try:
                if await self.schedule(models()):
                    publish()
            except Exception:
                log.exception("scheduling failed; retrying at the next re-check")

    async def schedule(self, models: Iterable[ModelEntry]) -> bool:
        """One planning round: place what fits now, say why the rest waits. True if the reason
        some replica waits changed (the route table shows it)."""
        entries = list(models)
        of = {r.id: e for e in entries for r in e.replicas}
        pending = [
            r for e in entries if not e.leaving
            for r in e.replicas if r.state is ReplicaState.PENDING and not r.started
        ]  # fmt: skip
        self._waiting = False
        if not pending:
            return False
        await self.measure()
        now = time.monotonic()
        requests = [
            Request(
                replica_id=r.id, need=of[r.id].sized.per_device,
                devices=of[r.id].spec.tensor_parallel, priority=of[r.id].spec.priority,
                seq=r.seq, waited=now - r.pending_since, group=of[r.id].spec.name,
                avoid_nodes=frozenset(
                    s.plan.node for s in of[r.id].replicas
                    if s.holds_reservation and s.plan is not None and s.plan.node
                ),
            )
            for r in pending
        ]  # fmt: skip
        replicas = [r for e in entries for r in e.replicas]
        views = device_views(self.devices, replicas, self.gate.into_start)
        decision = plan(requests, views, self._settings.starvation_guard)
        by_id = {r.id: r for r in pending}
        for placement in decision.placements:
            replica = by_id[placement.replica_id]
            self._events.emit(EventKind.PLACED, replica.id, placement.reason,
                              devices=list(placement.device_ids))  # fmt: skip
            self.gate.note_placed(replica)
            replica.start(placement)
        self._waiting = bool(decision.waits)
        changed = False
        for wait in decision.waits:
            if by_id[wait.replica_id].note_pending(wait.reason):
                self._events.emit(EventKind.PENDING, wait.replica_id, wait.reason)
                changed = True
        return changed
