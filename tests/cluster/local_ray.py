"""A Ray cluster of a few nodes on this machine, started and torn down by the tests.

Each node is its own `ray start` (its own temp dir, GPUs declared with `--num-gpus` and their
memory with the `sem_gpu_gib` resource) and carries a marker in its environment, which its
raylet's workers inherit: so one node can be killed alone (a lost machine: its raylet, workers
and engines), and teardown can prove nothing is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from supervisor.cluster import GPU_MEMORY_RESOURCE, NODE_ENV
from supervisor.engine import free_port
from supervisor.procgroup import kill_marked, pids_with_env
from tests.conftest import REPO

RAY = str(Path(sys.executable).with_name("ray"))
MARK = "SEM_TEST_RAY_NODE"


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@dataclass
class LocalRay:
    root: Path
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    port: int = field(default_factory=free_port)
    node_ids: dict[str, str] = field(default_factory=dict)  # name -> Ray node id
    _groups: dict[str, int] = field(default_factory=dict)  # name -> its `ray start` group
    _killed: list[psutil.Process] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _mark(self, name: str) -> str:
        return f"{self.run}-{name}"

    def start(self, names: list[str], gpus: int = 2, gpu_gib: int = 24) -> None:
        """Start nodes one by one; the first of a fresh cluster is its head."""
        for name in names:
            self._start_node(name, gpus, gpu_gib, head=not self.node_ids)
            self.node_ids[name] = self._node_id(name)

    def _start_node(self, name: str, gpus: int, gpu_gib: int, head: bool) -> None:
        """`ray start`, tried twice: on a loaded machine a raylet can miss Ray's fixed 30 s to
        register, and what that start left is killed before the second try."""
        for attempt in (1, 2):
            proc = self._ray_start(name, gpus, gpu_gib, head)
            out, _ = proc.communicate(timeout=180)
            if proc.returncode == 0:
                return
            self._killed += self._processes(proc.pid)
            for process in self._killed:
                with contextlib.suppress(psutil.Error):
                    process.kill()
            if attempt == 2:
                raise RuntimeError(f"ray start failed:\n{out[-2000:]}")

    def _ray_start(self, name: str, gpus: int, gpu_gib: int, head: bool) -> subprocess.Popen[str]:
        argv = [RAY, "start", "--num-cpus", "1", "--num-gpus", str(gpus),
                "--resources", json.dumps({GPU_MEMORY_RESOURCE: gpu_gib}),
                "--temp-dir", str(self.root / name), "--disable-usage-stats",
                "--node-ip-address", "127.0.0.1"]  # fmt: skip  # the tests stay on loopback
        if head:
            argv += ["--head", "--port", str(self.port), "--include-dashboard=false"]
        else:
            argv += ["--address", self.address]
        env = {**os.environ, "PYTHONPATH": str(REPO), MARK: self._mark(name),
               "RAY_USAGE_STATS_ENABLED": "0"}  # fmt: skip
        # Its own session: the node's processes form a group of their own (its id is this
        # process's pid), killed as one.
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)  # fmt: skip
        self._groups[name] = proc.pid
        return proc

    def _raylet(self, name: str) -> psutil.Process:
        for pid in pids_with_env(MARK, self._mark(name)):
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(pid)
                if any(arg.startswith("--node_id=") for arg in process.cmdline()):
                    return process
        raise RuntimeError(f"no raylet found for node {name}")

    def _node_id(self, name: str) -> str:
        """From its raylet's command line (`--node_id=`)."""
        raylet = self._raylet(name)
        return next(a.split("=", 1)[1] for a in raylet.cmdline() if a.startswith("--node_id="))

    def _processes(self, group: int) -> list[psutil.Process]:
        """The node's processes: its `ray start` group (GCS, raylet, agents: `ray::` processes
        overwrite their environment with their title, so a marker there cannot find them) and
        everything under its raylet (workers, each in a group of its own)."""
        found = []
        assert group != os.getpgid(0), "a node in the tests' own process group"
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error, ProcessLookupError):  # gone meanwhile
                if os.getpgid(process.pid) == group:
                    found += [process, *process.children(recursive=True)]
        return found

    def kill(self, name: str) -> None:
        """The node is lost: SIGKILL its processes and its engines (they die with a machine)."""
        self.kill_ray(name)
        kill_marked(NODE_ENV, self.node_ids[name])

    def kill_ray(self, name: str) -> None:
        """SIGKILL the node's Ray processes (raylet, agents), the machine staying up: its
        engines are left to die with their agent."""
        doomed = self._processes(self._groups[name])
        self._killed += doomed
        for process in doomed:
            with contextlib.suppress(psutil.Error):
                process.kill()

    def leftovers(self) -> list[int]:
        pids = [p.pid for p in self._killed if alive(p)]
        for node_id in self.node_ids.values():
            pids += pids_with_env(NODE_ENV, node_id)
        return pids

    def stop(self, timeout: float = 30) -> list[int]:
        """Kill every node (workers before the head); the pids still alive after `timeout`."""
        for name in reversed(list(self.node_ids)):
            self.kill(name)
        deadline = time.monotonic() + timeout
        while (left := self.leftovers()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return left


@contextlib.contextmanager
def local_cluster(names: list[str], gpus: int = 2, gpu_gib: int = 24) -> Iterator[LocalRay]:
    """Nodes `names` (the first is the head) for the time of the block; after it, nothing of
    theirs is left running (asserted)."""
    # Short: Ray's unix sockets live under the temp dir (a socket path has ~107 bytes at most).
    root = Path(tempfile.mkdtemp(prefix="semray-", dir="/tmp"))
    cluster = LocalRay(root)
    try:
        cluster.start(names, gpus, gpu_gib)
        yield cluster
    finally:
        left = cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
        assert left == [], f"processes left behind by the Ray cluster: {left}"


def cluster_yaml(address: str, models: str) -> str:
    """A models.yaml that places `models` (its `models:` entries) on the cluster at `address`."""
    return f"cluster:\n  backend: ray\n  address: {address}\nmodels:\n{models}"
