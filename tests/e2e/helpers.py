"""Running `sem run` as a user would, in a subprocess, and checking what it leaves behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from sem.procgroup import INSTANCE_ENV, kill_marked, pids_with_env
from supervisor.engine import free_port
from tests.conftest import REPO

ENGINE_PYTHON = os.environ.get("SEM_ENGINE_PYTHON", str(REPO / ".venv-engine" / "bin" / "python"))


@dataclass
class SemRun:
    """One `sem run` process tree, marked with its own instance id."""

    config: Path
    state_dir: Path
    engine_python: str = ENGINE_PYTHON
    engine_module: str | None = None
    instance: str = field(default_factory=lambda: uuid.uuid4().hex)
    gateway_port: int = field(default_factory=free_port)
    supervisor_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[str] | None = None
    log_path: Path | None = None

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def supervisor(self) -> str:
        return f"http://127.0.0.1:{self.supervisor_port}"

    def start(self) -> SemRun:
        argv = [
            str(Path(sys.executable).with_name("sem")), "run",
            "--config", str(self.config),
            "--state-dir", str(self.state_dir),
            "--gateway-port", str(self.gateway_port),
            "--supervisor-port", str(self.supervisor_port),
            "--engine-python", self.engine_python,
        ]  # fmt: skip
        if self.engine_module:
            argv += ["--engine-module", self.engine_module]
        env = dict(os.environ, **{INSTANCE_ENV: self.instance})
        self.log_path = self.state_dir.parent / f"sem-run-{self.instance[:8]}.log"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # like a job started from a shell
        )
        return self

    def output(self) -> str:
        return self.log_path.read_text() if self.log_path else ""

    def wait_ready(self, models: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.output()[-3000:]
            try:
                health = httpx.get(f"{self.gateway}/health", timeout=2).json()
                if set(models) <= set(health["ready_models"]):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"models {models} not ready in {timeout}s:\n{self.output()[-3000:]}")

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 30) -> tuple[int, float]:
        """Signal `sem run`; its exit code and how long it took."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        return code, time.monotonic() - started

    def leftovers(self) -> list[int]:
        return pids_with_env(INSTANCE_ENV, self.instance)

    def kill_all(self) -> None:
        """Last-resort cleanup for a failed test: nothing of this run may outlive it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        kill_marked(INSTANCE_ENV, self.instance)
