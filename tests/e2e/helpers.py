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
from prometheus_client.parser import text_string_to_metric_families

from supervisor.engine import free_port
from supervisor.procgroup import INSTANCE_ENV, kill_marked, pids_with_env
from tests.conftest import REPO
from tests.e2e.answers import answer_problem

ENGINE_PYTHON = os.environ.get("SEM_ENGINE_PYTHON", str(REPO / ".venv-engine" / "bin" / "python"))
# An engine restart on 2 shared cores can pass the gateway's default waits (180 s for a restarted
# engine): real-vLLM fault tests give it 600 s, as a user with slow restarts would.
SLOW_RESTARTS = ("--queue-timeout", "600", "--replay-timeout", "600")


def demo_pair_yaml(max_num_seqs: int | None = None) -> str:
    """models.yaml of the two demo checkpoints, `base` and `chat`, as real-vLLM tests serve them."""
    seqs = f"\n    max_num_seqs: {max_num_seqs}" if max_num_seqs else ""
    return "models:\n" + "".join(
        f"  - name: {name}\n    source: path:{REPO}/models/tiny-llama-{name}\n"
        f"    max_model_len: 512{seqs}\n"
        for name in ("base", "chat")
    )


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
        """Until the gateway routes to all of `models` (AssertionError if `sem run` exits)."""

        def ready() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.output()[-3000:]
            try:
                health = httpx.get(f"{self.gateway}/health", timeout=2).json()
            except httpx.HTTPError:
                return False
            return set(models) <= set(health["ready_models"])

        poll(ready, timeout, lambda: f"models {models} ready:\n{self.output()[-3000:]}", 0.5)

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

    def metric(self, name: str, **labels: str) -> float:
        """The gateway's metric `name`, summed over the samples that have these labels."""
        text = httpx.get(f"{self.gateway}/metrics", timeout=10).text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )

    def retries(self, model: str) -> dict[str, float]:
        """The gateway's retries of `model`'s requests so far, by kind (replay, resume)."""
        return {
            kind: self.metric("sem_gateway_retries_total", model=model, kind=kind)
            for kind in ("replay", "resume")
        }

    def wait_supervisor(self, timeout: float) -> None:
        self._wait_answering(self.supervisor, timeout)

    def wait_gateway(self, timeout: float) -> None:
        self._wait_answering(self.gateway, timeout)

    def _wait_answering(self, url: str, timeout: float) -> None:
        def answers() -> bool:
            try:
                return httpx.get(f"{url}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        poll(answers, timeout, lambda: f"{url} to answer:\n{self.output()[-3000:]}")

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

# A load worker's n-th request: (worker, n) -> (path, body).
Ask = Callable[[int, int], tuple[str, dict[str, Any]]]


def sending(ask: Ask) -> Send:
    """Each request is `ask(worker, n)`; its answer must be whole (`answers.answer_problem`)."""

    def send(client: httpx.Client, worker: int, n: int) -> str | None:
        path, body = ask(worker, n)
        return answer_problem(path, body, client.post(path, json=body))

    return send


def posting(body: dict[str, Any], path: str = "/generate") -> Send:
    """Each request POSTs `body`; its answer must be whole."""
    return sending(lambda worker, n: (path, body))


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
        """Until `requests` requests were answered (AssertionError after `timeout`)."""
        poll(lambda: self.sent >= requests, timeout, f"{requests} requests answered", 0.05)

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


def poll(
    predicate: Callable[[], bool],
    timeout: float,
    what: str | Callable[[], str],
    interval: float = 0.2,
) -> float:
    """Wait until `predicate()` holds; the seconds it took (AssertionError after `timeout`, saying
    `what` was awaited: a callable is asked only then, e.g. for the log's tail at that time)."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started >= timeout:
            raise AssertionError(
                f"timed out after {timeout}s: {what if isinstance(what, str) else what()}"
            )
        time.sleep(interval)
    return time.monotonic() - started
