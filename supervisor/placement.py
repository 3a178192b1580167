"""Placement: which replicas go on which devices now, and why the others wait.

A pure decision over snapshots: no I/O, no logging, no clock, no mutation of its inputs.

- A device can take a replica when both its unreserved memory (total - reserved by sem) and its
  measured free memory cover the reservation, and on a GPU the engine's start cost on top (its
  CUDA context, and NCCL with tensor parallel: vLLM takes them before it checks free memory;
  `has_room`). `tensor_parallel: N` needs N such GPUs, and on GPUs of unequal sizes each one
  must hold u x its own total (gpu_budget.tp_reservations): the larger ones more than the need.
- Best fit: among the devices that can take it, the ones left with the least room afterwards.
- Order: higher priority first, then first come first served.
- No starvation: a request that does not fit lets the requests behind it through (backfill) only
  until it has waited `starvation_guard` seconds; after that nothing behind it is placed until it
  fits, so memory that frees up goes to it rather than to a stream of smaller models.
- On a GPU, one engine starts at a time: vLLM checks free memory at its own start, so two engines
  starting together on one GPU can both count the same memory.
- Nodes (a Ray cluster, supervisor/cluster/): a replica's devices are all on one node, and a
  replica goes to a node that holds no replica of its model yet when one can take it (so the loss
  of a node leaves the model serving); best fit decides among the rest. On one box every device
  is on the same node "" and this changes nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace

from supervisor.gpu_budget import fits, start_cost, tp_reservations, tp_utilization
from supervisor.units import GiB

# Memory held outside sem below this is not worth a word in a wait reason.
FOREIGN_NOTE_MIN = 256 * 1024**2


@dataclass(frozen=True)
class DeviceView:
    id: str
    label: str  # "GPU0", "CPU"
    total: int
    free: int  # measured
    reserved: int  # by sem's replicas
    starting: bool = False  # an engine of sem's is starting on it (GPUs only: one at a time)
    kind: str = "gpu"
    node: str = ""  # the cluster node it is on ("" on one box)
    foreign: int = 0  # measured use that none of sem's engines accounts for (other processes)

    @property
    def available(self) -> int:
        return max(0, min(self.total - self.reserved, self.free))


@dataclass(frozen=True)
class Request:
    replica_id: str
    need: int  # bytes per device (the reservation on the smallest of its GPUs)
    devices: int = 1  # tensor_parallel
    priority: int = 0
    seq: int = 0  # arrival order
    waited: float = 0.0  # seconds pending so far
    group: str = ""  # its model: replicas of one group spread over nodes
    avoid_nodes: frozenset[str] = frozenset()  # nodes its group's placed replicas are on


@dataclass(frozen=True)
class Placement:
    replica_id: str
    device_ids: tuple[str, ...]
    per_device: int  # the request's need
    reason: str
    # What is reserved on each device, in device_ids' order: per_device, except on the larger
    # GPUs of a tensor-parallel engine over unequal GPUs. Empty: per_device on each.
    reservations: tuple[int, ...] = ()

    def reserved(self) -> dict[str, int]:
        """Bytes reserved on each of its devices."""
        amounts = self.reservations or (self.per_device,) * len(self.device_ids)
        return dict(zip(self.device_ids, amounts, strict=True))


@dataclass(frozen=True)
class Wait:
    replica_id: str
    reason: str


@dataclass(frozen=True)
class Plan:
    placements: list[Placement] = field(default_factory=list)
    waits: list[Wait] = field(default_factory=list)


def gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def gib2(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def has_room(device: DeviceView, need: int, tensor_parallel: int = 1) -> bool:
    """Can `device` take a reservation of `need` bytes now? On a GPU the engine's CUDA context
    (and NCCL buffers with tensor parallel) come on top, outside vLLM's budget: see
    gpu_budget.fits. The CPU has no such cost outside the estimate."""
    if device.kind != "gpu":
        return device.available >= need
    return fits(device.available, need, tensor_parallel)


def need_text(need: int, tensor_parallel: int, on_gpu: bool) -> str:
    """'needs 18.05 GiB + 0.51 GiB context': the reservation and, on GPUs, the start cost."""
    if not on_gpu:
        return f"needs {gib2(need)}"
    what = "context and NCCL" if tensor_parallel > 1 else "context"
    return f"needs {gib2(need)} + {gib2(start_cost(tensor_parallel))} {what}"


def never_fits(
    need: int, devices_needed: int, totals: list[tuple[str, int]], on_gpu: bool = False
) -> str | None:
    """Why a request could not be placed even on empty devices; None if it could. On GPUs the
    engine's start cost must fit beside the reservation."""
    kind = "GPUs" if devices_needed > 1 else "device"
    if devices_needed > len(totals):
        return f"needs {devices_needed} GPUs; there are {len(totals)}"
    cost = start_cost(devices_needed) if on_gpu else 0
    big_enough = [label for label, total in totals if total >= need + cost]
    if len(big_enough) < devices_needed:
        largest = max(totals, key=lambda t: t[1])
        return (
            f"{need_text(need, devices_needed, on_gpu)} on each of {devices_needed} {kind};"
            f" the largest {largest[0]} has {gib(largest[1])} in all"
        )
    return None


def _foreign_note(devices: Sequence[DeviceView]) -> str:
    held = [d for d in devices if d.foreign >= FOREIGN_NOTE_MIN]
    if not held:
        return ""
    parts = ", ".join(f"{gib(d.foreign)} on {d.label}" for d in held)
    return f" ({parts} held by processes outside sem)"


