"""classify(): vLLM's own start-up error texts, each to the cure it needs."""

from __future__ import annotations

import pytest

from supervisor.start_failure import FailureKind, classify

GiB = 1024**3

# Quoted from tests/gpusim/engine.py, which took them from vLLM 0.32's source.
FREE_MEMORY = (
    "ValueError: Free memory on device cuda:0 (38.77/139.8 GiB) on startup is less than desired"
    " GPU memory utilization (0.2778, 38.84 GiB). Decrease GPU memory utilization or reduce GPU"
    " memory used by other processes."
)
NO_CACHE_BLOCKS = (
    "ValueError: No available memory for the cache blocks. Try increasing"
    " `gpu_memory_utilization` when initializing the engine (this flag also controls CPU memory"
    " reservation on the CPU backend, despite its name). See"
    " https://docs.vllm.ai/en/latest/configuration/conserving_memory/ for more details."
)
KV_TOO_SMALL = (
    "ValueError: To serve at least one request with the model's max seq len (4096), (2.0 GiB KV"
    " cache is needed, which is larger than the available KV cache memory (0.75 GiB). Based on"
    " the available memory, the estimated maximum model length is 1536. Try increasing"
    " `gpu_memory_utilization` (which also controls CPU memory on the CPU backend) or decreasing"
    " `max_model_len` when initializing the engine. See"
    " https://docs.vllm.ai/en/latest/configuration/conserving_memory/ for more details."
)
TORCH_OOM = (
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.95 GiB. GPU 0 has a total"
    " capacity of 23.64 GiB of which 1.02 GiB is free."
)
UNRECOGNIZED = "vllm serve: error: unrecognized arguments: --max-num-seq 4"
BAD_VALUE = "vllm serve: error: argument --dtype: invalid choice: 'fp13'"
UNSUPPORTED_ARCH = "ValueError: Model architectures ['FooForCausalLM'] are not supported for now."
NOT_SUPPORTED = "ValueError: Sleep mode is not supported on current platform."
HEAD_DIM = "RuntimeError: Unsupported CPU attention configuration: head_dim=16"
PYDANTIC = "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig"
MAX_LEN = (
    "ValueError: User-specified max_model_len (65536) is greater than the derived max_model_len"
    " (max_position_embeddings=4096 in model's config.json)."
)


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        (FREE_MEMORY, FailureKind.OUT_OF_MEMORY),
        (NO_CACHE_BLOCKS, FailureKind.OUT_OF_MEMORY),
        (KV_TOO_SMALL, FailureKind.OUT_OF_MEMORY),
        (TORCH_OOM, FailureKind.OUT_OF_MEMORY),
        (UNRECOGNIZED, FailureKind.BAD_CONFIG),
        (BAD_VALUE, FailureKind.BAD_CONFIG),
        (UNSUPPORTED_ARCH, FailureKind.BAD_CONFIG),
        (NOT_SUPPORTED, FailureKind.BAD_CONFIG),
        (HEAD_DIM, FailureKind.BAD_CONFIG),
        (PYDANTIC, FailureKind.BAD_CONFIG),
        (MAX_LEN, FailureKind.BAD_CONFIG),
        ("RuntimeError: Engine core initialization failed.", FailureKind.OTHER),
        ("Segmentation fault (core dumped)", FailureKind.OTHER),
    ],
)
def test_each_vllm_text_is_classified_with_the_engine_line_as_reason(
    line: str, kind: FailureKind
) -> None:
    tail = f"INFO loading weights\nTraceback (most recent call last):\n  File x\n{line}\n"
    failure = classify(1, tail)
    assert failure.kind is kind
    assert failure.line == (line if kind is not FailureKind.OTHER else "")


def test_the_error_a_traceback_ends_with_wins_over_earlier_warnings() -> None:
    tail = f"WARNING feature X is not supported, ignored\n{NO_CACHE_BLOCKS}\n"
    assert classify(1, tail).kind is FailureKind.OUT_OF_MEMORY


def test_the_kv_memory_vllm_found_is_read_from_its_log_even_when_negative() -> None:
    tail = f"Available KV cache memory: -1.25 GiB\n{NO_CACHE_BLOCKS}\n"
    assert classify(1, tail).kv_available == int(-1.25 * GiB)
    assert classify(1, "Available KV cache memory: 3.5 GiB\n").kv_available == int(3.5 * GiB)
    assert classify(1, UNRECOGNIZED).kv_available is None


def test_an_engine_killed_by_a_signal_is_not_judged_by_its_log() -> None:
    assert classify(-9, FREE_MEMORY).kind is FailureKind.OTHER


def test_the_reason_names_the_kind_and_quotes_the_engine() -> None:
    failure = classify(2, UNRECOGNIZED)
    assert failure.describe(2) == f"engine refused its configuration: {UNRECOGNIZED}"
    assert classify(1, "boom").describe(1) == "engine exited with code 1 while starting"
