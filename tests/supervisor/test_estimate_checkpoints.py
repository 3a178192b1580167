"""Estimates of real checkpoint kinds, each within 10% of what vLLM allocates for its weights.

The expected figure of each test is computed here from the model's published definition, not
from the fixture's header: vLLM (0.32) holds floating tensors in the serving dtype (16 bits
under `dtype: auto`, float32 checkpoints downcast: vllm/config/model.py `_resolve_auto_dtype`),
and quantized tensors as stored (GPTQ/AWQ: 4-bit values packed in int32 plus 16-bit scales and
int32 zeros per group of 128 inputs; FP8: one byte a weight). Its weight memory
(`model_memory_usage`) is what those tensors take on the GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.config import ModelSpec
from supervisor.estimate import EstimateError, MemoryEstimate, estimate
from supervisor.placement import never_fits
from supervisor.units import GiB
from tests import checkpoints

GROUP = 128


def sized(folder: Path, **spec: object) -> MemoryEstimate:
    return estimate(ModelSpec(name="m", source=f"path:{folder}", **spec), folder, on_gpu=True)  # type: ignore[arg-type]


def within_10_percent(got: int, expected: float) -> bool:
    return abs(got - expected) / expected < 0.10


def llama_linear_params(h: int, kv: int, i: int, layers: int) -> int:
    """q, o: h x h; k, v: kv_dim x h; gate, up, down: h x i."""
    return layers * (2 * h * h + 2 * kv * h + 3 * h * i)


# Llama-2-7B: 6.74 B parameters, of which 2 x 32000 x 4096 in embeddings and lm_head.
LLAMA2_LINEAR = llama_linear_params(4096, 4096, 11008, 32)
LLAMA2_EMBED = 2 * 32000 * 4096
LLAMA2_PARAMS = 6.74e9


def test_float16_llama2_7b(tmp_path: Path):
    need = sized(checkpoints.llama2_7b(tmp_path / "m"), max_model_len=4096)
    assert within_10_percent(need.weights, LLAMA2_PARAMS * 2)


def test_float32_checkpoint_is_served_in_16_bits_and_fits_24_gib(tmp_path: Path):
    folder = checkpoints.llama2_7b_fp32(tmp_path / "m")
    need = sized(folder, max_model_len=4096)
    assert within_10_percent(need.weights, LLAMA2_PARAMS * 2), "auto downcasts float32"
    assert need.per_device < 19 * GiB
    assert never_fits(need.per_device, 1, [("GPU0", 24 * GiB)]) is None
    explicit = sized(folder, max_model_len=4096, engine_args={"dtype": "float32"})
    assert within_10_percent(explicit.weights, LLAMA2_PARAMS * 4), "an explicit dtype wins"


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_4bit_checkpoints_count_packed_int32_scales_and_zeros(tmp_path: Path, method: str):
    need = sized(checkpoints.llama2_7b_quantized(tmp_path / "m", method), max_model_len=4096)
    # 4 bits a weight, a 16-bit scale and a 4-bit zero per 128 inputs; embeddings in 16 bits.
    # TheBloke/Llama-2-7B-GPTQ's model.safetensors is 3.90 GB.
    linear_bytes = LLAMA2_LINEAR * (4 + 16 / GROUP + 4 / GROUP) / 8
    expected = linear_bytes + LLAMA2_EMBED * 2
    assert within_10_percent(need.weights, expected)
    assert 3.6e9 < need.weights < 4.2e9


def test_4bit_weights_ignore_an_explicit_dtype_but_their_scales_follow_it(tmp_path: Path):
    folder = checkpoints.llama2_7b_quantized(tmp_path / "m", "gptq")
    half = sized(folder, engine_args={"dtype": "float16"}).weights
    full = sized(folder, engine_args={"dtype": "float32"}).weights
    # Only the floating tensors (embeddings, norms, scales) double: far from 2x.
    assert 1.1 < full / half < 1.6


def test_fp8_checkpoint_counts_one_byte_a_weight(tmp_path: Path):
    need = sized(checkpoints.llama3_8b_fp8(tmp_path / "m"), max_model_len=8192)
    # Llama-3-8B: FP8 linear weights, bfloat16 embeddings and lm_head (published: 9.08 GB).
    expected = llama_linear_params(4096, 1024, 14336, 32) + 2 * 128256 * 4096 * 2
    assert within_10_percent(need.weights, expected)
    assert need.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2, "KV cache stays bfloat16 (auto)"


def test_moe_counts_every_expert(tmp_path: Path):
    need = sized(checkpoints.mixtral_8x7b(tmp_path / "m"), max_model_len=32768)
    # Mixtral-8x7B: 46.7 B parameters, all experts resident, bfloat16.
    assert within_10_percent(need.weights, 46.7e9 * 2)
    assert need.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2


def test_falcon_7b_reads_n_layer_n_head_and_multi_query(tmp_path: Path):
    need = sized(checkpoints.falcon_7b(tmp_path / "m"))
    assert within_10_percent(need.weights, 6.92e9 * 2)  # falcon-7b: 6.92 B parameters
    assert need.kv_bytes_per_token == 2 * 32 * 1 * 64 * 2, "multi-query: one KV head"
    assert need.kv_tokens == 2 * 2048, "no length key: vLLM's default 2048"


def test_kv_heads_below_tensor_parallel_are_replicated_on_each_rank(tmp_path: Path):
    folder = checkpoints.falcon_7b(tmp_path / "m")
    one, two = sized(folder), sized(folder, tensor_parallel=2)
    assert two.kv_bytes_per_token == one.kv_bytes_per_token, "max(1, 1 // 2) = 1 head a rank"
    assert two.kv_cache == 2 * one.kv_cache
    assert two.weights == one.weights, "weights split across ranks, not copied"


def test_gpt2_keys_and_a_config_without_torch_dtype(tmp_path: Path):
    need = sized(checkpoints.gpt2(tmp_path / "m"))
    # gpt2: 124.4 M float32 parameters; vLLM downcasts float32 to 16 bits under dtype auto.
    assert within_10_percent(need.weights, 124.4e6 * 2)
    assert need.kv_bytes_per_token == 2 * 12 * 12 * 64 * 2
    assert need.kv_tokens == 2 * 1024, "n_positions is GPT-2's max_position_embeddings"


def test_an_unknown_dtype_is_refused_by_name(tmp_path: Path):
    folder = checkpoints.llama2_7b(tmp_path / "m")
    with pytest.raises(EstimateError, match=r"engine_args\.dtype 'fp8' is not one of"):
        sized(folder, engine_args={"dtype": "fp8"})


def test_the_cpu_demo_model_stays_about_3_gib(tmp_path: Path):
    folder = checkpoints.tiny_llama(tmp_path / "m")
    need = estimate(ModelSpec(name="m", source=f"path:{folder}"), folder, on_gpu=False)
    assert need.kv_cache == 1 * GiB and need.weights < 2 * 2**20, "0.56 M parameters"
    assert 3 * GiB <= need.total < 3.01 * GiB
