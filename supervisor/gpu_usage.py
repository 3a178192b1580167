"""Who uses a GPU's memory: NVML's per-process figures, summed per replica.

An engine is a process group (vLLM's API server, its EngineCore and workers): each process NVML
lists on a GPU goes to the replica whose engine's group holds it, and the rest to `others`.
In a container without the host's PID namespace NVML reports host PIDs, which match no local
process: everything then shows as `others` (the device's measured total stays right).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger("sem.gpu_usage")

Usage = dict[str, dict[int, int]]  # device id -> pid -> bytes used there


class ProcessMemory(Protocol):
    def usage(self) -> Usage: ...


class NvmlProcessMemory:
    """Per-process GPU memory through nvidia-ml-py (blocking calls: run in a worker thread)."""

    def __init__(self) -> None:
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()

    def usage(self) -> Usage:
        nvml = self._nvml
        found: Usage = {}
        for index in range(int(nvml.nvmlDeviceGetCount())):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                processes = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            except nvml.NVMLError as exc:
                log.warning("GPU%d: no per-process memory from NVML: %s", index, exc)
                continue
            # usedGpuMemory is None where the driver cannot tell (e.g. WDDM): counted as 0.
            found[str(index)] = {int(p.pid): int(p.usedGpuMemory or 0) for p in processes}
        return found


@dataclass
class Attribution:
    by_replica: dict[tuple[str, str], int] = field(default_factory=dict)  # (device, replica)
    others: dict[str, int] = field(default_factory=dict)  # device -> bytes of no replica


def process_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:  # gone, or not in this PID namespace
        return None


def attribute(
    usage: Usage,
    replicas_by_group: Mapping[int, str],
    group_of: Callable[[int], int | None] = process_group,
) -> Attribution:
    """Each process's bytes to the replica whose engine's process group holds it."""
    result = Attribution()
    for device, processes in usage.items():
        result.others[device] = 0
        for pid, used in processes.items():
            replica = replicas_by_group.get(group_of(pid) or -1)
            if replica is None:
                result.others[device] += used
            else:
                key = (device, replica)
                result.by_replica[key] = result.by_replica.get(key, 0) + used
    return result
