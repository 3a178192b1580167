"""A stand-in engine that takes simulated GPU memory the way vLLM 0.32 does, step by step.

Run as `python -m tests.gpusim.engine` with vLLM's flags (sem spawns it like vLLM: --model,
--port, --gpu-memory-utilization, --tensor-parallel-size, --max-model-len, ...) and with
SIM_LEDGER naming the ledger file; CUDA_VISIBLE_DEVICES picks its GPUs (indexes or UUIDs). Once
started it serves tests/fake_engine.py's HTTP API. Each rank's steps, as read in vLLM's source:

1. `Worker.init_device` (vllm/v1/worker/gpu_worker.py): CUDA context, then NCCL with tensor
   parallel (`init_worker_distributed_environment`), *before* the memory snapshot.
2. `request_memory` (vllm/v1/worker/utils.py): requested = ceil(total x utilization); refuses
   unless the snapshot's free memory covers it, with vLLM's ValueError text.
3. `load_model`: weights arrive over SIM_LOAD_SECONDS.
4. `determine_available_memory` with `memory_profiling` (vllm/utils/mem_utils.py): a profile
   run (activation peak, freed after; non-torch buffers, kept); total_consumed = snapshot free -
   free after, device-wide, so memory another process took meanwhile counts as this engine's;
   "Error in memory profiling" if free memory grew; KV = requested - total_consumed - peak.
5. `check_enough_kv_cache_memory` (vllm/v1/core/kv_cache_utils.py): "No available memory for the
   cache blocks" or "To serve at least one request with the model's max seq len" errors; the
   KV cache is the smallest rank's block count on every rank (`get_kv_cache_configs`).
Memory is released when the process is gone (the ledger's release lag), SIGKILL included.
With SIM_LEDGER=torch the same steps take real GPU memory through torch (torch_memory.py).

Knobs (env, bytes unless said): SIM_CONTEXT_BYTES (518 MiB), SIM_NCCL_BYTES (512 MiB),
SIM_ACTIVATION_BYTES (1 GiB), SIM_NON_TORCH_BYTES (256 MiB), SIM_LOAD_SECONDS (0.5),
SIM_PROFILE_SECONDS (0.2), SIM_WEIGHTS_FACTOR (1.0: real weights / what the checkpoint says),
SIM_STRICT_ARGS (unset: unknown flags are ignored; "1": refused as vLLM's argparse does).
Weights follow supervisor/estimate.py's rule (tested against vLLM's figures separately).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from supervisor.estimate import kv_bytes_per_token, weight_bytes
from supervisor.model_shape import model_shape
from tests.fake_engine import FakeEngine, make_app
from tests.gpusim.ledger import Ledger, OutOfMemory
from tests.gpusim.torch_memory import TorchMemory

GiB = 1024**3
MiB = 1024**2
BLOCK_SIZE = 16  # tokens a KV block holds (vLLM's default on GPUs)
LOAD_STEPS = 4
Memory = Ledger | TorchMemory  # simulated memory, or real GPU memory through torch


class StartupError(Exception):
    """vLLM's own start-up failure: `kind` is the exception class name it raises."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def format_gib(nbytes: float) -> float:
    """vllm/utils/mem_utils.py `format_gib`."""
    return round(nbytes / GiB, 2)


