"""Placement: which replicas go on which devices now, and why the others wait.

A pure decision over snapshots: no I/O, no logging, no clock, no mutation of its inputs.

- A device can take a replica when both its unreserved memory (total - reserved by sem) and its
  measured free memory cover the replica's need on it. `tensor_parallel: N` needs N such GPUs.
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

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from supervisor.gpu_budget import fits
from supervisor.units import GiB


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

    @property
    def available(self) -> int:
        return max(0, min(self.total - self.reserved, self.free))


@dataclass(frozen=True)
class Request:
    replica_id: str
    need: int  # bytes per device
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
    per_device: int
    reason: str


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


def has_room(device: DeviceView, need: int, tensor_parallel: int = 1) -> bool:
    """Can `device` take a reservation of `need` bytes now? On a GPU the engine's CUDA context
    (and NCCL buffers with tensor parallel) come on top, outside vLLM's budget: see
    gpu_budget.fits. The CPU has no such cost outside the estimate."""
    if device.kind != "gpu":
        return device.available >= need
    return fits(device.available, need, tensor_parallel)


def never_fits(need: int, devices_needed: int, totals: list[tuple[str, int]]) -> str | None:
    """Why a request could not be placed even on empty devices; None if it could."""
    kind = "GPUs" if devices_needed > 1 else "device"
    if devices_needed > len(totals):
        return f"needs {devices_needed} GPUs; there are {len(totals)}"
    big_enough = [label for label, total in totals if total >= need]
    if len(big_enough) < devices_needed:
        largest = max(totals, key=lambda t: t[1])
        return (
            f"needs {gib(need)} on each of {devices_needed} {kind}; the largest"
            f" {largest[0]} has {gib(largest[1])} in all"
        )
    return None


def _wait_reason(request: Request, devices: list[DeviceView]) -> str:
    what = f"needs {gib(request.need)}"
    if request.devices > 1:
        what += f" on {request.devices} GPUs"
    if not devices:
        return f"{what}; no devices"
    best = max(devices, key=lambda d: d.available)
    if request.devices == 1:
        starting = [d.label for d in devices if d.starting and d.available >= request.need]
        if starting:
            return f"{what}; {starting[0]} has room but another engine is starting on it"
        return f"{what} on 1 device; largest free is {gib(best.available)} on {best.label}"
    fitting = [d.label for d in devices if d.available >= request.need and not d.starting]
    if len(fitting) >= request.devices:
        return f"{what}; {len(fitting)} GPUs have that free, but no node has {request.devices}"
    return f"{what}; only {len(fitting)} GPU(s) have that free ({', '.join(fitting) or 'none'})"


def choose(fitting: list[DeviceView], request: Request, used: Iterable[str]) -> list[DeviceView]:
    """The request's devices among those that can take it (empty if none will do): all on one
    node, a node not in `used` if one can take it, then best fit."""
    used = set(used)
    nodes = sorted({d.node for d in fitting})
    best: tuple[tuple[bool, int, tuple[str, ...]], list[DeviceView]] | None = None
    for node in nodes:
        on_node = sorted(
            (d for d in fitting if d.node == node), key=lambda d: (d.available - request.need, d.id)
        )[: request.devices]
        if len(on_node) < request.devices:
            continue
        score = (
            node in used and node != "",
            sum(d.available - request.need for d in on_node),
            tuple(d.id for d in on_node),
        )
        if best is None or score < best[0]:
            best = score, on_node
    return best[1] if best else []


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
        fitting = [
            d for d in current
            if d.available >= request.need and not (d.kind == "gpu" and d.starting)
        ]  # fmt: skip
        group_nodes = used.setdefault(request.group, set(request.avoid_nodes))
        chosen = choose(fitting, request, group_nodes if request.group else ())
        if not chosen:
            result.waits.append(Wait(request.replica_id, _wait_reason(request, current)))
            if request.waited >= starvation_guard:
                blocked_by = request
            continue
        group_nodes.add(chosen[0].node)
        for d in chosen:
            reserved[d.id] += request.need
            free[d.id] -= request.need
            starting[d.id] = True
        labels = "+".join(d.label for d in chosen)
        left = ", ".join(f"{d.label} {gib(d.available - request.need)} left" for d in chosen)
        result.placements.append(
            Placement(
                request.replica_id,
                tuple(sorted(d.id for d in chosen)),
                request.need,
                f"{gib(request.need)} on {labels} (best fit: {left})",
            )
        )
    return result
