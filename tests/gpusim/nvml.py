"""NVML as the supervisor sees it, over the simulated box's ledger (resources.NvmlApi)."""

from __future__ import annotations

from pathlib import Path

from supervisor.gpu_selection import GpuInfo
from tests.gpusim.ledger import Ledger


class SimNvml:
    """Inject with `resources.detect(..., nvml=lambda: SimNvml(path))` or NvmlInventory(api)."""

    def __init__(self, ledger_path: Path) -> None:
        self.ledger = Ledger(ledger_path)

    def gpus(self) -> list[GpuInfo]:
        return self.ledger.gpus()

    def processes(self, index: int) -> list[tuple[int, int]]:
        return self.ledger.processes(index)
