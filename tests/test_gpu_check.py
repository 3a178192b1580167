"""scripts/gpu_check.py: its checks on the simulated GPU box (CI), and on a real one (`gpu`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scripts.gpu_check import GiB, Release, Report, Seams, run_checks
from tests.checkpoints import llama2_7b
from tests.conftest import REPO
from tests.gpusim.box import SimBox
from tests.gpusim.ledger import SimGpu
from tests.supervisor.test_nvml import has_gpu

FAST = {"SIM_LOAD_SECONDS": "0.1", "SIM_PROFILE_SECONDS": "0.05", "SIM_WEIGHTS_FACTOR": "0.1"}


def sim_seams(tmp_path: Path, gpus: list[SimGpu]) -> Seams:
    sim = SimBox.create(tmp_path, gpus)

    async def hold(index: int, leave_free: int) -> Release:
        free = next(g.free for g in sim.ledger.gpus() if g.index == index)
        sim.ledger.allocate("foreign", index, free - leave_free, "another user's job")

        async def release() -> None:
            sim.ledger.free("foreign", index)

        return release

    return Seams(sim.nvml, sim.nvml(), sim.engine_command(**FAST),
                 llama2_7b(tmp_path / "llama2-7b"), hold, "stand-in (simulated)")  # fmt: skip


async def checks_on(tmp_path: Path, gpus: list[SimGpu]) -> Report:
    report, devices = await run_checks(sim_seams(tmp_path, gpus), tmp_path, timeout=30)
    print(report.render("stand-in (simulated)", devices))
    return report


def outcomes(report: Report) -> dict[str, bool]:
    return {name: ok for name, ok, _ in report.checks}


async def test_the_reference_scenarios_pass_on_two_simulated_24gib_gpus(tmp_path: Path):
    report = await checks_on(tmp_path, [SimGpu(0, 24 * GiB), SimGpu(1, 24 * GiB)])
    found = outcomes(report)
    assert {k: found[k] for k in ("two models", "third waits", "removal frees",
            "two engines killed together")} == dict.fromkeys(
        ("two models", "third waits", "removal frees", "two engines killed together"), True
    ), report.checks  # fmt: skip
    assert report.replace_seconds is not None and report.replace_seconds < 10
    rows = {rid: (reserved, used) for rid, _, reserved, used in report.engines}
    reserved, used = rows["a-0"]
    # NVML: the budget, plus the CUDA context, less the activation peak the sim engine frees.
    assert abs(used - reserved) < 1.5 * GiB, (used, reserved)
    assert any("a-0:" in d for d in report.decisions)


async def test_tight_packing_waits_instead_of_failing_on_one_simulated_gpu(tmp_path: Path):
    report = await checks_on(tmp_path, [SimGpu(0, 48 * GiB)])
    assert outcomes(report)["tight packing waits"], report.checks
    assert report.passed


def test_a_failed_check_is_reported_and_fails_the_run():
    report = Report()
    report.check("two models", True, "one per GPU")
    report.check("third waits", False, "placed: no reason to wait")
    assert not report.passed
    assert "FAIL third waits: placed: no reason to wait" in report.render("x", [])


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="no NVIDIA GPU here (nvidia-smi finds none)")
def test_gpu_check_passes_on_this_box(tmp_path: Path):
    done = subprocess.run([sys.executable, "scripts/gpu_check.py", "--workdir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=3000)  # fmt: skip
    print(done.stdout, done.stderr)
    assert done.returncode == 0, done.stdout[-3000:]
