"""Lifecycle of a running `sem run` on the stand-in engine: supervisor kill -9 and re-adoption,
reload on SIGHUP, removal under load, all while the gateway serves."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import StartSem
from tests.e2e.helpers import Load, SemRun, poll, posting

CONFIG = """\
models:
  - name: a
    source: path:{model}
    replicas: 2
    env: {{FAKE_TOKEN_DELAY: "0.01"}}
  - name: b
    source: path:{model}
"""


@pytest.fixture
def sem(start_sem: StartSem, model_dir: Path) -> SemRun:
    return start_sem(CONFIG.format(model=model_dir), ready=["a", "b"])


def in_flight(run: SemRun, model: str, requests: int) -> None:
    """Until the gateway has `requests` requests of `model` with its engines."""
    poll(lambda: run.metric("sem_gateway_in_flight", model=model) >= requests, 10,
         f"{requests} requests of {model} in flight", interval=0.05)  # fmt: skip


def test_supervisor_kill_9_under_load_engines_are_re_adopted(sem: SemRun):
    load = Load(sem.gateway, posting({"model": "a", "prompt": "one two", "max_tokens": 8})).start()
    load.wait_for(20)
    before = sem.engine_pids()
    supervisor = sem.child_pid("supervisor")
    b_engine = before["b-0"]
    os.kill(supervisor, signal.SIGKILL)
    os.killpg(b_engine, signal.SIGKILL)  # an engine that dies while nobody watches
    poll(lambda: "supervisor died (signal 9)" in sem.output(), 10, "the launcher to notice")
    sem.wait_supervisor(timeout=30)
    assert sem.child_pid("supervisor") != supervisor
    poll(lambda: sem.model_states() == {"a": "ready", "b": "ready"}, 30, "a and b ready again")
    after = sem.engine_pids()
    assert {k: after[k] for k in ("a-0", "a-1")} == {k: before[k] for k in ("a-0", "a-1")}
    assert after["b-0"] != b_engine, "the dead engine was started again"
    served = load.ok
    load.wait_for(served + 20)
    load.stop()
    assert load.failures == []
    assert "supervisor died (signal 9); starting it again" in sem.output()
    code, _ = sem.stop()
    assert code == 0
    assert sem.leftovers() == []


def test_sighup_applies_models_yaml_and_a_broken_file_changes_nothing(sem: SemRun, model_dir: Path):
    assert sem.proc is not None
    sem.config.write_text(CONFIG.format(model=model_dir).replace("  - name: b\n", "  - name: c\n"))
    a_pids = {k: v for k, v in sem.engine_pids().items() if k.startswith("a-")}
    sem.proc.send_signal(signal.SIGHUP)
    poll(lambda: sem.model_states() == {"a": "ready", "c": "ready"}, 30, "c added, b removed")
    assert {k: v for k, v in sem.engine_pids().items() if k.startswith("a-")} == a_pids

    sem.config.write_text("models:\n  - name: a\n    replicas: many\n")
    response = httpx.post(f"{sem.supervisor}/reload", timeout=10)
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert "models.yaml:3: models[0].replicas" in message, message
    version = httpx.get(f"{sem.supervisor}/routes", timeout=5).json()["version"]
    refusals = sem.output().count("models.yaml not reloaded")
    sem.proc.send_signal(signal.SIGHUP)
    poll(lambda: sem.output().count("models.yaml not reloaded") > refusals, 10,
         "the supervisor to refuse the broken file")  # fmt: skip
    assert sem.model_states() == {"a": "ready", "c": "ready"}
    assert httpx.get(f"{sem.supervisor}/routes", timeout=5).json()["version"] == version


def test_removal_under_load_finishes_in_flight_and_refuses_new_requests(sem: SemRun):
    slow = {"model": "a", "prompt": "one two", "max_tokens": 100}  # ~1 s each
    load = Load(sem.gateway, posting(slow), workers=6).start()
    in_flight(sem, "a", 6)
    removed = httpx.delete(f"{sem.supervisor}/models/a", params={"timeout": 20}, timeout=5)
    assert removed.status_code == 202

    def gateway_state() -> str | None:
        listed = httpx.get(f"{sem.gateway}/v1/models", timeout=5).json()["data"]
        return next((m["sem_state"] for m in listed if m["id"] == "a"), None)

    # Requests that reach the gateway before the new route table does are still served.
    poll(lambda: gateway_state() != "ready", 10, "the gateway to see the removal")
    response = httpx.post(f"{sem.gateway}/generate", json=slow, timeout=30)
    assert response.status_code == 404
    assert "being removed" in response.json()["error"]["message"]
    poll(lambda: "a" not in sem.model_states(), 30, "a gone")
    load.stop()
    finished = [f for f in load.failures if not f.startswith("404")]
    assert finished == [], "requests in flight at removal completed"
    assert load.ok >= 6


def test_sigterm_lets_in_flight_requests_finish_then_exits_clean(sem: SemRun):
    slow = {"model": "a", "prompt": "one two", "max_tokens": 150}  # ~1.5 s each
    load = Load(sem.gateway, posting(slow), workers=4).start()
    in_flight(sem, "a", 4)
    code, seconds = sem.stop()
    load.stop()
    assert code == 0
    assert load.ok >= 4, "the requests in flight at SIGTERM were answered"
    assert all(not f.startswith("5") for f in load.failures), load.failures
    assert seconds < 30
    assert sem.leftovers() == []
