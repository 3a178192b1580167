"""A model listed as hf:// is cached from the (loopback) hub by sem, then served by a real vLLM
engine that starts from the cached snapshot with HF_HUB_OFFLINE=1, the hub already gone."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import REPO
from tests.e2e.conftest import StartSem
from tests.hubrepos import Hub, copy_model


@pytest.mark.vllm
def test_hf_model_is_cached_then_served_offline(
    start_sem: StartSem, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    copy_model(REPO / "models" / "tiny-llama-chat", tmp_path / "hub" / "demo" / "tiny-llama-chat")
    hub = Hub(tmp_path / "hub").start()
    cache_dir = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    try:
        run = start_sem(
            f"devices: cpu\ncache: {{dir: {cache_dir}, margin: 0}}\nmodels:\n"
            "  - {name: chat, source: hf://demo/tiny-llama-chat, max_model_len: 1024}\n",
            engine="vllm",
        )
        deadline = time.monotonic() + 60
        states = []
        while time.monotonic() < deadline:
            assert run.proc is not None and run.proc.poll() is None, run.output()[-3000:]
            try:
                model = httpx.get(f"{run.supervisor}/models/chat", timeout=2).json()
            except httpx.HTTPError:
                time.sleep(0.1)
                continue
            states.append(model["state"])
            if model["state"] not in ("downloading",):
                break
            time.sleep(0.05)
        assert states and states[-1] in ("pending", "starting"), (states, run.output()[-3000:])
        hub.stop()  # from here on nothing can be fetched: the engine must start from the cache

        run.wait_ready(["chat"], timeout=400)
        replica = httpx.get(f"{run.supervisor}/models/chat").json()["replicas"][0]
        engine = psutil.Process(replica["pid"])
        assert engine.environ()["HF_HUB_OFFLINE"] == "1"
        argv = engine.cmdline()
        model_dir = Path(argv[argv.index("--model") + 1])
        assert model_dir.parent.parent.parent == cache_dir, model_dir
        assert (model_dir / "model.safetensors").is_symlink()

        response = httpx.post(
            f"{run.gateway}/generate",
            json={"model": "chat", "prompt": "Hello", "max_tokens": 8, "temperature": 0},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        assert response.json()["text"] and response.json()["usage"]["completion_tokens"] == 8

        cached = httpx.get(f"{run.supervisor}/cache").json()["models"]
        assert [(m["source"], m["last_used"] is not None) for m in cached] == [
            ("hf://demo/tiny-llama-chat", True)
        ]
        events = httpx.get(f"{run.supervisor}/events", params={"subject": "chat"}).json()
        kinds = [e["kind"] for e in events["events"]]
        assert kinds.index("model_downloading") < kinds.index("model_added")
        code, _ = run.stop()
        assert code == 0 and run.leftovers() == []
    finally:
        hub.stop()
