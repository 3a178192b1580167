"""sem's processes seen from outside, as `sem chaos` needs them (blocking psutil calls: run them
in a thread).

- The supervisor and the gateway: whoever listens on the admin / gateway port (the admin API does
  not report its own pid, and `sem run` restarts a dead one under a new pid).
- An engine: the replica's `pid` from the admin API is its API process, leader of its own process
  group; vLLM's tree below it is `VLLM::EngineCore` -> `VLLM::Worker` (set as process titles).
- Every engine process carries `SEM_INSTANCE` (its `sem run`) and `SEM_REPLICA_ID` in its
  environment: that is how engines that belong to no listed replica (orphans) are found.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import psutil

from supervisor.engine import REPLICA_ENV
from supervisor.procgroup import INSTANCE_ENV, group_members

ENGINE_CORE = "VLLM::EngineCore"
WORKER = "VLLM::Worker"
STAND_IN_MODULE = "tests.fake_engine"


def listening_pid(port: int) -> int | None:
    """The pid of our process listening on TCP `port` (None: nobody, or another user's)."""
    for conn in psutil.net_connections(kind="tcp"):
        listening = conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port
        if listening and conn.pid:
            return conn.pid
    return None


def title(proc: psutil.Process) -> str:
    """Name and command line: vLLM's process titles show in either (the name is cut at 15)."""
    try:
        return f"{proc.name()} {' '.join(proc.cmdline())}"
    except psutil.Error:
        return ""


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return list(psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return []


def engine_worker(api_pid: int) -> psutil.Process | None:
    """The engine's worker: a `VLLM::Worker`, else the `VLLM::EngineCore` (which runs the model
    itself without tensor parallel), else any child (the stand-in's forked core); None if the API
    process has no children."""
    children = descendants(api_pid)
    for marker in (WORKER, ENGINE_CORE):
        if found := [c for c in children if marker in title(c)]:
            return found[0]
    return children[-1] if children else None


def engine_core(api_pid: int) -> psutil.Process | None:
    return next((c for c in descendants(api_pid) if ENGINE_CORE in title(c)), None)


def is_stand_in(api_pid: int) -> bool:
    """Runs `python -m tests.fake_engine` (which takes the wedge signals)."""
    try:
        return STAND_IN_MODULE in psutil.Process(api_pid).cmdline()
    except psutil.Error:
        return False


def instance_of(pids: Iterable[int]) -> str | None:
    """The `sem run` instance these (engine) processes belong to (None if none is readable)."""
    for pid in pids:
        try:
            if instance := psutil.Process(pid).environ().get(INSTANCE_ENV):
                return instance
        except psutil.Error:
            continue
    return None


@dataclass(frozen=True)
class EngineProcess:
    pid: int
    pgid: int
    replica: str


def marked_engines(instance: str) -> list[EngineProcess]:
    """Live engine processes of one `sem run`, each with its group and replica id."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            env = proc.environ()
            if env.get(INSTANCE_ENV) == instance and REPLICA_ENV in env:
                found.append(EngineProcess(proc.pid, os.getpgid(proc.pid), env[REPLICA_ENV]))
        except (psutil.Error, ProcessLookupError):
            continue
    return found


def orphans(instance: str | None, listed: set[int], dead_groups: set[int]) -> list[int]:
    """Engine processes in no listed replica's group, and members of the groups of replicas a
    fault took away (`dead_groups`, if no longer listed) that are still alive."""
    found = {e.pid for e in marked_engines(instance) if e.pgid not in listed} if instance else set()
    for pgid in dead_groups - listed:
        found.update(group_members(pgid))
    return sorted(found)


def stopped(pids: list[int]) -> list[int]:
    """Those of `pids` that are stopped (SIGSTOP) right now."""
    found = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_STOPPED:
                found.append(pid)
        except psutil.Error:
            continue
    return found