def _wait_reason(request: Request, devices: list[DeviceView]) -> str:
    if not devices:
        return f"needs {gib2(request.need)}; no devices"
    on_gpu = all(d.kind == "gpu" for d in devices)
    what = need_text(request.need, request.devices, on_gpu)
    best = max(devices, key=lambda d: d.available)
    if request.devices == 1:
        starting = [d.label for d in devices if d.starting and has_room(d, request.need)]
        if starting:
            return f"{what}; {starting[0]} has room but another engine is starting on it"
        where = "1 GPU" if on_gpu else "1 device"
        return (
            f"{what} on {where}; largest free is {gib(best.available)} on {best.label}"
            + _foreign_note([best])
        )
    what += f" on each of {request.devices} GPUs"
    fitting = [d for d in devices if has_room(d, request.need, request.devices)]
    ready = [d for d in fitting if not d.starting]
    if len(fitting) >= request.devices and len(ready) < request.devices:
        return f"{what}; another engine is starting on {', '.join(d.label for d in fitting)}"
    if len(ready) >= request.devices and len({d.node for d in ready}) > 1:
        on_one = max(sum(d.node == n for d in ready) for n in {d.node for d in ready})
        if on_one < request.devices:
            return f"{what}; {len(ready)} GPUs have that free, but no node has {request.devices}"
    if len(fitting) < request.devices:
        labels = ", ".join(d.label for d in fitting) or "none"
        return f"{what}; only {len(fitting)} GPU(s) have that free ({labels})" + _foreign_note(
            devices
        )
    # Enough GPUs hold the need, but on unequal GPUs vLLM wants u x total on the larger ones.
    chosen = sorted(fitting, key=lambda d: -d.available)[: request.devices]
    totals = [d.total for d in chosen]
    u = tp_utilization(request.need, totals)
    short = [
        f"{gib2(r)} on {d.label} ({gib(d.available)} free)"
        for d, r in zip(chosen, tp_reservations(request.need, totals), strict=True)
        if not has_room(d, r, request.devices)
    ]
    return (
        f"{what}; at utilization {u:.4f} (of the smallest GPU) vLLM wants {', '.join(short)}"
        + _foreign_note(chosen)
    )


def _reservations(request: Request, devices: Sequence[DeviceView]) -> list[int]:
    """What each of these devices would reserve for the request."""
    if request.devices == 1 or any(d.kind != "gpu" for d in devices):
        return [request.need] * len(devices)
    return tp_reservations(request.need, [d.total for d in devices])


def _choose(
    request: Request, candidates: list[DeviceView], used: Collection[str]
) -> tuple[tuple[DeviceView, ...], list[int]] | None:
    """The best set of `request.devices` candidates, all on one node, and what each reserves:
    a node not in `used` if one can take it, then the best fit."""
    best: tuple[tuple[bool, int, tuple[str, ...]], tuple[DeviceView, ...], list[int]] | None = None
    for combo in itertools.combinations(candidates, request.devices):
        if len({d.node for d in combo}) > 1:
            continue
        amounts = _reservations(request, combo)
        if not all(has_room(d, r, request.devices) for d, r in zip(combo, amounts, strict=True)):
            continue
        left = sum(d.available - r for d, r in zip(combo, amounts, strict=True))
        node = combo[0].node
        key = (node in used and node != "", left, tuple(d.id for d in combo))
        if best is None or key < best[0]:
            best = (key, combo, amounts)
    return None if best is None else (best[1], best[2])


def plan(
    requests: list[Request], devices: list[DeviceView], starvation_guard: float = 60.0
) -> Plan:
    views = {d.id: d for d in devices}
    reserved = {d.id: d.reserved for d in devices}
    free = {d.id: d.free for d in devices}
    starting = {d.id: d.starting for d in devices}
    used: dict[str, set[str]] = {}  # group -> nodes its replicas are on (this round included)
    result = Plan()
    blocked_by: Request | None = None
    for request in sorted(requests, key=lambda r: (-r.priority, r.seq)):
        if blocked_by is not None:
            result.waits.append(
                Wait(
                    request.replica_id,
                    f"queued behind {blocked_by.replica_id}, which has"
                    f" waited {blocked_by.waited:.0f}s (no overtaking after"
                    f" {starvation_guard:.0f}s)",
                )
            )
            continue
        current = [
            replace(d, free=free[d.id], reserved=reserved[d.id], starting=starting[d.id])
            for d in views.values()
        ]
        candidates = [
            d for d in sorted(current, key=lambda d: d.id)
            if has_room(d, request.need, request.devices) and not (d.kind == "gpu" and d.starting)
        ]  # fmt: skip
        group_nodes = used.setdefault(request.group, set(request.avoid_nodes))
        choice = _choose(request, candidates, group_nodes if request.group else ())
        if choice is None:
            result.waits.append(Wait(request.replica_id, _wait_reason(request, current)))
            if request.waited >= starvation_guard:
                blocked_by = request
            continue
        chosen, amounts = choice
        group_nodes.add(chosen[0].node)
        for d, amount in zip(chosen, amounts, strict=True):
            reserved[d.id] += amount
            free[d.id] -= amount
            starting[d.id] = True
        result.placements.append(_placement(request, chosen, amounts))
    return result


def _placement(request: Request, chosen: Sequence[DeviceView], amounts: list[int]) -> Placement:
    by_id = sorted(zip(chosen, amounts, strict=True), key=lambda pair: pair[0].id)
    labels = "+".join(d.label for d, _ in by_id)
    left = ", ".join(f"{d.label} {gib(d.available - r)} left" for d, r in by_id)
    return Placement(
        request.replica_id,
        tuple(d.id for d, _ in by_id),
        request.need,
        f"{gib(request.need)} on {labels} (best fit: {left})",
        tuple(r for _, r in by_id),
    )
