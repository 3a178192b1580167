"""More models than memory, end to end through `sem run`: three tiny models loaded on demand on a
CPU budget that holds two. Requests go to all three in turn and every one gets a whole answer
(the gateway queues them while their model loads, evicting the least recently used); once the
requests stop, the loaded models are unloaded after their idle time.

Run on the stand-in engine with the suite, and on real vLLM (`-m vllm`, slow)."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import REPO
from tests.e2e.answers import answer_problem
from tests.e2e.conftest import Engine, StartSem
from tests.e2e.helpers import SemRun, poll

ORDER = ["base", "chat", "third", "base", "chat", "third"]


def elastic_yaml(idle: str) -> str:
    models = REPO / "models"
    entry = f"load: on_demand, idle_unload: {idle}, max_model_len: 512"
    return (
        "devices: cpu\n"
        "cpu_memory_budget: 6.5GiB   # each tiny engine needs ~3.0 GiB: two fit, not three\n"
        "min_residency: 0s\n"
        "models:\n"
        f"  - {{name: base, source: 'path:{models}/tiny-llama-base', {entry}}}\n"
        f"  - {{name: chat, source: 'path:{models}/tiny-llama-chat', {entry}}}\n"
        f"  - {{name: third, source: 'path:{models}/tiny-llama-base', {entry}}}\n"
    )


def events(run: SemRun, kind: str) -> list[dict]:
    every = httpx.get(f"{run.supervisor}/events", params={"limit": 2000}).json()["events"]
    return [e for e in every if e["kind"] == kind]


@pytest.mark.parametrize(
    ("engine", "idle", "timeout"),
    [
        ("fake", "4s", 60.0),
        pytest.param("vllm", "150s", 600.0, marks=[pytest.mark.vllm, pytest.mark.timeout(1800)]),
    ],
)
def test_three_models_on_room_for_two_all_answered_then_unloaded_when_idle(
    start_sem: StartSem, engine: Engine, idle: str, timeout: float
):
    run = start_sem(elastic_yaml(idle), engine=engine,
                    extra_args=("--queue-timeout", str(timeout)))  # fmt: skip
    run.wait_supervisor(timeout=60)
    run.wait_gateway(timeout=60)
    poll(lambda: set(run.model_states().values()) == {"unloaded"}, 30, "all three unloaded")
    problems = []
    with httpx.Client(base_url=run.gateway, timeout=timeout + 30) as client:
        for name in ORDER:
            body = {"model": name, "prompt": "Hello", "max_tokens": 4}
            if problem := answer_problem("/generate", body, client.post("/generate", json=body)):
                problems.append(f"{name}: {problem}")
    assert problems == []
    evicted = events(run, "evicting")
    assert evicted, "the third model needed room: one of the others was evicted"
    assert all(e["message"].startswith("evicted for ") for e in evicted)
    assert len(events(run, "load_measured")) >= 3
    served = time.monotonic()
    poll(lambda: set(run.model_states().values()) == {"unloaded"}, timeout, "idle unloads")
    unloads = [e for e in events(run, "model_unloaded") if e["message"].startswith("idle for")]
    assert unloads, "the models still loaded went on their idle time"
    assert time.monotonic() - served < timeout
