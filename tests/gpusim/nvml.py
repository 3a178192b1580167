"""NVML as the supervisor sees it, over the simulated box's ledger (resources.NvmlApi)."""

from __future__ import annotations

from pathlib import Path

from supervisor.gpu_selection import GpuInfo
from supervisor.gpu_usage import Usage
from tests.gpusim.ledger import Ledger


class SimNvml:
    """Inject with `resources.detect(..., nvml=lambda: SimNvml(path))` or NvmlInventory(api);
    also gpu_usage.ProcessMemory (`Manager(gpu_memory=...)`)."""

    def __init__(self, ledger_path: Path) -> None:
        self.ledger = Ledger(ledger_path)

    def gpus(self) -> list[GpuInfo]:
        return self.ledger.gpus()

    def processes(self, index: int) -> list[tuple[int, int]]:
        return self.ledger.processes(index)

    def usage(self) -> Usage:
        """Per-process memory on every GPU, as gpu_usage.NvmlProcessMemory reports it."""
        return {str(g.index): dict(self.processes(g.index)) for g in self.gpus()}
