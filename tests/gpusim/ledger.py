"""The simulated GPUs' memory: who holds how much on which GPU, shared between processes.

A JSON file under an fcntl lock: the supervisor's NVML stand-in reads it, simulated engines and
"foreign processes" allocate from it. Owners are pids (released by the "driver" `release_lag`
seconds after the process is first seen gone, as a real GPU frees a dead process's memory
shortly after its exit) or names (foreign holders, freed explicitly).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from supervisor.gpu_selection import GpuInfo

GiB = 1024**3
Owner = int | str


class OutOfMemory(RuntimeError):
    """CUDA's out-of-memory error, worded as torch words it."""


@dataclass(frozen=True)
class SimGpu:
    index: int
    total: int
    name: str = "NVIDIA Sim GPU"
    uuid: str = ""
    mig: bool = False

    def info(self, free: int) -> GpuInfo:
        uuid = self.uuid or f"GPU-5151{self.index:04d}-0000-0000-0000-000000000000"
        return GpuInfo(self.index, uuid, self.name, self.total, free, self.mig)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_path = path.with_suffix(".lock")

    @classmethod
    def create(cls, path: Path, gpus: list[SimGpu], release_lag: float = 0.3) -> Ledger:
        state = {"gpus": [asdict(g) for g in gpus], "allocations": [], "gone": {},
                 "release_lag": release_lag}  # fmt: skip
        path.write_text(json.dumps(state))
        return cls(path)

    @contextmanager
    def _state(self) -> Iterator[dict[str, Any]]:
        """The state under the lock, dead processes' memory released; written back after."""
        with self._lock_path.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = json.loads(self.path.read_text())
            self._reap(state)
            yield state
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(state))
            os.replace(tmp, self.path)

    @staticmethod
    def _reap(state: dict[str, Any]) -> None:
        now, gone = time.time(), state["gone"]
        for owner in {a["owner"] for a in state["allocations"] if isinstance(a["owner"], int)}:
            if not _alive(owner):
                gone.setdefault(str(owner), now)
        released = {int(pid) for pid, t in gone.items() if now - t >= state["release_lag"]}
        state["allocations"] = [a for a in state["allocations"] if a["owner"] not in released]
        for pid in released:
            del gone[str(pid)]

    @staticmethod
    def _free(state: dict[str, Any], gpu: int) -> int:
        total = next(g["total"] for g in state["gpus"] if g["index"] == gpu)
        return int(total - sum(a["bytes"] for a in state["allocations"] if a["gpu"] == gpu))

    def allocate(self, owner: Owner, gpu: int, nbytes: int, tag: str) -> None:
        with self._state() as state:
            free = self._free(state, gpu)
            if nbytes > free:
                total = next(g["total"] for g in state["gpus"] if g["index"] == gpu)
                raise OutOfMemory(
                    f"CUDA out of memory. Tried to allocate {nbytes / GiB:.2f} GiB. GPU {gpu}"
                    f" has a total capacity of {total / GiB:.2f} GiB of which"
                    f" {free / GiB:.2f} GiB is free."
                )
            state["allocations"].append({"owner": owner, "gpu": gpu, "bytes": nbytes, "tag": tag})

    def free(self, owner: Owner, gpu: int | None = None, tag: str | None = None) -> int:
        """Release what `owner` holds (on `gpu`, under `tag`, when given); the bytes freed."""

        def matches(a: dict[str, Any]) -> bool:
            return (
                a["owner"] == owner
                and (gpu is None or a["gpu"] == gpu)
                and (tag is None or a["tag"] == tag)
            )

        with self._state() as state:
            freed = sum(a["bytes"] for a in state["allocations"] if matches(a))
            state["allocations"] = [a for a in state["allocations"] if not matches(a)]
        return int(freed)

    def gpus(self) -> list[GpuInfo]:
        with self._state() as state:
            return [SimGpu(**g).info(self._free(state, g["index"])) for g in state["gpus"]]

    def processes(self, gpu: int) -> list[tuple[int, int]]:
        """(pid, bytes) on `gpu` of every process owner, as NVML's per-process list."""
        held: dict[int, int] = {}
        with self._state() as state:
            for a in state["allocations"]:
                if a["gpu"] == gpu and isinstance(a["owner"], int):
                    held[a["owner"]] = held.get(a["owner"], 0) + a["bytes"]
        return sorted(held.items())

    def held(self, owner: Owner, gpu: int) -> int:
        with self._state() as state:
            mine = [
                a["bytes"] for a in state["allocations"] if (a["owner"], a["gpu"]) == (owner, gpu)
            ]
        return int(sum(mine))
