"""Resume and the CLI, for real: `sem cache` against a supervisor process that is killed with
SIGKILL half-way through a download; the next supervisor continues from the partial files."""

from __future__ import annotations

import filecmp
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from supervisor.engine import free_port
from tests.conftest import REPO
from tests.hubrepos import BIG, Hub

SEM = str(Path(sys.executable).with_name("sem"))


class Supervisors:
    """Supervisor processes over one cache folder; all killed at the end of the test."""

    def __init__(self, tmp: Path, hub: Hub) -> None:
        self.tmp, self.hub = tmp, hub
        self.cache_dir = tmp / "hf"
        self.config = tmp / "models.yaml"
        self.config.write_text("devices: cpu\nmodels: []\n")
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> str:
        port = free_port()
        argv = [sys.executable, "-m", "supervisor", "--config", str(self.config),
                "--port", str(port), "--state-dir", str(self.tmp / "state"),
                "--cache-dir", str(self.cache_dir)]  # fmt: skip
        env = dict(os.environ, HF_ENDPOINT=self.hub.url, PYTHONPATH=str(REPO))
        log = (self.tmp / f"supervisor-{len(self.procs)}.log").open("wb")
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert proc.poll() is None, "supervisor exited at start"
            try:
                httpx.get(f"{url}/health", timeout=1)
                return url
            except httpx.HTTPError:
                time.sleep(0.1)
        raise AssertionError("supervisor did not start")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.fixture
def supervisors(tmp_path: Path, hub: Hub) -> Iterator[Supervisors]:
    sups = Supervisors(tmp_path, hub)
    try:
        yield sups
    finally:
        hub.throttle(0)
        sups.close()


def sem(admin: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SEM, "--admin", admin, "cache", *args], capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def job_of(admin: str) -> dict[str, Any]:
    (job,) = httpx.get(f"{admin}/cache", timeout=5).json()["jobs"]
    return job  # type: ignore[no-any-return]


def test_kill_9_mid_download_then_the_next_run_resumes(supervisors: Supervisors, hub: Hub):
    hub.throttle(4 << 20)  # per connection: ~10 s for the whole repo
    first = supervisors.start()
    started = sem(first, f"hf://{BIG}", "--no-wait")
    assert started.returncode == 0, started.stderr
    assert "downloading" in started.stdout
    deadline = time.monotonic() + 60
    while (job := job_of(first))["percent"] < 30:
        assert job["state"] == "downloading" and time.monotonic() < deadline, job
        time.sleep(0.1)
    supervisors.procs[-1].send_signal(signal.SIGKILL)
    supervisors.procs[-1].wait()

    storage = supervisors.cache_dir / "models--synth--big"
    partial = sum(p.stat().st_size for p in storage.glob("blobs/*.incomplete"))
    assert partial > 8 << 20, "half-downloaded files are kept"
    assert not list(storage.glob("sem/*.json")), "not reported cached: it is not complete"

    hub.throttle(0)
    seen = len(hub.requests())
    second = supervisors.start()
    assert "hf://synth/big" not in sem(second, "ls").stdout
    done = sem(second, f"hf://{BIG}")  # waits, printing progress lines (not a terminal)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"hf://{BIG}: cached" in done.stdout

    resumed = [r for r in hub.requests()[seen:]
               if r["method"] == "GET" and r["path"].endswith(".safetensors")]  # fmt: skip
    assert resumed and all((r["range"] or "").startswith("bytes=") for r in resumed), resumed
    assert sum(int(r["range"][6:].rstrip("-")) for r in resumed) == partial
    snapshot = Path(job_of(second)["path"])
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        assert filecmp.cmp(snapshot / name, hub.root / BIG / name, shallow=False), name

    listed = sem(second, "ls")
    assert f"hf://{BIG}" in listed.stdout and str(snapshot) in listed.stdout
    freed = sem(second, "rm", f"hf://{BIG}")
    assert freed.returncode == 0 and "freed 80.00 MiB" in freed.stdout, freed.stdout
    assert not snapshot.exists()
    missing = sem(second, "rm", f"hf://{BIG}")
    assert missing.returncode == 1 and "not in the cache" in missing.stderr
    bad = sem(second, "ftp://x")
    assert bad.returncode == 1 and "400" in bad.stderr
