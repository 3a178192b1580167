"""Chaos on real vLLM: two models, 32 concurrent clients mixing streams and not, /generate and
the OpenAI routes, while an engine's worker is killed, then an engine's API process, then an
engine is frozen (SIGSTOP, never continued). Every request must complete with a complete output,
each engine must come back to ready, and nothing may be left behind."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import REPO
from tests.e2e.helpers import ENGINE_PYTHON, Load, SemRun, poll

CONFIG = """\
models:
  - name: base
    source: path:{repo}/models/tiny-llama-base
    max_model_len: 512
    max_num_seqs: 32
  - name: chat
    source: path:{repo}/models/tiny-llama-chat
    max_model_len: 512
    max_num_seqs: 32
"""
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
    if path.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": f"Tell me a story {n}"}]
    else:
        body["prompt"] = f"Once upon a time {n}"
    return body


def complete(path: str, stream: bool, response: httpx.Response) -> str | None:
    """None if the answer is whole (every token asked for, properly ended), else what is wrong."""
    if response.status_code != 200:
        return f"{response.status_code} {response.text[:200]}"
    if not stream:
        data = response.json()
        choice = data if path == "/generate" else data["choices"][0]
        ok = choice.get("finish_reason") == "length"
        tokens = data.get("usage", {}).get("completion_tokens")
        return None if ok and tokens == MAX_TOKENS else f"incomplete: {str(data)[:200]}"
    events = [e[6:] for e in response.text.split("\n\n") if e.startswith("data: ")]
    if not events or events[-1] != "[DONE]" or events.count("[DONE]") != 1:
        return f"stream not ended by one [DONE]: {response.text[-200:]}"
    chunks = [json.loads(e) for e in events[:-1]]
    if any("error" in c for c in chunks):
        return f"error event: {response.text[-300:]}"
    finished = [c for c in chunks if (c.get("finish_reason") if path == "/generate" else
                any(ch.get("finish_reason") for ch in c.get("choices", [])))]  # fmt: skip
    return None if len(finished) == 1 else f"stream without one finish: {response.text[-200:]}"


def chaos_request(client: httpx.Client, worker: int, n: int) -> str | None:
    """One request of a worker's kind (route, model, streaming); what is wrong, or None."""
    path, model, stream = KINDS[worker % len(KINDS)]
    body = request_body(path, model, stream, worker * 1000 + n)
    problem = complete(path, stream, client.post(path, json=body))
    return problem and f"{path} {model} stream={stream}: {problem}"


def replica(run: SemRun, model: str) -> dict[str, Any]:
    data = httpx.get(f"{run.supervisor}/models/{model}", timeout=10).json()
    return dict(data["replicas"][0])


def restarted(run: SemRun, model: str, old_pid: int) -> Callable[[], bool]:
    """Is the model's replica ready again, on a new engine process?"""

    def check() -> bool:
        r = replica(run, model)
        return r["state"] == "ready" and r["pid"] != old_pid

    return check


def retries(run: SemRun) -> dict[str, float]:
    text = httpx.get(f"{run.gateway}/metrics", timeout=10).text
    found: dict[str, float] = {"replay": 0.0, "resume": 0.0}
    for kind, value in re.findall(
        r'sem_gateway_retries_total\{kind="(\w+)",model="\w+"\} (\S+)', text
    ):
        found[kind] += float(value)
    return found


def worker_of(api_pid: int) -> int:
    """The engine's worker (or engine core) process: the deepest descendant of the API process."""
    procs = [p for p in psutil.Process(api_pid).children(recursive=True)
             if "VLLM" in p.name() or "VLLM" in " ".join(p.cmdline())]  # fmt: skip
    assert procs, "no VLLM::EngineCore / Worker process under the API process"
    return procs[-1].pid


@pytest.fixture
def sem_chaos(tmp_path: Path) -> Iterator[SemRun]:
    if not Path(ENGINE_PYTHON).exists():
        pytest.fail(f"no engine environment at {ENGINE_PYTHON}: run `make install`")
    config = tmp_path / "models.yaml"
    config.write_text(CONFIG.format(repo=REPO))
    run = SemRun(config=config, state_dir=tmp_path / "state",
                 extra_args=("--queue-timeout", "240")).start()  # fmt: skip
    try:
        yield run
    finally:
        run.kill_all()


FAULTS = [
    ("kill -9 the engine's worker", "base", lambda pid: os.kill(worker_of(pid), signal.SIGKILL)),
    ("kill -9 the engine's API process", "chat", lambda pid: os.kill(pid, signal.SIGKILL)),
    ("SIGSTOP the engine, never continued", "base", lambda pid: os.killpg(pid, signal.SIGSTOP)),
]


@pytest.mark.vllm
@pytest.mark.timeout(1200)
def test_chaos_every_request_completes(sem_chaos: SemRun):
    run = sem_chaos
    run.wait_ready(["base", "chat"], timeout=400)
    report = []
    for what, model, inject in FAULTS:
        load = Load(run.gateway, chaos_request, workers=32, timeout=300).start()
        time.sleep(3)  # the load is in full swing, streams half-way
        before = retries(run)
        pid = replica(run, model)["pid"]
        inject(pid)
        waiting_for = f"{model} ready again:\n{run.output()[-3000:]}"
        recovery = poll(restarted(run, model, pid), 300, waiting_for, interval=0.5)
        time.sleep(3)  # some requests on the restarted engine too
        load.stop()
        after = retries(run)
        assert load.failures == [], f"{what}: {load.failures[:5]}"
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
        report.append(
            f"{what}: {load.sent} requests, {len(load.failures)} failed, "
            f"{after['replay'] - before['replay']:.0f} replayed, "
            f"{after['resume'] - before['resume']:.0f} resumed, ready again after {recovery:.1f}s"
        )
    code, _ = run.stop(timeout=60)
    assert code == 0
    assert run.leftovers() == [], "no orphan process"
    print("\n" + "\n".join(report))
