"""`sem run` as a process tree, on the stand-in engine (fast): start, serve, stop, clean up."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import httpx
import pytest

from tests.e2e.answers import answer_problem
from tests.e2e.conftest import StartSem
from tests.e2e.helpers import poll


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sem_run_serves_then_stops_on_signal_with_nothing_left(
    start_sem: StartSem, model_dir: Path, sig: signal.Signals
):
    run = start_sem(
        f"models:\n  - name: a\n    source: path:{model_dir}\n"
        f"  - name: b\n    source: path:{model_dir}\n    replicas: 2\n",
        ready=["a", "b"],
    )
    body = {"model": "b", "prompt": "x y", "max_tokens": 4}
    response = httpx.post(f"{run.gateway}/generate", json=body)
    assert answer_problem("/generate", body, response) is None, response.text
    assert len(run.leftovers()) >= 2 + 3 * 2, "launcher, supervisor, gateway, 3 engines x 2"
    code, seconds = run.stop(sig)
    assert code == 0, run.output()[-2000:]
    assert seconds < 30
    assert run.leftovers() == []
    assert "sem: stopped" in run.output()


def test_sem_run_refuses_busy_ports_with_exit_2(start_sem: StartSem):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = start_sem("models: []\n", gateway_port=port)
        assert run.proc is not None
        assert run.proc.wait(timeout=30) == 2
    assert f"port(s) {port}" in run.output()


def test_sem_run_with_a_broken_models_yaml_exits_2_naming_the_line(start_sem: StartSem):
    # A bad model entry is skipped at start (test_security); a bad file-wide setting is fatal.
    run = start_sem("models: []\nrecheck_interval: soon\n")
    assert run.proc is not None
    assert run.proc.wait(timeout=30) == 2, run.output()[-2000:]
    assert f"{run.config}:2: recheck_interval" in run.output()
    assert run.leftovers() == []


def test_a_request_sent_while_its_model_starts_succeeds_once_ready(
    start_sem: StartSem, model_dir: Path
):
    run = start_sem(
        f"models:\n  - name: slow\n    source: path:{model_dir}\n"
        "    env: {FAKE_START_DELAY: '3'}\n"
    )

    def starting() -> bool:
        try:
            return run.model_states().get("slow") in ("pending", "starting")
        except httpx.HTTPError:  # the supervisor may not listen yet
            return False

    poll(starting, 30, "slow pending or starting", interval=0.1)
    run.wait_gateway(timeout=30)
    assert "slow" not in httpx.get(f"{run.gateway}/health").json()["ready_models"]
    body = {"model": "slow", "prompt": "hi", "max_tokens": 4}
    response = httpx.post(f"{run.gateway}/generate", json=body, timeout=60)
    assert answer_problem("/generate", body, response) is None, response.text
    assert run.stop()[0] == 0
