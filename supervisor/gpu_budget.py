"""How a reservation on a GPU turns into vLLM's numbers, and what must be free for it to start.

vLLM 0.32 starts a worker on each GPU in this order (vllm/v1/worker/gpu_worker.py
`Worker.init_device`, vllm/v1/worker/utils.py `request_memory`):

1. CUDA context, and with tensor parallel the NCCL communicators: memory *outside* its budget.
2. A snapshot of free memory; it refuses to start unless
   free >= ceil(gpu_memory_utilization x total)  ("Free memory on device ... is less than
   desired GPU memory utilization"), and that product is its budget.
3. Weights, a profiling run, then KV cache = budget - everything else it consumed
   (`determine_available_memory`): the engine fills exactly the budget.

So a GPU fits a reservation only when free >= reservation + the start cost (context, plus NCCL
with tensor parallel); `fits` says so. sem sets utilization = reservation / total, rounded up so
the budget is never below the reservation; `utilization` computes it.

Tensor parallel over unequal GPUs: one `--gpu-memory-utilization` applies to every rank's own
total, and every rank needs the same per-device memory; the smallest GPU decides:
u = per_device / min(totals). Each rank then asks for u x its own total free at start (more than
per_device on the larger GPUs) but keeps only per_device after the KV cache is shrunk to the
smallest rank's block count (vllm/v1/core/kv_cache_utils.py `get_kv_cache_configs`, step 5).
sem must reserve u x total_i on GPU i (`tp_reservations`): less fails vLLM's start check there.
"""

from __future__ import annotations

import math

MiB = 1024**2

# A process's CUDA context: 518 MiB, measured on an H200 (CUDA 13, torch 2.11) from NVML's
# per-process figure of a process holding a 5 GiB tensor (engine notes, "GPU memory protocol").
CONTEXT_COST = 518 * MiB
# NCCL communicators and vLLM's custom all-reduce buffers on each rank with tensor parallel.
# Not measured (no multi-GPU box yet): an allowance to replace with a measured figure.
NCCL_COST = 512 * MiB


def start_cost(tensor_parallel: int) -> int:
    """Memory an engine takes on each of its GPUs before vLLM measures free memory."""
    return CONTEXT_COST + (NCCL_COST if tensor_parallel > 1 else 0)


def fits(free: int, reservation: int, tensor_parallel: int = 1) -> bool:
    """Would vLLM's start check pass on a GPU with `free` bytes free for this reservation?"""
    return free >= reservation + start_cost(tensor_parallel)


def utilization(per_device: int, total: int) -> float:
    """`--gpu-memory-utilization` for a budget of `per_device` bytes on a GPU of `total` bytes,
    rounded *up* to the 4 decimals sem passes (engine.py), so the budget is never below it."""
    if per_device <= 0 or total <= 0:
        raise ValueError("per_device and total must be positive")
    value = math.ceil(per_device / total * 10_000) / 10_000
    if value > 1.0:
        raise ValueError(f"{per_device} bytes do not fit in a GPU of {total} bytes")
    return value


def tp_utilization(per_device: int, totals: list[int]) -> float:
    """One utilization for all ranks: the smallest GPU must hold per_device."""
    return utilization(per_device, min(totals))


def tp_reservations(per_device: int, totals: list[int]) -> list[int]:
    """What sem must reserve on each GPU of a tensor-parallel engine (same order as totals):
    vLLM demands utilization x that GPU's total free at start, on every rank."""
    u = tp_utilization(per_device, totals)
    return [max(per_device, math.ceil(u * total)) for total in totals]
