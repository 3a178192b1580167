"""Chaos on real vLLM: two models, 32 concurrent clients mixing streams and not, /generate and
the OpenAI routes, while an engine's worker is killed, then an engine's API process, then an
engine is frozen (SIGSTOP, never continued). Every request must complete with a complete output,
each engine must come back to ready, and nothing may be left behind."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import httpx
import psutil
import pytest

from tests.e2e.answers import answer_problem
from tests.e2e.conftest import StartSem
from tests.e2e.helpers import SLOW_RESTARTS, Load, SemRun, demo_pair_yaml, poll

MAX_TOKENS = 24

# (path, model, stream): every mix of route, model and streaming the gateway offers.
KINDS = [
    ("/generate", "base", False), ("/generate", "chat", True),
    ("/v1/completions", "base", True), ("/v1/completions", "chat", False),
    ("/v1/chat/completions", "chat", True), ("/v1/chat/completions", "chat", False),
]  # fmt: skip


def request_body(path: str, model: str, stream: bool, n: int) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": MAX_TOKENS, "temperature": 0,
                            "stream": stream, "ignore_eos": True}  # fmt: skip
    if stream and path != "/generate":
        body["stream_options"] = {"include_usage": True}  # the tokens counted by the engine
    if path.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": f"Tell me a story {n}"}]
    else:
        body["prompt"] = f"Once upon a time {n}"
    return body


def chaos_request(client: httpx.Client, worker: int, n: int) -> str | None:
    """One request of a worker's kind (route, model, streaming); what is wrong, or None."""
    path, model, stream = KINDS[worker % len(KINDS)]
    body = request_body(path, model, stream, worker * 1000 + n)
    problem = answer_problem(path, body, client.post(path, json=body))
    return problem and f"{path} {model} stream={stream}: {problem}"


def replica(run: SemRun, model: str) -> dict[str, Any]:
    data = httpx.get(f"{run.supervisor}/models/{model}", timeout=10).json()
    return dict(data["replicas"][0])


def wait_restarted(run: SemRun, model: str, old_pid: int) -> float:
    """Until the model's replica is ready again on a new engine process; the seconds it took."""

    def restarted() -> bool:
        r = replica(run, model)
        return r["state"] == "ready" and r["pid"] != old_pid

    return poll(restarted, 300, lambda: f"{model} ready again:\n{run.output()[-3000:]}", 0.5)


def worker_of(api_pid: int) -> int:
    """The engine's worker (or engine core) process: the deepest descendant of the API process."""
    procs = [p for p in psutil.Process(api_pid).children(recursive=True)
             if "VLLM" in p.name() or "VLLM" in " ".join(p.cmdline())]  # fmt: skip
    assert procs, "no VLLM::EngineCore / Worker process under the API process"
    return procs[-1].pid


FAULTS = [
    ("kill -9 the engine's worker", "base", lambda pid: os.kill(worker_of(pid), signal.SIGKILL)),
    ("kill -9 the engine's API process", "chat", lambda pid: os.kill(pid, signal.SIGKILL)),
    ("SIGSTOP the engine, never continued", "base", lambda pid: os.killpg(pid, signal.SIGSTOP)),
]


@pytest.mark.vllm
@pytest.mark.timeout(1200)
def test_chaos_every_request_completes(start_sem: StartSem):
    run = start_sem(demo_pair_yaml(max_num_seqs=32), engine="vllm", ready=["base", "chat"],
                    ready_timeout=400, extra_args=SLOW_RESTARTS)  # fmt: skip
    report = []
    for what, model, inject in FAULTS:
        load = Load(run.gateway, chaos_request, workers=32, timeout=300).start()
        time.sleep(3)  # the load is in full swing, streams half-way
        before = run.retries(model)
        pid = replica(run, model)["pid"]
        inject(pid)
        recovery = wait_restarted(run, model, pid)
        load.wait_for(load.sent + 32, timeout=120)  # some requests on the restarted engine too
        load.stop()
        after = run.retries(model)
        replayed, resumed = (after[k] - before[k] for k in ("replay", "resume"))
        assert load.failures == [], f"{what}: {load.failures[:5]}"
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
        # The fault hit requests in flight on both sides: streams half-way went on elsewhere
        # (resume), answers not begun were sent again (replay).
        assert resumed >= 1, f"{what}: no stream was resumed ({after})"
        assert replayed >= 1, f"{what}: no request was replayed ({after})"
        report.append(
            f"{what}: {load.sent} requests, {len(load.failures)} failed, {replayed:.0f} replayed,"
            f" {resumed:.0f} resumed, ready again after {recovery:.1f}s"
        )
    code, _ = run.stop(timeout=60)
    assert code == 0
    assert run.leftovers() == [], "no orphan process"
    print("\n" + "\n".join(report))
