"""The cluster's nodes as Ray reports them, and their devices named cluster-wide. Pure."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from supervisor.cluster import GPU_MEMORY_RESOURCE
from supervisor.resources import Device
from supervisor.units import GiB


@dataclass(frozen=True)
class NodeInfo:
    """One alive node: its id, the address engines on it listen on, what it declared."""

    node_id: str
    host: str
    gpus: int  # declared (`ray start --num-gpus`)
    gpu_memory: int | None  # bytes per GPU, declared as the `sem_gpu_gib` resource; None: NVML
    head: bool = False  # the head node: it runs Ray's GCS, which the cluster cannot lose

    @property
    def short(self) -> str:
        """A readable prefix for device ids and labels."""
        return self.node_id[:8]


HEAD_RESOURCE = "node:__internal_head__"  # Ray's mark of the head node in its resources


def alive_nodes(raw: list[dict[str, Any]]) -> list[NodeInfo]:
    """`ray.nodes()` -> the alive ones, in a stable order."""
    found = []
    for node in raw:
        if not node.get("Alive"):
            continue
        resources = node.get("Resources", {})
        gib = resources.get(GPU_MEMORY_RESOURCE)
        found.append(
            NodeInfo(
                node_id=str(node["NodeID"]),
                host=str(node["NodeManagerAddress"]),
                gpus=int(resources.get("GPU", 0)),
                gpu_memory=int(float(gib) * GiB) if gib else None,
                head=HEAD_RESOURCE in resources,
            )
        )
    return sorted(found, key=lambda n: n.node_id)


def declared_devices(node: NodeInfo) -> list[Device]:
    """The GPUs a node declared with a memory size: what a node without NVML has (tests, CPU
    machines standing in for GPU nodes). Nothing runs on them, so all of it is free."""
    if node.gpu_memory is None or node.gpus == 0:
        return []
    size = node.gpu_memory
    return [Device(str(i), "gpu", f"GPU {i} (declared)", size, size) for i in range(node.gpus)]


def on_node(node: NodeInfo, devices: list[Device]) -> list[Device]:
    """A node's local devices with cluster-wide ids (`<node>/<local id>`) and their node."""
    return [
        replace(d, id=f"{node.short}/{d.id}", name=f"{d.name} on {node.short}", node=node.node_id,
                host=node.host)
        for d in devices
    ]  # fmt: skip
