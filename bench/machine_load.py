"""What else the machine was doing while a benchmark ran: cores, load average, and the CPU time
taken by processes other than the benchmark's own (the figures mean little when that is high).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil


def machine_state() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "memory_available_gib": round(psutil.virtual_memory().available / 1024**3, 1),
    }


def busy_seconds() -> float:
    """CPU seconds the whole machine has been busy, all cores together."""
    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    guest = getattr(t, "guest", 0.0) + getattr(t, "guest_nice", 0.0)  # already counted in user
    return sum(t) - guest - idle


def label(proc: psutil.Process) -> str:
    """A short name for a process: its program and first arguments (`python -m pytest`)."""
    with contextlib.suppress(psutil.Error):
        words = [Path(word).name for word in proc.cmdline()[:3]]
        return " ".join(words)[:48] or proc.name()
    return "?"


class CpuMeter:
    """CPU seconds used by other processes: the machine's busy time less that of `ours` (the
    benchmark and its process tree, engines included), between two readings."""

    def __init__(self, ours: Sequence[psutil.Process]) -> None:
        self.ours = list(ours)
        self.pids = {proc.pid for proc in self.ours}
        self._last: dict[int, float] = {}

    def _ours_seconds(self) -> float:
        for proc in self.ours:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                self._last[proc.pid] = times.user + times.system
        return sum(self._last.values())

    def reading(self) -> tuple[float, float]:
        return busy_seconds(), self._ours_seconds()

    @staticmethod
    def others(before: tuple[float, float], after: tuple[float, float]) -> float:
        return max(0.0, (after[0] - before[0]) - (after[1] - before[1]))

    def others_by_process(self) -> dict[int, tuple[str, float]]:
        """Every other live process: pid -> (label, CPU seconds so far)."""
        found = {}
        for proc in psutil.process_iter():
            if proc.pid in self.pids:
                continue
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                found[proc.pid] = (label(proc), times.user + times.system)
        return found


def busiest(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], elapsed: float
) -> list[tuple[str, float]]:
    """Other processes' CPU between two `others_by_process` readings, by label, in cores, the
    busiest first (a process started meanwhile counts whole; one that ended is not seen)."""
    used: dict[str, float] = {}
    for pid, (name, seconds) in after.items():
        used[name] = used.get(name, 0.0) + seconds - before.get(pid, (name, 0.0))[1]
    ranked = sorted(used.items(), key=lambda item: -item[1])[:5]
    return [(name, round(seconds / elapsed, 2)) for name, seconds in ranked if seconds > 0]
