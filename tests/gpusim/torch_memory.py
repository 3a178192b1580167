"""The simulated engine's memory on real GPUs: the ledger's calls, served by torch tensors.

With SIM_LEDGER=torch, tests/gpusim/engine.py runs vLLM's start-up protocol against real GPU
memory: the CUDA context is really created (its real cost, whatever the `context` figure),
the free-memory check reads CUDA's own figures (torch.cuda.mem_get_info, as vLLM does), and
weights, activation, non-torch buffers and the KV cache are real allocations. NCCL is not
initialised (no second process talks to it): its allowance is allocated as a plain tensor.
A box with torch and nvidia-ml-py is enough (scripts/gpu_check.py uses it there).
"""

from __future__ import annotations

from typing import Any

from supervisor.gpu_selection import GpuInfo
from tests.gpusim.ledger import OutOfMemory, Owner


class TorchMemory:
    """The Ledger calls engine.py makes, on the GPUs CUDA_VISIBLE_DEVICES names (physical
    indexes, as sem sets them; the ledger's GPU indexes are physical too)."""

    def __init__(self, visible: str) -> None:
        import torch

        self._torch = torch
        count = torch.cuda.device_count()
        listed = [v.strip() for v in visible.split(",") if v.strip()]
        self._physical = [int(v) for v in listed] if listed else list(range(count))
        self._held: dict[tuple[int, str], list[Any]] = {}

    def _ordinal(self, gpu: int) -> int:
        return self._physical.index(gpu)

    def gpus(self) -> list[GpuInfo]:
        found = []
        for ordinal, physical in enumerate(self._physical):
            free, total = self._torch.cuda.mem_get_info(ordinal)
            name = self._torch.cuda.get_device_name(ordinal)
            found.append(GpuInfo(physical, f"GPU-torch-{physical}", name, total, free, False))
        return found

    def allocate(self, owner: Owner, gpu: int, nbytes: int, tag: str) -> None:
        device = f"cuda:{self._ordinal(gpu)}"
        try:
            if tag == "context":  # the context's real cost is CUDA's, not the figure given
                tensor = self._torch.zeros(1, device=device)
            else:
                tensor = self._torch.empty(max(0, nbytes), dtype=self._torch.uint8, device=device)
        except self._torch.OutOfMemoryError as exc:
            raise OutOfMemory(str(exc)) from None
        self._held.setdefault((gpu, tag), []).append(tensor)

    def free(self, owner: Owner, gpu: int, tag: str) -> None:
        self._held.pop((gpu, tag), None)
        self._torch.cuda.empty_cache()  # back to the driver, as vLLM's profiler sees it