def _knob(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


@dataclass(frozen=True)
class Startup:
    gpus: list[int]  # ledger indexes, rank order
    utilization: float
    weights_per_rank: int
    kv_per_token: int  # on each rank
    max_model_len: int
    context: int
    nccl: int
    activation: int
    non_torch: int
    load_seconds: float
    profile_seconds: float


def visible_gpus(ledger: Memory, value: str) -> list[int]:
    """CUDA_VISIBLE_DEVICES (PCI order indexes or UUIDs) -> ledger indexes."""
    found = ledger.gpus()
    chosen = []
    for item in filter(None, (v.strip() for v in value.split(","))):
        match = [g.index for g in found if str(g.index) == item or g.uuid.startswith(item)]
        if not match:
            raise StartupError("RuntimeError", f"CUDA error: invalid device ordinal ({item})")
        chosen.append(match[0])
    return chosen


def _kv_bytes(kv_cache_dtype: str, float_bytes: int) -> int:
    if kv_cache_dtype == "auto":
        return float_bytes
    return 1 if kv_cache_dtype.startswith("fp8") or kv_cache_dtype == "int8" else 2


def plan_startup(args: argparse.Namespace, ledger: Memory) -> Startup:
    model_dir = Path(args.model)
    shape = model_shape(json.loads((model_dir / "config.json").read_text()))
    tp = args.tensor_parallel_size
    gpus = visible_gpus(ledger, os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    if len(gpus) < tp:
        raise StartupError("RuntimeError", f"tensor_parallel_size {tp} > {len(gpus)} GPUs")
    float_bytes = 4 if args.dtype in ("float", "float32") else 2
    weights = weight_bytes(model_dir, float_bytes)
    return Startup(
        gpus=gpus[:tp],
        utilization=args.gpu_memory_utilization,
        weights_per_rank=int(weights * _knob("SIM_WEIGHTS_FACTOR", 1.0) / tp),
        kv_per_token=kv_bytes_per_token(shape, tp, _kv_bytes(args.kv_cache_dtype, float_bytes)),
        max_model_len=args.max_model_len or shape.max_positions,
        context=int(_knob("SIM_CONTEXT_BYTES", 518 * MiB)),
        nccl=int(_knob("SIM_NCCL_BYTES", 512 * MiB)) if tp > 1 else 0,
        activation=int(_knob("SIM_ACTIVATION_BYTES", GiB)),
        non_torch=int(_knob("SIM_NON_TORCH_BYTES", 256 * MiB)),
        load_seconds=_knob("SIM_LOAD_SECONDS", 0.5),
        profile_seconds=_knob("SIM_PROFILE_SECONDS", 0.2),
    )


def init_device(ledger: Memory, s: Startup) -> tuple[dict[int, int], dict[int, int]]:
    """Context and NCCL on every rank, then the snapshot and `request_memory`'s check.
    Returns (free at snapshot, requested) per GPU."""
    me = os.getpid()
    for gpu in s.gpus:
        ledger.allocate(me, gpu, s.context, "context")
    for gpu in s.gpus:
        if s.nccl:
            ledger.allocate(me, gpu, s.nccl, "nccl")
    snapshot = {g.index: g for g in ledger.gpus() if g.index in s.gpus}
    requested = {}
    for rank, gpu in enumerate(s.gpus):
        free, total = snapshot[gpu].free, snapshot[gpu].total
        requested[gpu] = math.ceil(total * s.utilization)
        if free < requested[gpu]:
            raise StartupError(
                "ValueError",
                f"Free memory on device cuda:{rank} ({format_gib(free)}/{format_gib(total)} GiB)"
                f" on startup is less than desired GPU memory utilization ({s.utilization},"
                f" {format_gib(requested[gpu])} GiB). Decrease GPU memory utilization or reduce"
                " GPU memory used by other processes.",
            )
    return {g: snapshot[g].free for g in s.gpus}, requested


def load_and_profile(ledger: Memory, s: Startup, init_free: dict[int, int]) -> dict[int, int]:
    """Weights over a few seconds, then the profile run; KV memory available per GPU."""
    me = os.getpid()
    for _ in range(LOAD_STEPS):
        time.sleep(s.load_seconds / LOAD_STEPS)
        for gpu in s.gpus:
            ledger.allocate(me, gpu, s.weights_per_rank // LOAD_STEPS, "weights")
    for gpu in s.gpus:
        ledger.allocate(me, gpu, s.activation, "activation")
        ledger.allocate(me, gpu, s.non_torch, "non_torch")
    time.sleep(s.profile_seconds)
    for gpu in s.gpus:
        ledger.free(me, gpu, "activation")
    after = {g.index: g.free for g in ledger.gpus() if g.index in s.gpus}
    consumed = {}
    for gpu in s.gpus:
        if init_free[gpu] < after[gpu]:
            raise StartupError(
                "AssertionError",
                f"Error in memory profiling. Initial free memory {format_gib(init_free[gpu])}"
                f" GiB, current free memory {format_gib(after[gpu])} GiB. This happens when"
                " other processes sharing the same container release GPU memory while vLLM is"
                " profiling during initialization. To fix this, ensure consistent GPU memory"
                " allocation or isolate vLLM in its own container.",
            )
        consumed[gpu] = init_free[gpu] - after[gpu]
    return consumed


def check_enough_kv_cache_memory(available: int, s: Startup) -> None:
    """vllm/v1/core/kv_cache_utils.py `check_enough_kv_cache_memory` (the null block held
    back) and `_check_enough_kv_cache_memory`, with their texts."""
    block = BLOCK_SIZE * s.kv_per_token
    check = available - block
    if check <= 0:
        raise StartupError(
            "ValueError",
            "No available memory for the cache blocks. Try increasing `gpu_memory_utilization`"
            " when initializing the engine (this flag also controls CPU memory reservation on"
            " the CPU backend, despite its name). See"
            " https://docs.vllm.ai/en/latest/configuration/conserving_memory/ for more details.",
        )
    needed = math.ceil(s.max_model_len / BLOCK_SIZE) * block
    if needed > check:
        estimate = check // block * BLOCK_SIZE
        hint = (
            f"Based on the available memory, the estimated maximum model length is {estimate}. "
            if estimate > 0
            else ""
        )
        raise StartupError(
            "ValueError",
            f"To serve at least one request with the model's max seq len ({s.max_model_len}),"
            f" ({format_gib(needed)} GiB KV cache is needed, which is larger than the available"
            f" KV cache memory ({format_gib(check)} GiB). {hint}Try increasing"
            " `gpu_memory_utilization` (which also controls CPU memory on the CPU backend) or"
            " decreasing `max_model_len` when initializing the engine. See"
            " https://docs.vllm.ai/en/latest/configuration/conserving_memory/ for more details.",
        )


def start(ledger: Memory, s: Startup) -> int:
    """The whole protocol; the KV cache's tokens. StartupError as vLLM would fail."""
    init_free, requested = init_device(ledger, s)
    consumed = load_and_profile(ledger, s, init_free)
    available = {gpu: requested[gpu] - consumed[gpu] - s.activation for gpu in s.gpus}
    for gpu in s.gpus:
        print(f"Available KV cache memory: {format_gib(available[gpu])} GiB", flush=True)
        check_enough_kv_cache_memory(available[gpu], s)
    blocks = min(available.values()) // (BLOCK_SIZE * s.kv_per_token) - 1
    for gpu in s.gpus:
        ledger.allocate(os.getpid(), gpu, blocks * BLOCK_SIZE * s.kv_per_token, "kv_cache")
    print(f"GPU KV cache size: {blocks * BLOCK_SIZE:,} tokens", flush=True)
    return blocks * BLOCK_SIZE


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.92)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--enforce-eager", action="store_true")
    if os.environ.get("SIM_STRICT_ARGS") == "1":
        return parser.parse_args(argv)  # exits 2: "error: unrecognized arguments: ..."
    args, _unknown = parser.parse_known_args(argv)
    return args


async def serve(args: argparse.Namespace) -> None:
    runner = web.AppRunner(make_app(FakeEngine(args.served_model_name)), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    print(f"sim engine ready on {args.port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> int:
    args = parse_args(sys.argv[1:])
    ledger: Memory
    if os.environ["SIM_LEDGER"] == "torch":
        ledger = TorchMemory(os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    else:
        ledger = Ledger(Path(os.environ["SIM_LEDGER"]))
    try:
        start(ledger, plan_startup(args, ledger))
    except StartupError as exc:
        print(f"{exc.kind}: {exc}", flush=True)
        return 1
    except OutOfMemory as exc:
        print(f"torch.OutOfMemoryError: {exc}", flush=True)
        return 1
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
