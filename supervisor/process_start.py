"""When a process started, in a form no clock change moves: what makes a pid name one process.

A restarted supervisor re-adopts an engine only if the recorded pid is still the process it
spawned, and watches an adopted engine's exit the same way. A pid alone is reused; with the
process's start it is not. The start is read as the kernel keeps it, in clock ticks after boot
(/proc/<pid>/stat), with the boot's id: a wall-clock start time (psutil's create_time, which adds
the boot time as the clock says now) moves whenever the clock is stepped, by NTP or by a VM
restored from a snapshot, and then every live engine looks gone.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import psutil

PROC = Path("/proc")
TICK = 1.0 / os.sysconf("SC_CLK_TCK")  # the resolution of a start (10 ms on Linux)


@functools.cache
def boot_id() -> str:
    """This boot's id (a reboot draws another)."""
    return (PROC / "sys/kernel/random/boot_id").read_text().strip()


@dataclass(frozen=True)
class ProcessStart:
    boot: str  # the boot it started in
    seconds: float  # from that boot to its start

    def matches(self, other: ProcessStart) -> bool:
        """The same start (within half a tick: a start converted from an older record's wall
        clock carries float error)."""
        return self.boot == other.boot and abs(self.seconds - other.seconds) < TICK / 2


NOT_RUNNING = ProcessStart("", 0.0)  # matches no process: one gone before its start was read


def start_of(pid: int) -> ProcessStart | None:
    """When `pid` started; None if it is gone or a zombie."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": comm may hold spaces
    state, ticks = fields[0], int(fields[19])  # fields 3 and 22 of proc(5)
    if state in ("Z", "X"):
        return None
    return ProcessStart(boot_id(), ticks * TICK)


def same_process(pid: int, start: ProcessStart) -> bool:
    """Is `pid` still the process that started at `start` (and not a zombie)?"""
    now = start_of(pid)
    return now is not None and now.matches(start)


def from_wall_clock(create_time: float) -> ProcessStart:
    """The start an older sem recorded as wall-clock time, as the clock and boot stand now (off,
    and so not matched, if the clock was stepped since: as the older sem would have judged)."""
    return ProcessStart(boot_id(), create_time - psutil.boot_time())
