"""What memory there is: NVIDIA GPUs through NVML, else the CPU with a budget, or an injected list.

An inventory answers `devices()` with a fresh measurement. NVML calls block (briefly): the
manager calls it from a worker thread. NVML sits behind `NvmlApi` (a list of GpuInfo and the
processes on a GPU) so that tests inject a simulated box (tests/gpusim).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Literal, Protocol

import psutil

from supervisor.gpu_selection import GpuInfo, select_gpus
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
        """'2x24GiB', '24GiB,16GiB' (GPUs) or 'cpu:8GiB'; several nodes of a cluster as
        'NAME=DEVICES; ...', e.g. 'a=2x24GiB; b=2x24GiB' (ids `a/0`, as a cluster names them)."""
        if "=" in text:
            return cls._nodes(text)
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

    @classmethod
    def _nodes(cls, text: str) -> StaticInventory:
        devices: list[Device] = []
        names: set[str] = set()
        for part in (p for p in text.split(";") if p.strip()):
            name, equals, spec = (x.strip() for x in part.partition("="))
            if not equals or not re.fullmatch(r"[\w.-]+", name):
                raise ValueError(f"{part.strip()!r} is not NAME=DEVICES (a node and its devices)")
            if name in names:
                raise ValueError(f"node {name!r} is listed twice")
            names.add(name)
            try:
                local = cls.parse(spec).devices()
            except ValueError as exc:
                raise ValueError(f"node {name}: {exc}") from None
            devices += [
                replace(d, id=f"{name}/{d.id}", name=f"{d.name} on {name}", node=name)
                for d in local
            ]  # fmt: skip
        return cls(devices)


class CpuInventory:
    """The CPU as one device: sem may use `budget` bytes, and no more than is available now."""

    def __init__(self, budget: int | None = None) -> None:
        # Default: 3/4 of the machine's memory (the rest for the OS, sem, the gateway).
        self.budget = budget if budget is not None else int(psutil.virtual_memory().total * 0.75)

    def devices(self) -> list[Device]:
        available = psutil.virtual_memory().available
        return [Device("cpu", "cpu", "CPU", self.budget, min(self.budget, available))]


class NvmlApi(Protocol):
    """The NVML calls sem makes: PynvmlApi on a real box; tests inject a stand-in here."""

    def gpus(self) -> list[GpuInfo]:
        """Every GPU NVML sees, in index order, with memory measured now."""
        ...

    def processes(self, index: int) -> list[tuple[int, int]]:
        """(pid, bytes) of each compute process on GPU `index`."""
        ...


class PynvmlApi:
    """nvidia-ml-py. nvmlInit raises NVMLError_LibraryNotFound without a driver."""

    def __init__(self) -> None:
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()

    def gpus(self) -> list[GpuInfo]:
        nvml = self._nvml
        found = []
        for index in range(int(nvml.nvmlDeviceGetCount())):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            found.append(
                GpuInfo(
                    index=index,
                    uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                    name=_text(nvml.nvmlDeviceGetName(handle)),
                    total=int(memory.total),
                    free=int(memory.free),
                    mig=self._mig_enabled(handle),
                )
            )
        return found

    def _mig_enabled(self, handle: object) -> bool:
        try:
            current, _pending = self._nvml.nvmlDeviceGetMigMode(handle)
        except self._nvml.NVMLError:  # NotSupported: a GPU without MIG
            return False
        return bool(current == self._nvml.NVML_DEVICE_MIG_ENABLE)

    def processes(self, index: int) -> list[tuple[int, int]]:
        handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
        running = self._nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        return [(int(p.pid), int(p.usedGpuMemory or 0)) for p in running]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlInventory:
    """The GPUs sem may use (see gpu_selection.py), measured through NVML at each call."""

    def __init__(
        self,
        api: NvmlApi | None = None,
        indexes: list[int] | None = None,  # None: every GPU
        notes: tuple[str, ...] = (),
    ) -> None:
        self.api = api if api is not None else PynvmlApi()
        self.indexes = indexes
        self.notes = notes  # GPUs left out and why, for the start-up log

    def devices(self) -> list[Device]:
        return [
            Device(str(g.index), "gpu", g.name, g.total, g.free, uuid=g.uuid)
            for g in self.api.gpus()
            if self.indexes is None or g.index in self.indexes
        ]


def detect(
    mode: str | list[int | str],
    cpu_budget: str,
    *,
    environ: Mapping[str, str] | None = None,
    nvml: Callable[[], NvmlApi] = PynvmlApi,
) -> Inventory:
    """`auto`: NVML GPUs if any, else the CPU; `gpu` or a list of GPUs: NVML or fail;
    `cpu`: the CPU. GPUs are narrowed by sem's own CUDA_VISIBLE_DEVICES and the list."""
    budget = None if cpu_budget == "auto" else parse_size(cpu_budget)
    if mode == "cpu":
        return CpuInventory(budget)
    environ = os.environ if environ is None else environ
    try:
        api = nvml()
        found = api.gpus()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ImportError...
        if mode == "auto":
            return CpuInventory(budget)
        raise RuntimeError(f"devices: {mode} was asked for, but NVML unavailable: {exc}") from None
    selection = select_gpus(found, mode if isinstance(mode, list) else None, environ)
    if selection.chosen:
        notes = tuple(selection.left_out)
        if selection.hidden:
            notes += (f"GPUs {selection.hidden} hidden by CUDA_VISIBLE_DEVICES or devices:",)
        return NvmlInventory(api, selection.chosen, notes)
    if mode == "auto" and not selection.left_out:  # no GPU, or CUDA_VISIBLE_DEVICES hides all
        return CpuInventory(budget)
    why = "; ".join(selection.left_out) or "no GPU is visible"
    raise RuntimeError(f"devices: {mode} was asked for, but {why}")


def describe(devices: list[Device]) -> str:
    return ", ".join(f"{d.label} {d.name} {d.total / GiB:.1f} GiB" for d in devices)
