"""The whole path on real vLLM: `sem run` with the shipped models.yaml serves both demo models
through the gateway, stops on SIGTERM within the bound, and leaves no process behind."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from tests.conftest import REPO
from tests.e2e.conftest import StartSem

DEMO = ["tiny-llama-base", "tiny-llama-chat"]


@pytest.mark.vllm
def test_sem_run_serves_both_demo_models_then_stops_clean(start_sem: StartSem):
    sem_vllm = start_sem(REPO / "models.yaml", engine="vllm", ready=DEMO, ready_timeout=400)

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

    check_openai_sdk(sem_vllm.gateway)

    code, seconds = sem_vllm.stop(signal.SIGTERM)
    assert code == 0, sem_vllm.output()[-3000:]
    assert seconds < 30
    assert sem_vllm.leftovers() == [], "processes of sem left behind"
    assert "model tiny-llama-chat is ready; try:" in sem_vllm.output()


def check_openai_sdk(gateway: str) -> None:
    """The official OpenAI SDK, pointed at the gateway, against the real engines."""
    api = openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused")
    assert sorted(m.id for m in api.models.list().data) == DEMO
    request = {"model": "tiny-llama-base", "prompt": "Hello", "max_tokens": 12, "temperature": 0}
    whole = api.completions.create(**request).choices[0].text
    chunks = [c.choices[0].text for c in api.completions.create(**request, stream=True)]
    assert len(chunks) > 1 and "".join(chunks) == whole, "streamed = non-streamed at temperature 0"
    chat = api.chat.completions.create(
        model="tiny-llama-chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
        temperature=0, stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    usage = [c.usage for c in chat if c.usage]
    assert usage and usage[-1].completion_tokens == 6
    streamed = httpx.post(f"{gateway}/generate", json={**request, "stream": True}, timeout=60).text
    events = [line[6:] for line in streamed.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["text"] for e in events[:-1]) == whole
