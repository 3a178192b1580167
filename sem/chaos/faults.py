"""The faults `sem chaos` injects, and the ledger that undoes whatever it left stopped.

Each scenario picks its victim (an engine replica of the target model, or the daemon listening on
a port), records in the `Ledger` what would undo it *before* sending the signal, and says what
"recovered" means for it (`Recovery`). The ledger is released at the end of every scenario and on
the way out, Ctrl-C included: the tool never leaves a process stopped or wedged.

The wedge differs by engine: vLLM's `VLLM::EngineCore` is SIGSTOPped alone (the API process keeps
answering /health 200); the stand-in engine takes SIGUSR1 (wedge) and SIGUSR2 (unwedge).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from enum import Enum

import psutil

from sem.chaos import procs
from supervisor.procgroup import group_members


class Scenario(Enum):
    KILL_WORKER = "kill-worker"
    KILL_ENGINE = "kill-engine"
    STOP_ENGINE = "stop-engine"
    WEDGE_ENGINE = "wedge-engine"
    WEDGE_IDLE_ENGINE = "wedge-idle-engine"
    SLOW_ENGINE = "slow-engine"
    KILL_SUPERVISOR = "kill-supervisor"
    KILL_GATEWAY = "kill-gateway"


# Scenarios whose fault comes before the load: the engine wedged between two batches, with no
# stream producing and its figures frozen at no request running (only the gateway can tell).
BEFORE_LOAD = frozenset({Scenario.WEDGE_IDLE_ENGINE})


class Recovery(Enum):
    """What the end of a fault looks like (see `runner.recovered`)."""

    ENGINE_REPLACED = "engine replaced"  # the victim's replica runs a new engine, ready
    ENGINE_SERVING = "engine serving"  # the model is ready; the victim may live on
    DAEMON_BACK = "daemon back"  # another process listens on the victim's port


class NotApplicable(Exception):
    """This scenario cannot run against this sem (say, an engine without child processes)."""


@dataclass(frozen=True)
class Victim:
    """Where the faults aim: one replica of the target model, and the daemons' ports."""

    replica: str
    api_pid: int
    admin_port: int
    gateway_port: int


@dataclass(frozen=True)
class Injection:
    what: str  # what was done, for the report
    recovery: Recovery
    victim_pid: int  # the engine's API process, or the daemon
    port: int | None = None  # DAEMON_BACK: the port a new process must listen on
    release_after: float | None = None  # the slow engine: s until the ledger continues it


@dataclass(frozen=True)
class Undo:
    """A signal that undoes a stop or wedge: SIGCONT to a process (or its group), SIGUSR2 to a
    wedged stand-in."""

    what: str
    pid: int
    sig: signal.Signals
    group: bool = False

    def pending(self) -> bool:
        """Is there still something to undo (a stopped member, a live wedged engine)?"""
        pids = group_members(self.pid) if self.group else [self.pid]
        if self.sig is signal.SIGCONT:
            return bool(procs.stopped(pids))
        return any(psutil.pid_exists(pid) for pid in pids)

    def apply(self) -> bool:
        """Send the signal if needed; True if it was."""
        if not self.pending():
            return False
        try:
            if self.group:
                os.killpg(self.pid, self.sig)
            else:
                os.kill(self.pid, self.sig)
        except (ProcessLookupError, PermissionError):
            return False
        return True


class Ledger:
    """What the tool has stopped or wedged and not yet undone."""

    def __init__(self) -> None:
        self._held: list[Undo] = []

    def hold(self, undo: Undo) -> Undo:
        self._held.append(undo)
        return undo

    def release_all(self) -> list[str]:
        """Undo everything held; what had to be undone (the supervisor had not dealt with it)."""
        held, self._held = self._held, []
        return [undo.what for undo in held if undo.apply()]


def _signal(pid: int, sig: signal.Signals, group: bool = False) -> None:
    try:
        os.killpg(pid, sig) if group else os.kill(pid, sig)
    except ProcessLookupError:
        raise NotApplicable(f"pid {pid} is gone") from None
    except PermissionError:
        raise NotApplicable(f"no permission to signal pid {pid} (another user's?)") from None


