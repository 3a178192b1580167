"""What memory there is: NVIDIA GPUs through NVML, else the CPU with a budget, or an injected list.

An inventory answers `devices()` with a fresh measurement. NVML calls block (briefly): the
manager calls it from a worker thread.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Protocol

import psutil

from supervisor.units import GiB, parse_size


@dataclass(frozen=True)
class Device:
    id: str  # "0", "1", ... for GPUs (NVML index, PCI order); "cpu" for the CPU
    kind: Literal["gpu", "cpu"]
    name: str
    total: int  # bytes
    free: int  # bytes, as measured now
    uuid: str | None = None
    node: str = ""  # the cluster node it is on ("" on one box; supervisor/cluster/)
    host: str = "127.0.0.1"  # the address engines on it listen on

    @property
    def index(self) -> int | None:
        """The GPU's index on its own machine (CUDA_VISIBLE_DEVICES); a cluster-wide id is
        `<node>/<index>`."""
        return int(self.id.rsplit("/", 1)[-1]) if self.kind == "gpu" else None

    @property
    def label(self) -> str:
        return f"GPU{self.id}" if self.kind == "gpu" else "CPU"


class Inventory(Protocol):
    def devices(self) -> list[Device]: ...


class StaticInventory:
    """A fixed list (tests, `sem plan --inventory 2x24GiB`)."""

    def __init__(self, devices: list[Device]) -> None:
        self._devices = devices

    def devices(self) -> list[Device]:
        return list(self._devices)

    @classmethod
    def parse(cls, text: str) -> StaticInventory:
        """'2x24GiB', '24GiB,16GiB' (GPUs) or 'cpu:8GiB'."""
        text = text.strip()
        if text.startswith("cpu:"):
            budget = parse_size(text[4:])
            return cls([Device("cpu", "cpu", "CPU", budget, budget)])
        sizes: list[int] = []
        for part in text.split(","):
            match = re.fullmatch(r"\s*(?:(\d+)\s*x\s*)?(.+?)\s*", part)
            if not match:
                raise ValueError(f"{part!r} is not COUNTxSIZE or SIZE")
            count = int(match.group(1) or 1)
            sizes += [parse_size(match.group(2))] * count
        return cls([Device(str(i), "gpu", f"GPU {i}", size, size) for i, size in enumerate(sizes)])


class CpuInventory:
    """The CPU as one device: sem may use `budget` bytes, and no more than is available now."""

    def __init__(self, budget: int | None = None) -> None:
        # Default: 3/4 of the machine's memory (the rest for the OS, sem, the gateway).
        self.budget = budget if budget is not None else int(psutil.virtual_memory().total * 0.75)

    def devices(self) -> list[Device]:
        available = psutil.virtual_memory().available
        return [Device("cpu", "cpu", "CPU", self.budget, min(self.budget, available))]


class NvmlInventory:
    """NVIDIA GPUs via nvidia-ml-py. Indexes follow PCI order, as CUDA_DEVICE_ORDER=PCI_BUS_ID."""

    def __init__(self) -> None:
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()  # raises NVMLError_LibraryNotFound without a driver

    def count(self) -> int:
        return int(self._nvml.nvmlDeviceGetCount())

    def devices(self) -> list[Device]:
        nvml = self._nvml
        found = []
        for index in range(self.count()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            name = nvml.nvmlDeviceGetName(handle)
            uuid = nvml.nvmlDeviceGetUUID(handle)
            found.append(
                Device(
                    id=str(index),
                    kind="gpu",
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    total=int(memory.total),
                    free=int(memory.free),
                    uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                )
            )
        return found


def detect(mode: str, cpu_budget: str) -> Inventory:
    """`auto`: NVML GPUs if any, else the CPU; `gpu`: NVML or fail; `cpu`: the CPU."""
    budget = None if cpu_budget == "auto" else parse_size(cpu_budget)
    if mode in ("auto", "gpu"):
        try:
            nvml = NvmlInventory()
            if nvml.count() > 0:
                return nvml
            problem = "NVML found no GPU"
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ImportError...
            problem = f"NVML unavailable: {exc}"
        if mode == "gpu":
            raise RuntimeError(f"devices: gpu was asked for, but {problem}")
    return CpuInventory(budget)


def describe(devices: list[Device]) -> str:
    return ", ".join(f"{d.label} {d.name} {d.total / GiB:.1f} GiB" for d in devices)
