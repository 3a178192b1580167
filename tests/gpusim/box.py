"""A simulated GPU box in one object: its ledger, the supervisor's inventory over the NVML
stand-in, and the engine command that makes sem spawn simulated engines instead of vLLM."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from supervisor.engine import EngineCommand
from supervisor.resources import Inventory, detect
from tests.gpusim.ledger import Ledger, SimGpu
from tests.gpusim.nvml import SimNvml

REPO = Path(__file__).resolve().parents[2]


@dataclass
class SimBox:
    ledger: Ledger

    @classmethod
    def create(cls, directory: Path, gpus: list[SimGpu], release_lag: float = 0.3) -> SimBox:
        return cls(Ledger.create(directory / "gpus.json", gpus, release_lag))

    def nvml(self) -> SimNvml:
        return SimNvml(self.ledger.path)

    def inventory(
        self, devices: str | list[int | str] = "gpu", environ: Mapping[str, str] | None = None
    ) -> Inventory:
        """What the daemon's `detect` returns on this box (sem's own environment: `environ`)."""
        return detect(devices, "auto", environ=environ or {}, nvml=self.nvml)

    def engine_command(self, **knobs: str) -> EngineCommand:
        """Engines run `python -m tests.gpusim.engine`; knobs: SIM_* (see engine.py)."""
        env = {"PYTHONPATH": str(REPO), "SIM_LEDGER": str(self.ledger.path), **knobs}
        return EngineCommand(python=sys.executable, module="tests.gpusim.engine", extra_env=env)
