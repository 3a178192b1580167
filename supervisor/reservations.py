"""Who holds what on each device: the views placement plans over, and the /resources report.

Pure functions of the measured devices and the replicas: memory is reserved by a placed replica
from its placement until it stops or fails (`Replica.holds_reservation`), per device as its
placement says (more on the larger GPUs of a tensor-parallel engine over unequal GPUs).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

from supervisor.gpu_budget import start_cost
from supervisor.placement import DeviceView
from supervisor.replica import Replica
from supervisor.resources import Device
from supervisor.states import ReplicaState

# An engine in these states is starting on its devices: placement starts no second one on a GPU
# meanwhile (vLLM measures free memory at its own start).
STARTING_STATES = frozenset({ReplicaState.STARTING})
# An engine in these states holds GPU memory (RESTARTING: its engine is gone or going).
RUNNING_STATES = frozenset({ReplicaState.STARTING, ReplicaState.READY, ReplicaState.DRAINING})


def device_views(
    devices: list[Device], replicas: Iterable[Replica], restarting_into_start: Collection[str] = ()
) -> list[DeviceView]:
    """Each device as placement sees it: measured, reserved by sem, whether one of sem's
    engines is starting on it (or a restart waits for its turn to start there: the ids in
    `restarting_into_start`), and the memory in use that sem's engines do not account for."""
    reserved = {d.id: 0 for d in devices}
    starting = {d.id: False for d in devices}
    accounted = {d.id: 0 for d in devices}
    for replica in replicas:
        if not (replica.holds_reservation and replica.placement is not None):
            continue
        into_start = replica.id in restarting_into_start
        cost = start_cost(len(replica.placement.device_ids))
        for device_id, amount in replica.placement.reserved().items():
            reserved[device_id] = reserved.get(device_id, 0) + amount
            if replica.state in STARTING_STATES or into_start:
                starting[device_id] = True
            if replica.state in RUNNING_STATES:
                accounted[device_id] = accounted.get(device_id, 0) + amount + cost
    return [
        DeviceView(
            d.id, d.label, d.total, d.free, reserved[d.id], starting[d.id], d.kind, d.node,
            foreign=max(0, d.total - d.free - accounted[d.id]) if d.kind == "gpu" else 0,
        )
        for d in devices
    ]  # fmt: skip


def resource_report(devices: list[Device], replicas: list[Replica]) -> list[dict[str, Any]]:
    """`GET /resources`: each device's total, free, reserved and available bytes, and the
    replicas that hold memory on it."""
    views = {v.id: v for v in device_views(devices, replicas)}
    out = []
    for device in devices:
        holders = [
            {"replica": r.id, "reserved": r.placement.reserved()[device.id], "state": r.state.value}
            for r in replicas
            if r.holds_reservation and r.placement and device.id in r.placement.device_ids
        ]
        out.append(
            {
                "id": device.id, "kind": device.kind, "name": device.name,
                "uuid": device.uuid, "total": device.total, "free": device.free,
                "reserved": views[device.id].reserved,
                "available": views[device.id].available, "replicas": holders,
            }
        )  # fmt: skip
    return out
