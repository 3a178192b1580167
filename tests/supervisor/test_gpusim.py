"""The simulated GPU box: its ledger, and an engine whose start-up errors fire when vLLM's would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.config import ModelSpec
from supervisor.estimate import estimate
from supervisor.gpu_budget import CONTEXT_COST, utilization
from supervisor.resources import NvmlInventory
from tests.checkpoints import llama2_7b
from tests.conftest import REPO
from tests.gpusim.engine import (
    Startup,
    StartupError,
    check_enough_kv_cache_memory,
    init_device,
    load_and_profile,
    parse_args,
    plan_startup,
    start,
)
from tests.gpusim.ledger import GiB, Ledger, OutOfMemory, SimGpu
from tests.gpusim.nvml import SimNvml

MiB = 1024**2


@pytest.fixture
def box(tmp_path: Path) -> Ledger:
    """The reference box: two 24 GiB GPUs."""
    return Ledger.create(tmp_path / "ledger.json", [SimGpu(0, 24 * GiB), SimGpu(1, 24 * GiB)])


@pytest.fixture
def seven_b(tmp_path: Path) -> Path:
    return llama2_7b(tmp_path / "llama2-7b")


def reservation(folder: Path) -> int:
    spec = ModelSpec(name="m", source=f"path:{folder}", max_model_len=4096)
    return estimate(spec, folder, on_gpu=True).per_device


def startup(
    ledger: Ledger, folder: Path, u: float, gpus: str = "0", tp: int = 1, max_len: int = 4096
) -> Startup:
    args = parse_args(
        [
            "--model",
            str(folder),
            "--served-model-name",
            "m",
            "--port",
            "1",
            "--gpu-memory-utilization",
            str(u),
            "--tensor-parallel-size",
            str(tp),
            "--max-model-len",
            str(max_len),
        ]
    )
    os.environ["CUDA_VISIBLE_DEVICES"] = gpus
    try:
        plan = plan_startup(args, ledger)
    finally:
        del os.environ["CUDA_VISIBLE_DEVICES"]
    return Startup(**{**plan.__dict__, "load_seconds": 0.0, "profile_seconds": 0.0})


def test_ledger_allocates_frees_and_refuses_like_cuda(box: Ledger):
    box.allocate("foreign", 0, 20 * GiB, "tensor")
    assert [g.free for g in box.gpus()] == [4 * GiB, 24 * GiB]
    with pytest.raises(OutOfMemory, match=r"Tried to allocate 5.00 GiB. GPU 0 .* 4.00 GiB is free"):
        box.allocate("foreign", 0, 5 * GiB, "more")
    assert box.free("foreign") == 20 * GiB
    assert box.gpus()[0].free == 24 * GiB


def test_ledger_is_shared_between_processes_and_releases_the_dead_after_a_lag(box: Ledger):
    code = (
        "import os, sys; from pathlib import Path; from tests.gpusim.ledger import Ledger;"
        f"Ledger(Path({str(box.path)!r})).allocate(os.getpid(), 1, 3 * 2**30, 'weights');"
        "print(os.getpid())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout
    pid = int(out)
    assert box.processes(1) == [(pid, 3 * GiB)], "held until the driver notices the exit"
    nvml = NvmlInventory(SimNvml(box.path))
    assert nvml.devices()[1].free == 21 * GiB
    release = Ledger(box.path)
    while release.processes(1):  # the lag (0.3 s) passes; each read checks it
        pass
    assert nvml.devices()[1].free == 24 * GiB


def test_the_reference_7b_starts_on_a_24_gib_gpu_with_its_reservation(box: Ledger, seven_b: Path):
    need = reservation(seven_b)
    s = startup(box, seven_b, utilization(need, 24 * GiB))
    tokens = start(box, s)
    assert tokens >= 2 * 4096, "the estimate's KV cache (two full sequences) fits"
    used = box.held(os.getpid(), 0)
    # It fills its budget less the activation peak (freed after profiling), plus the context.
    assert need - s.activation <= used <= need - s.activation + CONTEXT_COST


def test_start_check_counts_the_context_outside_the_budget(box: Ledger, seven_b: Path):
    """A gap equal to the reservation fails with vLLM's text (seen on an H200)."""
    need = reservation(seven_b)
    box.allocate("foreign", 0, 24 * GiB - need, "tensor")  # exactly `need` free
    s = startup(box, seven_b, utilization(need, 24 * GiB))
    with pytest.raises(StartupError) as failure:
        init_device(box, s)
    assert failure.value.kind == "ValueError"
    assert str(failure.value).startswith(
        "Free memory on device cuda:0 (17.55/24.0 GiB) on startup is less than desired GPU"
        " memory utilization (0.7522, 18.05 GiB)."
    )


def test_another_process_taking_memory_during_loading_counts_as_ours(box: Ledger, seven_b: Path):
    """What two engines starting together on one GPU do to each other."""
    s = startup(box, seven_b, utilization(reservation(seven_b), 24 * GiB))
    init_free, requested = init_device(box, s)
    box.allocate("foreign", 0, 5 * GiB, "other engine's weights")
    consumed = load_and_profile(box, s, init_free)
    with pytest.raises(StartupError, match=r"^No available memory for the cache blocks\."):
        check_enough_kv_cache_memory(requested[0] - consumed[0] - s.activation, s)


def test_free_memory_growing_during_profiling_is_vllms_assertion(box: Ledger, seven_b: Path):
    """Another engine exits while this one loads: more is free after loading than before."""
    box.allocate("foreign", 0, 16 * GiB, "an engine about to exit")
    s = startup(box, seven_b, 0.3)
    init_free, _ = init_device(box, s)
    box.free("foreign")
    with pytest.raises(StartupError, match=r"^Error in memory profiling\. Initial free memory"):
        load_and_profile(box, s, init_free)


def test_a_kv_cache_too_small_for_max_model_len_names_the_longest_that_fits(
    box: Ledger, seven_b: Path
):
    need = reservation(seven_b) - 3 * GiB  # ~1 GiB of KV: 2048 tokens of 0.5 MiB
    s = startup(box, seven_b, utilization(need, 24 * GiB))
    with pytest.raises(StartupError, match=r"max seq len \(4096\).*estimated maximum model len"):
        start(box, s)


def test_tensor_parallel_over_unequal_gpus_needs_u_x_total_free_on_each(tmp_path: Path):
    ledger = Ledger.create(tmp_path / "l.json", [SimGpu(0, 24 * GiB), SimGpu(1, 48 * GiB)])
    folder = llama2_7b(tmp_path / "m")
    spec = ModelSpec(name="m", source=f"path:{folder}", max_model_len=4096, tensor_parallel=2)
    per_device = estimate(spec, folder, on_gpu=True).per_device
    ledger.allocate("foreign", 1, 48 * GiB - per_device - 2 * GiB, "tensor")
    s = startup(ledger, folder, utilization(per_device, 24 * GiB), gpus="0,1", tp=2)
    with pytest.raises(StartupError, match=r"^Free memory on device cuda:1"):
        init_device(ledger, s)
