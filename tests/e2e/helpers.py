"""Running `sem run` as a user would, in a subprocess, and checking what it leaves behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from supervisor.engine import free_port
from supervisor.procgroup import INSTANCE_ENV, kill_marked, pids_with_env
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
    extra_args: tuple[str, ...] = ()

    @classmethod
    def stand_in(cls, models_yaml: str, folder: Path, *extra_args: str) -> SemRun:
        """A `sem run` (not started yet) of `models_yaml`, written in `folder`, over stand-in
        engines (`tests.fake_engine`)."""
        config = folder / "models.yaml"
        config.write_text(models_yaml)
        return cls(config=config, state_dir=folder / "state", engine_python=sys.executable,
                   engine_module="tests.fake_engine", extra_args=extra_args)  # fmt: skip

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
        argv += self.extra_args
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

    def child_pid(self, module: str) -> int:
        """The pid of `sem run`'s child running `python -m <module>` (supervisor, gateway)."""
        assert self.proc is not None
        for child in psutil.Process(self.proc.pid).children():
            if child.cmdline()[1:3] == ["-m", module]:
                return child.pid
        raise AssertionError(f"no {module} child of sem run")

    def engine_pids(self) -> dict[str, int]:
        """Replica id -> engine pid, as the supervisor reports them."""
        models = httpx.get(f"{self.supervisor}/models", timeout=5).json()["models"]
        return {r["id"]: r["pid"] for m in models for r in m["replicas"] if r["pid"]}

    def model_states(self) -> dict[str, str]:
        """Model name -> state, as the supervisor reports them."""
        models = httpx.get(f"{self.supervisor}/models", timeout=10).json()["models"]
        return {m["name"]: m["state"] for m in models}

    def wait_supervisor(self, timeout: float) -> None:
        def answers() -> bool:
            try:
                return httpx.get(f"{self.supervisor}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        poll(answers, timeout, f"the supervisor to answer:\n{self.output()[-3000:]}")

    def leftovers(self) -> list[int]:
        return pids_with_env(INSTANCE_ENV, self.instance)

    def kill_all(self) -> None:
        """Last-resort cleanup for a failed test: nothing of this run may outlive it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        kill_marked(INSTANCE_ENV, self.instance)


# One request of a load worker: (client, worker, n) -> what is wrong with the answer, or None.
Send = Callable[[httpx.Client, int, int], str | None]


def posting(body: dict[str, Any], path: str = "/generate") -> Send:
    """Each request POSTs `body`; ok with HTTP 200 and a non-empty completion."""

    def send(client: httpx.Client, worker: int, n: int) -> str | None:
        response = client.post(path, json=body)
        if response.status_code == 200 and response.json().get("text"):
            return None
        return f"{response.status_code} {response.text[:300]}"

    return send


@dataclass
class Load:
    """Closed-loop load through the gateway from threads; every answer is checked and kept."""

    url: str
    send: Send
    workers: int = 4
    pause: float = 0.0  # between one worker's requests: leaves CPU to engines starting beside
    timeout: float = 120.0
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def sent(self) -> int:
        return self.ok + len(self.failures)

    def start(self) -> Load:
        for worker in range(self.workers):
            thread = threading.Thread(target=self._work, args=(worker,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> Load:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout)
        return self

    def wait_for(self, requests: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.sent < requests and time.monotonic() < deadline:
            time.sleep(0.05)

    def _work(self, worker: int) -> None:
        n = 0
        with httpx.Client(base_url=self.url, timeout=self.timeout) as client:
            while not self._stop.is_set():
                n += 1
                try:
                    problem = self.send(client, worker, n)
                except (httpx.HTTPError, ValueError) as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                with self._lock:
                    if problem is None:
                        self.ok += 1
                    else:
                        self.failures.append(problem)
                self._stop.wait(self.pause)


def poll(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> float:
    """Wait until `predicate()` holds; the seconds it took (AssertionError after `timeout`)."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, f"timed out after {timeout}s: {what}"
        time.sleep(interval)
    return time.monotonic() - started
