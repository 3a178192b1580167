"""Who holds what on each device: the views placement plans over, and the /resources report.

Pure functions of the measured devices and the replicas: memory is reserved by a placed replica
from its placement until it stops or fails (`Replica.holds_reservation`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from supervisor.placement import DeviceView
from supervisor.replica import Replica
from supervisor.resources import Device
from supervisor.states import ReplicaState

# An engine in these states is starting on its devices: placement starts no second one on a GPU
# meanwhile (vLLM measures free memory at its own start).
STARTING_STATES = frozenset({ReplicaState.STARTING})


def device_views(devices: list[Device], replicas: Iterable[Replica]) -> list[DeviceView]:
    """Each device as placement sees it: measured, reserved by sem, and whether one of sem's
    engines is starting on it."""
    reserved = {d.id: 0 for d in devices}
    starting = {d.id: False for d in devices}
    for replica in replicas:
        if replica.holds_reservation and replica.placement is not None:
            for device_id in replica.placement.device_ids:
                reserved[device_id] = reserved.get(device_id, 0) + replica.placement.per_device
                if replica.state in STARTING_STATES:
                    starting[device_id] = True
    return [
        DeviceView(d.id, d.label, d.total, d.free, reserved[d.id], starting[d.id], d.kind, d.node)
        for d in devices
    ]


def resource_report(devices: list[Device], replicas: list[Replica]) -> list[dict[str, Any]]:
    """`GET /resources`: each device's total, free, reserved and available bytes, and the
    replicas that hold memory on it."""
    views = {v.id: v for v in device_views(devices, replicas)}
    out = []
    for device in devices:
        holders = [
            {"replica": r.id, "reserved": r.placement.per_device, "state": r.state.value}
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
