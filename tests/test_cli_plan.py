"""`sem plan`: placement for a config and an inventory given on the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.checkpoints import llama2_7b
from tests.conftest import REPO

SEM = str(Path(sys.executable).with_name("sem"))


def test_plan_puts_two_7b_one_per_gpu_and_says_why_the_third_waits(tmp_path: Path):
    folder = llama2_7b(tmp_path / "llama2-7b")
    config = tmp_path / "box.yaml"
    config.write_text(
        "models:\n"
        + "".join(
            f"  - {{name: {n}, source: 'path:{folder}', max_model_len: 4096}}\n"
            for n in ("llama-a", "llama-b", "llama-c")
        )
        + "  - {name: huge, source: 'path:/x', memory: 40GiB}\n"
    )
    out = subprocess.run(
        [SEM, "plan", str(config), "--inventory", "2x24GiB"],
        capture_output=True, text=True, check=True, cwd=REPO,
    ).stdout  # fmt: skip
    lines = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert "placed" in lines["llama-a-0"] and "on GPU0" in lines["llama-a-0"]
    assert "placed" in lines["llama-b-0"] and "on GPU1" in lines["llama-b-0"]
    assert "pending" in lines["llama-c-0"]
    assert "largest free is 5.9 GiB" in lines["llama-c-0"]
    assert "rejected" in lines["huge-0"] and "24.0 GiB in all" in lines["huge-0"]
    assert "18.1 GiB" in lines["llama-a-0"]


def test_plan_on_the_shipped_config_with_a_cpu_budget():
    out = subprocess.run(
        [SEM, "plan", "models.yaml", "--inventory", "cpu:4GiB"],
        capture_output=True, text=True, check=True, cwd=REPO,
    ).stdout  # fmt: skip
    assert "tiny-llama-base-0" in out and "placed" in out
    assert "pending" in out, "two ~3 GiB engines do not fit in 4 GiB"


def test_plan_rejects_a_bad_inventory():
    result = subprocess.run(
        [SEM, "plan", "models.yaml", "--inventory", "lots"], capture_output=True, text=True,
        cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 1
    assert "--inventory" in result.stderr and "not a size" in result.stderr


def test_plan_over_two_nodes_spreads_replicas_and_keeps_a_tensor_parallel_one_on_one_node(
    tmp_path: Path,
):
    folder = llama2_7b(tmp_path / "llama2-7b")
    config = tmp_path / "cluster.yaml"
    config.write_text(
        "models:\n"
        f"  - {{name: chat, source: 'path:{folder}', max_model_len: 4096, replicas: 2}}\n"
        f"  - {{name: wide, source: 'path:{folder}', max_model_len: 4096, tensor_parallel: 2}}\n"
    )
    out = subprocess.run(
        [SEM, "plan", str(config), "--inventory", "a=1x24GiB; b=1x24GiB; c=2x24GiB"],
        capture_output=True, text=True, check=True, cwd=REPO,
    ).stdout  # fmt: skip
    assert out.startswith("devices: GPUa/0 GPU 0 on a 24.0 GiB, GPUb/0"), out
    lines = {line.split()[0]: line for line in out.splitlines()[2:]}
    nodes = {lines[f"chat-{i}"].split(" on GPU")[1][0] for i in (0, 1)}
    assert len(nodes) == 2, f"two replicas of one model on two nodes: {lines}"
    assert (
        "placed" in lines["wide-0"] and "GPUc/0" in lines["wide-0"] and "GPUc/1" in lines["wide-0"]
    )


def test_plan_names_the_node_of_a_bad_inventory():
    result = subprocess.run(
        [SEM, "plan", "models.yaml", "--inventory", "a=2x24GiB; b=lots"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 1
    assert "--inventory: node b: 'lots' is not a size" in result.stderr
