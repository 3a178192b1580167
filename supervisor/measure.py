"""Self-correcting estimates: what a replica's engine really needs, measured, kept, and reused.

What is measured, and why (docs/gpu-accounting.md, "Measured estimates"):
- On a GPU, vLLM fills exactly its budget (utilization x total): the KV cache takes whatever
  the weights, the activation peak and the non-torch buffers leave. NVML's figure for the
  engine's processes is therefore budget + what lies outside it (CUDA context, NCCL), whatever
  the model: replacing the estimate with it would only feed the budget back to itself. What
  varies by model is the part *inside* the budget that is not KV cache. vLLM logs the KV memory
  it found ("Available KV cache memory: X GiB"), so non-KV = budget - X, and the need that
  gives the KV cache the spec intended is  non-KV x (1 + MARGIN) + intended KV.
  NVML is read too (summed over the engine's process group, gpu_usage.attribute): used - budget
  is what the engine holds outside its budget; above gpu_budget.start_cost it is reported, as
  placement does not count it.
- On the CPU, vLLM's KV cache is a fixed VLLM_CPU_KVCACHE_SPACE and every byte is in its
  processes: the need is the process group's USS x (1 + MARGIN). USS, not RSS: the API server,
  engine core and workers share libraries (torch alone is hundreds of MiB), and summed RSS
  counts those once per process; USS counts what the group would give back if it exited.
  Pages count only once touched, and the KV cache is touched as it fills: a figure below the
  reservation proves nothing, so on the CPU a measurement only ever raises the need.
- An engine that failed at start for want of memory (start_failure.py) is measured from its
  log the same way when vLLM said how much KV memory it found (negative included); after
  CUDA's own out-of-memory the need is raised by RAISE; after vLLM's free-memory check the
  need stands (the GPU, not the need, was short: placement sees the new free memory).

MARGIN (3%): vLLM's profile run and CUDA-graph capture vary by a few tens of MiB between starts,
and the KV cache is rounded to whole blocks; 3% of the non-KV part covers that and keeps the
second placement well within 5% of what the engine uses. A spec's explicit `memory:` is the
operator's word and is never replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
from collections.abc import Callable
from dataclasses import replace

import psutil

from supervisor.config import ModelSpec
from supervisor.estimate import MemoryEstimate
from supervisor.events import EventKind, EventLog
from supervisor.gpu_budget import start_cost
from supervisor.gpu_usage import ProcessMemory, attribute
from supervisor.models import ModelEntry
from supervisor.replica import Replica
from supervisor.start_failure import FailureKind, StartFailure, kv_available, read_tail
from supervisor.states import ReplicaState
from supervisor.store import Measurement, Store, spec_digest
from supervisor.units import GiB

log = logging.getLogger("sem.measure")

MARGIN = 0.03
RAISE = 1.25  # CUDA out of memory while loading: the need was short by an unknown amount
SETTLE_SECONDS = 30.0  # KV cache, CUDA graphs and the first batches have settled by then


def gpu_need(budget: int, kv_available: int, intended_kv: int) -> int:
    """The per-GPU reservation that leaves vLLM `intended_kv` for its KV cache, from a start
    that found `kv_available` in a `budget` (pure)."""
    return math.ceil((budget - kv_available) * (1 + MARGIN)) + intended_kv


def cpu_need(used: int, reserved: int) -> int:
    """The CPU need after the group was seen holding `used` bytes on a `reserved` reservation:
    raised when it held more, never lowered (untouched KV pages are not counted yet)."""
    return max(reserved, math.ceil(used * (1 + MARGIN)))


def after_start_failure(failure: StartFailure, budget: int, intended_kv: int) -> int | None:
    """The need an engine that failed at start for want of memory shows; None: it stands."""
    if failure.kind is not FailureKind.OUT_OF_MEMORY:
        return None
    if failure.kv_available is not None:
        return gpu_need(budget, failure.kv_available, intended_kv)
    if "Free memory on device" in failure.line:
        return None
    return math.ceil(budget * RAISE)


def group_uss(pgid: int) -> int:
    """The memory a process group would give back on exit: USS summed (RSS where the kernel
    does not tell USS). Blocking: run in a worker thread."""
    total = 0
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(proc.pid) != pgid:
                continue
            try:
                total += int(proc.memory_full_info().uss)
            except psutil.AccessDenied:
                total += int(proc.memory_info().rss)
    return total


def measured_need(store: Store, spec: ModelSpec, on_gpu: bool) -> int | None:
    """The need an earlier engine of this exact spec was measured at; None if none was (or the
    spec's `memory:` decides)."""
    if spec.memory != "auto":
        return None
    found = store.measurement(spec.name, spec_digest(spec), "gpu" if on_gpu else "cpu")
    return None if found is None else found.need


class Measurer:
    """Measures each replica once ready and again after SETTLE_SECONDS, and corrects the need
    after an out-of-memory start; keeps the figure in the store and on the model's entry."""

    def __init__(
        self,
        store: Store,
        events: EventLog,
        gpu_memory: ProcessMemory | None,
        settle: float = SETTLE_SECONDS,
        group_memory: Callable[[int], int] = group_uss,
    ) -> None:
        self._store = store
        self._events = events
        self._gpu_memory = gpu_memory
        self._settle = settle
        self._group_memory = group_memory
        self._tasks: set[asyncio.Task[None]] = set()

    def note_change(self, entry: ModelEntry, replica: Replica) -> None:
        """React to a replica's transition (the registry calls this for every one)."""
        if entry.spec.memory != "auto" or entry.estimate is None:
            return
        if replica.state is ReplicaState.READY and replica.process is not None:
            task = asyncio.create_task(self._measure_ready(entry, replica),
                                       name=f"measure-{replica.id}")  # fmt: skip
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif replica.state is ReplicaState.PENDING and replica.start_failure is not None:
            self._after_failure(entry, replica, replica.start_failure)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _after_failure(self, entry: ModelEntry, replica: Replica, failure: StartFailure) -> None:
        placement, on_gpu = replica.placement, replica.plan is not None and replica.plan.gpu_ids
        if placement is None or not on_gpu:
            return
        intended = _intended_kv(entry.sized)
        need = after_start_failure(failure, placement.per_device, intended)
        if need is None:
            return
        self._keep(entry, replica, Measurement(
            entry.spec.name, replica.digest, "gpu", need, 0, placement.per_device,
            failure.kv_available, f"start failure: {failure.kind}",
        ))  # fmt: skip

    async def _measure_ready(self, entry: ModelEntry, replica: Replica) -> None:
        process = replica.process
        for source, delay in (("ready", 0.0), ("settled", self._settle)):
            await asyncio.sleep(delay)
            if replica.process is not process or replica.state is not ReplicaState.READY:
                return
            try:
                found = await asyncio.to_thread(self._measure, entry, replica, source)
            except Exception:  # a measurement is a bonus: never let it take a replica down
                log.exception("%s: measuring its engine failed", replica.id)
                return
            if found is not None:
                self._keep(entry, replica, found)

    def _measure(self, entry: ModelEntry, replica: Replica, source: str) -> Measurement | None:
        """Blocking (NVML, /proc, the log): run in a worker thread."""
        placement, plan, process = replica.placement, replica.plan, replica.process
        if placement is None or plan is None or process is None:
            return None
        name, budget = entry.spec.name, placement.per_device
        if not plan.gpu_ids:
            used = self._group_memory(process.pgid)
            need = cpu_need(used, budget)
            return Measurement(name, replica.digest, "cpu", need, used, budget, None, source)
        if self._gpu_memory is None:
            return None
        usage = attribute(self._gpu_memory.usage(), {process.pgid: replica.id})
        used = max((usage.by_replica.get((d, replica.id), 0) for d in placement.device_ids),
                   default=0)  # fmt: skip
        kv = kv_available(read_tail(plan.log_path), plan.tensor_parallel)
        if kv is None:  # not vLLM's log (a stand-in engine): nothing says what is not KV
            return None
        need = gpu_need(budget, kv, _intended_kv(entry.sized))
        return Measurement(name, replica.digest, "gpu", need, used, budget, kv, source)

    def _keep(self, entry: ModelEntry, replica: Replica, found: Measurement) -> None:
        self._store.put_measurement(found)
        tp = entry.spec.tensor_parallel
        if found.device_kind == "gpu" and (outside := found.used - found.budget) > start_cost(tp):
            self._events.emit(
                EventKind.MEASURED, replica.id,
                f"engine holds {outside / GiB:.2f} GiB outside its {found.budget / GiB:.2f} GiB"
                f" budget; placement allows {start_cost(tp) / GiB:.2f} GiB for that",
                model=entry.spec.name, outside=outside, exceeds=True,
            )  # fmt: skip
        self._events.emit(
            EventKind.MEASURED, replica.id,
            f"measured ({found.source}): needs {found.need / GiB:.2f} GiB per device"
            f" (reserved {found.budget / GiB:.2f} GiB, engine held {found.used / GiB:.2f} GiB)",
            model=entry.spec.name, need=found.need, used=found.used, budget=found.budget,
        )  # fmt: skip
        if entry.estimate is not None and spec_digest(entry.spec) == found.spec_digest:
            entry.estimate = replace(entry.estimate, measured=found.need)


def _intended_kv(estimate: MemoryEstimate) -> int:
    """The KV cache per device the estimate meant the engine to have."""
    return estimate.kv_cache // estimate.tensor_parallel
