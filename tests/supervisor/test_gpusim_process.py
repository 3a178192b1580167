"""The simulated engine as a real process, spawned with vLLM's flags, seen through the NVML
stand-in while it runs and after it is killed."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from supervisor.engine import LaunchPlan, free_port, spawn_engine
from supervisor.gpu_budget import CONTEXT_COST, utilization
from supervisor.resources import detect
from tests.checkpoints import llama2_7b
from tests.conftest import REPO
from tests.gpusim.box import SimBox
from tests.gpusim.ledger import GiB, Ledger, SimGpu
from tests.gpusim.nvml import SimNvml


def spawn(ledger: Ledger, folder: Path, utilization: float) -> subprocess.Popen[str]:
    argv = [
        sys.executable,
        "-m",
        "tests.gpusim.engine",
        "--model",
        str(folder),
        "--served-model-name",
        "m",
        "--host",
        "127.0.0.1",
        "--port",
        str(free_port()),
        "--gpu-memory-utilization",
        f"{utilization:.4f}",
        "--max-model-len",
        "4096",
    ]
    env = {
        "PYTHONPATH": str(REPO),
        "SIM_LEDGER": str(ledger.path),
        "CUDA_VISIBLE_DEVICES": "0",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "SIM_LOAD_SECONDS": "0.2",
        "PATH": "/usr/bin",
    }
    return subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO
    )


def read_until(proc: subprocess.Popen[str], marker: str) -> list[str]:
    """The engine's output lines up to the one holding `marker` (or its exit)."""
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip())
        if marker in line:
            break
    return lines


def test_started_engine_holds_memory_then_the_driver_frees_it_after_sigkill(tmp_path: Path):
    ledger = Ledger.create(tmp_path / "ledger.json", [SimGpu(0, 24 * GiB), SimGpu(1, 24 * GiB)])
    inventory = detect("gpu", "auto", environ={}, nvml=lambda: SimNvml(ledger.path))
    proc = spawn(ledger, llama2_7b(tmp_path / "m"), 0.7522)
    try:
        lines = read_until(proc, "sim engine ready")
        assert any(line.startswith("GPU KV cache size:") for line in lines), lines
        ((pid, held),) = ledger.processes(0)
        assert pid == proc.pid
        budget = int(0.7522 * 24 * GiB)
        assert budget - 1.1 * GiB < held < budget + CONTEXT_COST, "budget - activation + context"
        assert inventory.devices()[0].free == 24 * GiB - held
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while ledger.processes(0) and time.monotonic() < deadline:
        pass  # each read checks whether the ledger's release lag has passed
    assert inventory.devices()[0].free == 24 * GiB


def test_a_failed_start_exits_1_with_vllms_error_line(tmp_path: Path):
    ledger = Ledger.create(tmp_path / "ledger.json", [SimGpu(0, 24 * GiB)])
    ledger.allocate("foreign", 0, 10 * GiB, "tensor")
    proc = spawn(ledger, llama2_7b(tmp_path / "m"), 0.7522)
    lines = read_until(proc, "never printed")
    assert proc.wait(timeout=30) == 1
    assert lines[-1].startswith("ValueError: Free memory on device cuda:0 (13.49/24.0 GiB)")
    assert ledger.processes(0) in ([], [(proc.pid, CONTEXT_COST)])


@pytest.mark.parametrize("gpus", ["0", "GPU-51510000"])
def test_cuda_visible_devices_by_index_or_uuid_prefix(tmp_path: Path, gpus: str):
    ledger = Ledger.create(tmp_path / "ledger.json", [SimGpu(0, 24 * GiB), SimGpu(1, 24 * GiB)])
    inventory = detect(
        "auto", "auto", environ={"CUDA_VISIBLE_DEVICES": gpus}, nvml=lambda: SimNvml(ledger.path)
    )
    assert [d.id for d in inventory.devices()] == ["0"]


async def test_sem_spawns_the_sim_engine_with_vllms_flags_and_env(tmp_path: Path):
    """engine.py's real command line and environment (CUDA_VISIBLE_DEVICES from the placement,
    --gpu-memory-utilization from the reservation) start a simulated engine on GPU 1."""
    sim = SimBox.create(tmp_path, [SimGpu(0, 24 * GiB), SimGpu(1, 24 * GiB)])
    folder = llama2_7b(tmp_path / "m")
    plan = LaunchPlan(
        replica_id="m-0", served_name="m", model=str(folder), port=free_port(),
        log_path=tmp_path / "m-0.log", max_num_seqs=8, max_model_len=4096, gpu_ids=(1,),
        gpu_memory_utilization=utilization(int(18.05 * GiB), 24 * GiB),
        engine_args={"enable_prefix_caching": True},
    )  # fmt: skip
    engine = await spawn_engine(sim.engine_command(SIM_LOAD_SECONDS="0.1"), plan, "t", {})
    try:
        async with aiohttp.ClientSession() as session:
            while engine.returncode is None:
                try:
                    async with session.get(f"http://127.0.0.1:{plan.port}/health") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
        assert engine.returncode is None, plan.log_path.read_text()
        (device,) = [d for d in sim.inventory().devices() if d.id == "1"]
        assert 24 * GiB - device.free > 17 * GiB, "GPU 1 holds the engine's memory"
        assert sim.ledger.processes(0) == []
    finally:
        await engine.stop(grace=5)
