"""Placement as a pure decision, and memory estimates from config.json + safetensors headers."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.config import ModelSpec
from supervisor.estimate import estimate
from supervisor.placement import DeviceView, Request, never_fits, plan
from supervisor.units import GiB
from tests.checkpoints import llama2_7b

FREE_GPUS = [
    DeviceView("0", "GPU0", 24 * GiB, 24 * GiB, 0),
    DeviceView("1", "GPU1", 24 * GiB, 24 * GiB, 0),
]
SEVEN_B = int(18.1 * GiB)


def test_llama2_7b_weights_estimate_within_5_percent(tmp_path: Path):
    folder = llama2_7b(tmp_path / "llama2-7b")
    spec = ModelSpec(name="l", source=f"path:{folder}", max_model_len=4096)
    need = estimate(spec, folder, on_gpu=True)
    assert abs(need.weights - 13.5e9) / 13.5e9 < 0.05
    assert need.kv_bytes_per_token == 2 * 32 * 32 * 128 * 2  # 0.5 MiB per token in float16
    assert need.kv_tokens == 2 * 4096
    assert need.kv_cache == 4 * GiB
    assert 17.5 * GiB < need.total < 18.5 * GiB


def test_estimate_follows_dtype_kv_tokens_and_tensor_parallel(tmp_path: Path):
    folder = llama2_7b(tmp_path / "m")
    base = ModelSpec(name="l", source=f"path:{folder}", max_model_len=4096)
    fp32 = base.model_copy(update={"engine_args": {"dtype": "float32"}})
    assert estimate(fp32, folder, True).weights == 2 * estimate(base, folder, True).weights
    short = base.model_copy(update={"kv_cache_tokens": 1024})
    assert estimate(short, folder, True).kv_cache == 1024 * 2 * 32 * 32 * 128 * 2
    tp2 = base.model_copy(update={"tensor_parallel": 2})
    assert estimate(tp2, folder, True).per_device < estimate(base, folder, True).per_device


def test_memory_in_the_spec_overrides_the_estimate():
    spec = ModelSpec(name="l", source="path:/x", memory="20GiB")
    assert estimate(spec, None, on_gpu=True).total == 20 * GiB


def test_two_7b_models_land_one_per_gpu_and_a_third_waits_with_numbers():
    requests = [Request(f"m{i}-0", SEVEN_B, seq=i) for i in range(3)]
    decision = plan(requests, FREE_GPUS)
    assert [(p.replica_id, p.device_ids) for p in decision.placements] == [
        ("m0-0", ("0",)), ("m1-0", ("1",)),
    ]  # fmt: skip
    assert [w.replica_id for w in decision.waits] == ["m2-0"]
    assert decision.waits[0].reason == (
        "needs 18.10 GiB + 0.51 GiB context on 1 GPU; largest free is 5.9 GiB on GPU0"
    )


def test_best_fit_picks_the_tightest_gpu():
    devices = [
        DeviceView("0", "GPU0", 24 * GiB, 24 * GiB, 0),
        DeviceView("1", "GPU1", 24 * GiB, 24 * GiB, 14 * GiB),
    ]
    decision = plan([Request("small-0", 8 * GiB)], devices)
    assert decision.placements[0].device_ids == ("1",)


def test_measured_free_memory_counts_too():
    """Another process using GPU0 (NVML free is low) sends the model to GPU1."""
    devices = [
        DeviceView("0", "GPU0", 24 * GiB, 6 * GiB, 0),
        DeviceView("1", "GPU1", 24 * GiB, 24 * GiB, 0),
    ]
    assert plan([Request("m-0", SEVEN_B)], devices).placements[0].device_ids == ("1",)


def test_tensor_parallel_2_waits_for_both_gpus():
    half_used = [FREE_GPUS[0], DeviceView("1", "GPU1", 24 * GiB, 24 * GiB, 20 * GiB)]
    decision = plan([Request("big-0", 12 * GiB, devices=2)], half_used)
    assert decision.placements == []
    assert "only 1 GPU(s) have that free (GPU0)" in decision.waits[0].reason
    decision = plan([Request("big-0", 12 * GiB, devices=2)], FREE_GPUS)
    assert decision.placements[0].device_ids == ("0", "1")


def test_one_engine_starting_per_gpu():
    starting = [
        DeviceView("0", "GPU0", 24 * GiB, 24 * GiB, 4 * GiB, starting=True),
        DeviceView("1", "GPU1", 24 * GiB, 24 * GiB, 20 * GiB),
    ]
    decision = plan([Request("m-0", 8 * GiB)], starting)
    assert "another engine is starting on it" in decision.waits[0].reason


def test_priority_first_then_arrival():
    requests = [Request("low-0", SEVEN_B, seq=0), Request("high-0", SEVEN_B, priority=5, seq=1),
                Request("mid-0", SEVEN_B, priority=1, seq=2)]  # fmt: skip
    decision = plan(requests, FREE_GPUS)
    assert [p.replica_id for p in decision.placements] == ["high-0", "mid-0"]


def test_small_models_backfill_until_the_large_one_waited_too_long():
    one_gpu = [DeviceView("0", "GPU0", 24 * GiB, 24 * GiB, 10 * GiB)]
    large = Request("large-0", 20 * GiB, seq=0, waited=5)
    small = Request("small-0", 4 * GiB, seq=1)
    assert [p.replica_id for p in plan([large, small], one_gpu).placements] == ["small-0"]
    starving = Request("large-0", 20 * GiB, seq=0, waited=120)
    decision = plan([starving, small], one_gpu, starvation_guard=60)
    assert decision.placements == []
    assert "queued behind large-0" in decision.waits[1].reason


@pytest.mark.parametrize(
    ("need", "devices", "expected"),
    [
        (30 * GiB, 1, "needs 30.00 GiB on each of 1 device; the largest GPU0 has 24.0 GiB in all"),
        (8 * GiB, 4, "needs 4 GPUs; there are 2"),
        (8 * GiB, 2, None),
    ],
)
def test_never_fits(need, devices, expected):
    assert never_fits(need, devices, [("GPU0", 24 * GiB), ("GPU1", 24 * GiB)]) == expected


def test_plan_does_not_mutate_its_inputs():
    requests = [Request(f"m{i}-0", SEVEN_B, seq=i) for i in range(3)]
    before = (list(requests), list(FREE_GPUS))
    plan(requests, FREE_GPUS)
    assert (requests, FREE_GPUS) == before
