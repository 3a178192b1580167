"""Scheduling on real vLLM (CPU): a budget that fits exactly two tiny engines. The third model
waits, pending with its reason, until one is removed; then it starts and serves."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from supervisor.procgroup import group_members
from tests.conftest import REPO
from tests.e2e.conftest import StartSem
from tests.e2e.helpers import SemRun

SEM = str(Path(sys.executable).with_name("sem"))


def budget_yaml() -> str:
    models = REPO / "models"
    return (
        "devices: cpu\n"
        "cpu_memory_budget: 6.5GiB   # each tiny engine needs ~3.0 GiB: two fit, not three\n"
        "models:\n"
        f"  - {{name: base, source: 'path:{models}/tiny-llama-base', max_model_len: 512}}\n"
        f"  - {{name: chat, source: 'path:{models}/tiny-llama-chat', max_model_len: 512}}\n"
        f"  - {{name: third, source: 'path:{models}/tiny-llama-base', max_model_len: 512}}\n"
    )


def model(run: SemRun, name: str) -> dict:
    return httpx.get(f"{run.supervisor}/models/{name}").json()


@pytest.mark.vllm
@pytest.mark.timeout(1200)  # three real engine starts, one after a removal
def test_third_model_waits_for_memory_then_serves_after_a_removal(start_sem: StartSem):
    run = start_sem(budget_yaml(), engine="vllm", ready=["base", "chat"], ready_timeout=400)
    third = model(run, "third")
    assert third["state"] == "pending"
    need = re.match(r"needs (\d+\.\d+) GiB on 1 device; largest free is 0\.5 GiB on CPU",
                    third["reason"])  # fmt: skip
    assert need and float(need[1]) == pytest.approx(3.0, abs=0.05), third["reason"]
    assert third["estimate"]["kv_cache"] == 2**30

    admin = ["--admin", run.supervisor]
    resources = subprocess.run([SEM, *admin, "resources"], capture_output=True, text=True,
                               check=True).stdout  # fmt: skip
    assert "base-0" in resources and "chat-0" in resources and "third-0" not in resources

    chat_pid = model(run, "chat")["replicas"][0]["pid"]
    removed = time.monotonic()
    subprocess.run([SEM, *admin, "rm", "chat", "--timeout", "5"], check=True)
    run.wait_ready(["third"], timeout=300)
    took = time.monotonic() - removed

    response = httpx.post(f"{run.gateway}/generate",
                          json={"model": "third", "prompt": "Hello", "max_tokens": 4},
                          timeout=60)  # fmt: skip
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 4
    assert not psutil.pid_exists(chat_pid) or group_members(chat_pid) == []
    assert httpx.get(f"{run.supervisor}/models/chat").status_code == 404

    events = httpx.get(f"{run.supervisor}/events", params={"limit": 2000}).json()["events"]
    released = next(
        e["time"] for e in events if e["kind"] == "released" and e["subject"] == "chat-0"
    )
    placed = next(e["time"] for e in events if e["kind"] == "placed" and e["subject"] == "third-0")
    assert 0 <= placed - released < 1.0, "placed at once on the release, not at the next re-check"
    print(f"third: placed {placed - released:.3f}s after the release, ready {took:.0f}s after rm")

    code, _ = run.stop(signal.SIGTERM)
    assert code == 0
    assert run.leftovers() == []