def kill_worker(victim: Victim, ledger: Ledger) -> Injection:
    worker = procs.engine_worker(victim.api_pid)
    if worker is None:
        raise NotApplicable(f"engine {victim.api_pid} of {victim.replica} has no child process")
    title = procs.title(worker)
    _signal(worker.pid, signal.SIGKILL)
    what = f"kill -9 {worker.pid} ({title.split()[0] if title else '?'}), a child of "
    what += f"{victim.replica}'s engine"
    # vLLM's API process exits within seconds of losing its worker (engine-notes.md): recovered
    # is a new engine. Another engine's child may not matter to it: recovered is serving.
    vllm = procs.ENGINE_CORE in title or procs.WORKER in title
    recovery = Recovery.ENGINE_REPLACED if vllm else Recovery.ENGINE_SERVING
    return Injection(what, recovery, victim.api_pid)


def kill_engine(victim: Victim, ledger: Ledger) -> Injection:
    _signal(victim.api_pid, signal.SIGKILL)
    what = f"kill -9 {victim.api_pid}, {victim.replica}'s engine API process"
    return Injection(what, Recovery.ENGINE_REPLACED, victim.api_pid)


def stop_engine(victim: Victim, ledger: Ledger) -> Injection:
    what = f"SIGSTOP of {victim.replica}'s engine (group {victim.api_pid}), never continued"
    ledger.hold(Undo(f"SIGCONT {victim.replica}'s engine group {victim.api_pid}",
                     victim.api_pid, signal.SIGCONT, group=True))  # fmt: skip
    _signal(victim.api_pid, signal.SIGSTOP, group=True)
    return Injection(what, Recovery.ENGINE_REPLACED, victim.api_pid)


def wedge_engine(victim: Victim, ledger: Ledger) -> Injection:
    if core := procs.engine_core(victim.api_pid):
        ledger.hold(Undo(f"SIGCONT {victim.replica}'s EngineCore {core.pid}", core.pid,
                         signal.SIGCONT))  # fmt: skip
        _signal(core.pid, signal.SIGSTOP)
        what = f"SIGSTOP of {victim.replica}'s EngineCore {core.pid} (its API process lives on)"
    elif procs.is_stand_in(victim.api_pid):
        ledger.hold(Undo(f"unwedge (SIGUSR2) {victim.replica}'s stand-in engine {victim.api_pid}",
                         victim.api_pid, signal.SIGUSR2))  # fmt: skip
        _signal(victim.api_pid, signal.SIGUSR1)
        what = f"wedge (SIGUSR1) of {victim.replica}'s stand-in engine {victim.api_pid}"
    else:
        raise NotApplicable(f"engine {victim.api_pid} is neither vLLM nor the stand-in")
    return Injection(what, Recovery.ENGINE_REPLACED, victim.api_pid)


def slow_engine(victim: Victim, ledger: Ledger, seconds: float) -> Injection:
    ledger.hold(Undo(f"SIGCONT {victim.replica}'s engine group {victim.api_pid}",
                     victim.api_pid, signal.SIGCONT, group=True))  # fmt: skip
    _signal(victim.api_pid, signal.SIGSTOP, group=True)
    what = f"SIGSTOP of {victim.replica}'s engine for {seconds:g}s, then SIGCONT"
    return Injection(what, Recovery.ENGINE_SERVING, victim.api_pid, release_after=seconds)


def kill_daemon(name: str, port: int) -> Injection:
    pid = procs.listening_pid(port)
    if pid is None:
        raise NotApplicable(f"no process of ours listens on port {port} (the {name})")
    _signal(pid, signal.SIGKILL)
    return Injection(f"kill -9 {pid}, the {name}", Recovery.DAEMON_BACK, pid, port=port)


def inject(scenario: Scenario, victim: Victim, ledger: Ledger, slow_seconds: float) -> Injection:
    """Do it (blocking: run in a thread). NotApplicable if it cannot be done here."""
    match scenario:
        case Scenario.KILL_WORKER:
            return kill_worker(victim, ledger)
        case Scenario.KILL_ENGINE:
            return kill_engine(victim, ledger)
        case Scenario.STOP_ENGINE:
            return stop_engine(victim, ledger)
        case Scenario.WEDGE_ENGINE | Scenario.WEDGE_IDLE_ENGINE:
            return wedge_engine(victim, ledger)
        case Scenario.SLOW_ENGINE:
            return slow_engine(victim, ledger, slow_seconds)
        case Scenario.KILL_SUPERVISOR:
            return kill_daemon("supervisor", victim.admin_port)
        case Scenario.KILL_GATEWAY:
            return kill_daemon("gateway", victim.gateway_port)
