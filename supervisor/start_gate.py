"""The start gate: one engine starting per GPU, restarts included.

vLLM measures free memory at its start and counts every byte that disappears while it loads and
profiles as its own (engine notes, "GPU memory protocol"): two engines starting together on one
GPU break each other. Placement starts one engine at a time on a GPU; this gate holds restarts
to the same rule. A restarting replica, its backoff over, waits here until

1. no other engine of sem's is starting on any of its GPUs (one placed, starting, or a restart
   let through before it: first come, first served), and
2. the inventory's free memory on each of its GPUs shows its dead engine's memory released: the
   reservation plus the start cost (context, NCCL) free, or vLLM's own start check would fail.
   The driver frees a dead process's memory shortly after its exit; this wait is bounded by
   `release_timeout`, after which the restart goes ahead (vLLM then says what it sees).

While a restart waits (from the end of its backoff until it starts), placement counts its GPUs
as starting (`into_start`), so a newly placed model does not overtake it. Each reason it waits
is an event (`restart_waits`) and the replica's reason.

The gate learns of transitions through `note_change` (every replica's) and `note_placed` (the
scheduler's placements); free memory is re-measured every `poll` seconds while a restart waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from supervisor.events import EventKind, EventLog
from supervisor.gpu_budget import start_cost
from supervisor.placement import gib2
from supervisor.replica import Replica
from supervisor.resources import Device
from supervisor.states import ReplicaState


@dataclass(frozen=True)
class GateSettings:
    poll: float = 0.25  # re-measure free memory this often while a restart waits
    release_timeout: float = 30.0  # wait at most this long for a dead engine's memory


class StartGate:
    def __init__(
        self,
        measure: Callable[[], Awaitable[list[Device]]],
        events: EventLog,
        settings: GateSettings,
    ) -> None:
        self._measure = measure
        self._events = events
        self._settings = settings
        self._starting: dict[str, Replica] = {}  # placed or starting, or a restart let through
        self._waiting: dict[str, Replica] = {}  # restarts waiting for their turn, in order
        self._changed = asyncio.Event()

    @property
    def into_start(self) -> set[str]:
        """Replicas whose restart waits for its turn or was let through: their GPUs count as
        starting for placement."""
        return set(self._waiting) | {
            r.id for r in self._starting.values() if r.state is ReplicaState.RESTARTING
        }

    def note_placed(self, replica: Replica) -> None:
        """The scheduler placed `replica`: it starts on its GPUs next."""
        self._starting[replica.id] = replica

    def note_change(self, replica: Replica) -> None:
        """Every replica transition: who is starting now, and wake the waiting restarts."""
        if replica.state is ReplicaState.STARTING:
            self._starting[replica.id] = replica
        else:
            self._starting.pop(replica.id, None)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_turn(self, replica: Replica) -> None:
        """Until `replica` may start its engine again (see the module docstring)."""
        gpus = await self._gpus_of(replica)
        if not gpus:
            return
        self._waiting[replica.id] = replica
        began, said = time.monotonic(), ""
        try:
            while True:
                devices = {d.id: d for d in await self._measure()}
                why = self._turn_taken(replica, gpus)
                if why is None:
                    why = self._memory_held(replica, [devices[g] for g in gpus if g in devices])
                    waited = time.monotonic() - began
                    if why is not None and waited >= self._settings.release_timeout:
                        self._say(replica, f"{why} after {waited:.0f}s; starting anyway")
                        why = None
                if why is None:
                    self._starting[replica.id] = replica
                    return
                if why != said:
                    said = why
                    self._say(replica, why)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._settings.poll):
                        await self._changed.wait()
        finally:
            self._waiting.pop(replica.id, None)

    async def _gpus_of(self, replica: Replica) -> list[str]:
        if replica.placement is None:
            return []
        kinds = {d.id: d.kind for d in await self._measure()}
        return [i for i in replica.placement.device_ids if kinds.get(i) == "gpu"]

    def _turn_taken(self, replica: Replica, gpus: list[str]) -> str | None:
        """Another engine starting on one of its GPUs, or a restart waiting there before it."""
        starting = [r for r in self._starting.values() if r is not replica]
        earlier = itertools.takewhile(lambda r: r is not replica, self._waiting.values())
        for other in [*starting, *earlier]:
            shared = [g for g in gpus if other.placement and g in other.placement.device_ids]
            if shared:
                return f"waits for its turn: {other.id} is starting on GPU{shared[0]}"
        return None

    @staticmethod
    def _memory_held(replica: Replica, devices: list[Device]) -> str | None:
        """A GPU whose free memory does not yet cover the replica's start."""
        assert replica.placement is not None
        reserved = replica.placement.reserved()
        cost = start_cost(len(replica.placement.device_ids))
        for device in devices:
            need = reserved[device.id] + cost
            if device.free < need:
                return (
                    f"waits for {device.label} to release the dead engine's memory"
                    f" ({gib2(device.free)} free, {gib2(need)} needed)"
                )
        return None

    def _say(self, replica: Replica, why: str) -> None:
        replica.note_wait(why)
        self._events.emit(EventKind.RESTART_WAITS, replica.id, why)
