"""The whole path on real vLLM: `sem run` with the shipped models.yaml serves both demo models
through the gateway, stops on SIGTERM within the bound, and leaves no process behind."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import REPO
from tests.e2e.helpers import ENGINE_PYTHON, SemRun

DEMO = ["tiny-llama-base", "tiny-llama-chat"]


@pytest.fixture
def sem_vllm(tmp_path: Path) -> Iterator[SemRun]:
    if not Path(ENGINE_PYTHON).exists():
        pytest.fail(f"no engine environment at {ENGINE_PYTHON}: run `make install`")
    run = SemRun(config=REPO / "models.yaml", state_dir=tmp_path / "state").start()
    try:
        yield run
    finally:
        run.kill_all()


@pytest.mark.vllm
def test_sem_run_serves_both_demo_models_then_stops_clean(sem_vllm: SemRun):
    sem_vllm.wait_ready(DEMO, timeout=400)

    models = httpx.get(f"{sem_vllm.supervisor}/models").json()["models"]
    for model in models:
        replica = model["replicas"][0]
        cmdline = " ".join(psutil.Process(replica["pid"]).cmdline())
        assert "vllm.entrypoints.openai.api_server" in cmdline, "a real vLLM engine"
        assert Path(replica["log"]).is_file()

    for name in DEMO:
        response = httpx.post(
            f"{sem_vllm.gateway}/generate",
            json={"model": name, "prompt": "Hello", "max_tokens": 8, "temperature": 0},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == name
        assert isinstance(body["text"], str) and body["text"]
        assert body["usage"]["completion_tokens"] == 8
        assert body["finish_reason"] == "length"

    unknown = httpx.post(f"{sem_vllm.gateway}/generate", json={"model": "x", "prompt": "hi"})
    assert unknown.status_code == 404

    code, seconds = sem_vllm.stop(signal.SIGTERM)
    assert code == 0, sem_vllm.output()[-3000:]
    assert seconds < 30
    assert sem_vllm.leftovers() == [], "processes of sem left behind"
    assert "model tiny-llama-chat is ready; try:" in sem_vllm.output()
