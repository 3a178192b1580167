"""Real vLLM through the Ray backend: `sem run` with `cluster:` in models.yaml starts the engine
on a node of a local two-node cluster, and the gateway serves a completion from it.

The nodes declare no GPU memory, so each node agent measures its machine as a single box does
(NVML GPUs, else the CPU). Slow (an engine start); the lead runs it (`-m "vllm and ray"`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.cluster.local_ray import LocalRay, cluster_yaml, local_cluster
from tests.conftest import REPO
from tests.e2e.helpers import ENGINE_PYTHON, SemRun

pytestmark = [pytest.mark.vllm, pytest.mark.ray]
CHAT = REPO / "models" / "tiny-llama-chat"


@pytest.fixture(scope="module")
def measured_nodes() -> Iterator[LocalRay]:
    with local_cluster(["head", "a"], gpus=0, gpu_gib=0) as cluster:
        yield cluster


@pytest.mark.timeout(900)
def test_a_vllm_engine_on_a_cluster_node_serves_through_the_gateway(
    measured_nodes: LocalRay, tmp_path: Path
):
    if not Path(ENGINE_PYTHON).exists():
        pytest.fail(f"no engine environment at {ENGINE_PYTHON}: run `make install`")
    config = tmp_path / "models.yaml"
    model = f"  - name: chat\n    source: path:{CHAT}\n    max_model_len: 512\n"
    config.write_text(cluster_yaml(measured_nodes.address, model))
    run = SemRun(config=config, state_dir=tmp_path / "state").start()
    try:
        run.wait_ready(["chat"], timeout=600)
        body = {"model": "chat", "prompt": "Hello", "max_tokens": 8}
        answer = httpx.post(f"{run.gateway}/v1/completions", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["text"]
        assert run.stop(timeout=120)[0] == 0
        assert run.leftovers() == []
    finally:
        run.kill_all()
