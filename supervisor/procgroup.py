"""Process groups: find, signal and reap every process of an engine, grandchildren included.

vLLM's API process forks `VLLM::EngineCore` and workers that stay in its process group, and a
SIGKILL of the API process alone leaves them holding memory. So engines start in their own session
(`start_new_session=True`) and are always stopped as a group: SIGTERM, a grace period, SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import signal

import psutil

INSTANCE_ENV = "SEM_INSTANCE"  # set on every process of one `sem run`, engines included

# Run before a command (`python -c TETHER <parent pid> <argv...>`): it asks Linux to send it
# SIGTERM when its parent dies (prctl PR_SET_PDEATHSIG, which survives the exec), makes sure the
# parent is not gone already, then becomes the command. Plain Python and ctypes: it runs in the
# engine's own interpreter. No preexec_fn: that is unsafe in a process with threads (Ray's).
TETHER = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(143)  # the parent died before the prctl\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def tethered(argv: list[str], python: str) -> list[str]:
    """`argv`, run so that it gets SIGTERM when this process dies (an engine then shuts down
    as a whole: vLLM stops its EngineCore and workers on SIGTERM). For a cluster node's engines,
    which die with their node agent; not on one box, where engines outlive a supervisor crash
    to be re-adopted."""
    return [python, "-c", TETHER, str(os.getpid()), *argv]


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids whose process group is `pgid`."""
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if os.getpgid(proc.pid) == pgid:
                members.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def signal_group(pgid: int, sig: signal.Signals) -> bool:
    """Send `sig` to the group; False if the group no longer exists."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


async def stop_group(pgid: int, grace: float, poll: float = 0.1) -> bool:
    """SIGTERM the group, wait up to `grace` s for it to go, then SIGKILL. True if it was killed.

    SIGCONT follows SIGTERM, so a stopped (SIGSTOP, hung-looking) group can act on it at once.
    """
    if not signal_group(pgid, signal.SIGTERM):
        return False
    signal_group(pgid, signal.SIGCONT)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while loop.time() < deadline:
        if not await asyncio.to_thread(group_members, pgid):
            return False
        await asyncio.sleep(poll)
    signal_group(pgid, signal.SIGKILL)
    while await asyncio.to_thread(group_members, pgid):
        await asyncio.sleep(poll)
    return True


def pids_with_env(key: str, value: str) -> list[int]:
    """Pids whose environment has key=value (how tests and `sem run` find leftovers)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(key) == value:
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def kill_marked(key: str, value: str) -> int:
    """SIGKILL every process marked key=value, with its group unless that group is ours."""
    own_pid, own_group = os.getpid(), os.getpgid(0)
    pids = [pid for pid in pids_with_env(key, value) if pid != own_pid]
    for pid in pids:
        try:
            pgid = os.getpgid(pid)
            if pgid == own_group:
                os.kill(pid, signal.SIGKILL)
            else:
                os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            continue
    return len(pids)
