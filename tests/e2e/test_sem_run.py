"""`sem run` as a process tree, on the stand-in engine (fast): start, serve, stop, clean up."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.helpers import SemRun


@pytest.fixture
def sem_fake(tmp_path: Path, model_dir: Path) -> Iterator[SemRun]:
    config = (
        f"models:\n  - name: a\n    source: path:{model_dir}\n"
        f"  - name: b\n    source: path:{model_dir}\n    replicas: 2\n"
    )
    run = SemRun.stand_in(config, tmp_path).start()
    try:
        yield run
    finally:
        run.kill_all()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sem_run_serves_then_stops_on_signal_with_nothing_left(sem_fake: SemRun, sig):
    sem_fake.wait_ready(["a", "b"], timeout=60)
    response = httpx.post(f"{sem_fake.gateway}/generate", json={"model": "b", "prompt": "x y"})
    assert response.status_code == 200
    assert len(sem_fake.leftovers()) >= 2 + 3 * 2, "launcher, supervisor, gateway, 3 engines x 2"
    code, seconds = sem_fake.stop(sig)
    assert code == 0, sem_fake.output()[-2000:]
    assert seconds < 30
    assert sem_fake.leftovers() == []
    assert "sem: stopped" in sem_fake.output()


def test_sem_run_refuses_busy_ports(tmp_path: Path, model_dir: Path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = SemRun(config=tmp_path / "x.yaml", state_dir=tmp_path / "s", gateway_port=port)
        run.start()
        assert run.proc is not None
        assert run.proc.wait(timeout=30) == 2
    assert f"port(s) {port}" in run.output()


def test_supervisor_with_a_broken_models_yaml_exits_2_naming_the_line(tmp_path: Path):
    config = tmp_path / "models.yaml"
    config.write_text("models:\n  - name: a\n    source: nope\n")
    run = SemRun(config=config, state_dir=tmp_path / "s").start()
    try:
        assert run.proc is not None
        assert run.proc.wait(timeout=30) == 1
        assert f"{config}:3: models[0].source" in run.output()
        assert run.leftovers() == []
    finally:
        run.kill_all()


def test_a_request_sent_while_its_model_starts_succeeds_once_ready(tmp_path: Path, model_dir: Path):
    config = (
        f"models:\n  - name: slow\n    source: path:{model_dir}\n"
        "    env: {FAKE_START_DELAY: '3'}\n"
    )
    run = SemRun.stand_in(config, tmp_path).start()
    try:
        deadline = time.monotonic() + 30
        while True:  # the gateway itself may not listen yet
            try:
                health = httpx.get(f"{run.gateway}/health").json()
                if "slow" in health["ready_models"] or time.monotonic() > deadline:
                    break
                models = httpx.get(f"{run.supervisor}/models").json()["models"]
                if models and models[0]["state"] in ("pending", "starting"):
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        assert "slow" not in httpx.get(f"{run.gateway}/health").json()["ready_models"]
        response = httpx.post(f"{run.gateway}/generate", json={"model": "slow", "prompt": "hi"},
                              timeout=60)  # fmt: skip
        assert response.status_code == 200, response.text
        assert run.stop()[0] == 0
    finally:
        run.kill_all()
