"""One model replica: the single owner of one engine process and of its state.

Only the replica's own task changes its state (one writer); others ask it to stop and await the
result. Every change goes through `_transition`, which checks the table in `states.py` and records
an event with a reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from supervisor.engine import EngineHandle, LaunchPlan, Prepare
from supervisor.events import EventKind, EventLog
from supervisor.gateway_view import GatewayView
from supervisor.liveness import ProgressTracker, Signal, gateway_stall
from supervisor.placement import Placement
from supervisor.probe import EngineProbe
from supervisor.restart import RestartPolicy
from supervisor.start_failure import FailureKind, StartFailure, classify, log_tail, read_tail
from supervisor.states import ACTIVE_STATES, ReplicaState, can_transition

log = logging.getLogger("sem.replica")
T = TypeVar("T")

Launch = Callable[[LaunchPlan], Awaitable[EngineHandle]]
PlanFactory = Callable[[Placement | None], LaunchPlan]
# Until a restarting replica may start its engine again (start_gate.StartGate.wait_turn).
StartTurn = Callable[["Replica"], Awaitable[None]]


@dataclass(frozen=True)
class ReplicaTiming:
    start_timeout: float = 600.0  # spawn to /health 200 (vLLM itself gives up at 600 s)
    health_interval: float = 2.0  # /health poll period once ready
    health_failures: int = 3  # this many failed polls in a row: unhealthy
    stall_after: float = 10.0  # work in flight and no progress this long: wedged (liveness.py)
    progress_interval: float = 10.0  # log a "still starting" line this often
    stop_grace: float = 15.0  # SIGTERM to SIGKILL
    drain_poll: float = 0.25


class _Outcome:
    READY = "ready"
    EXITED = "exited"
    UNHEALTHY = "unhealthy"
    TIMEOUT = "timeout"
    STOP = "stop"


class Replica:
    def __init__(
        self,
        *,
        replica_id: str,
        model: str,
        make_plan: PlanFactory,
        launch: Launch,
        probe: EngineProbe,
        events: EventLog,
        on_change: Callable[[Replica], None],
        policy: RestartPolicy,
        timing: ReplicaTiming,
        initial: ReplicaState = ReplicaState.PENDING,
        reason: str = "created",
        gateway: GatewayView | None = None,
        start_turn: StartTurn | None = None,
        rng: random.Random | None = None,
        prepare: Prepare | None = None,
    ) -> None:
        self.id = replica_id
        self.model = model
        self._make_plan = make_plan
        self._prepare = prepare  # None: the engine starts from the plan as made
        self._launch = launch
        self._probe = probe
        self._events = events
        self._on_change = on_change
        self._policy = policy
        self._timing = timing
        self._gateway = gateway  # its load and route table as the gateway sees them
        self._start_turn = start_turn  # None: a restart starts as soon as its backoff is over
        self._rng = rng or random.Random()  # the backoff's jitter
        self._last_delay: float | None = None
        self.state = initial
        self.reason = reason
        self.since = time.time()
        self.restarts = 0
        self.process: EngineHandle | None = None
        self.plan: LaunchPlan | None = None
        self.placement: Placement | None = None  # set once placed; kept across restarts
        self.pending_since = time.monotonic()
        self.seq = 0  # arrival order, for first-come-first-served placement
        self.digest = ""  # the spec its engines start from (store.spec_digest)
        self.max_num_seqs = 1  # its engines' batch size: the gateway's slots on it
        self.start_failure: StartFailure | None = None  # why its last engine failed to start
        self._failures: list[float] = []
        self._stop_requested = asyncio.Event()
        self._drain_deadline = 0.0
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()  # replaced by a fresh one at every transition

    # -- queries -----------------------------------------------------------------------------

    @property
    def url(self) -> str | None:
        return f"http://{self.plan.host}:{self.plan.port}" if self.plan else None

    @property
    def started(self) -> bool:
        """Its lifecycle task runs (placed or adopted): the scheduler leaves it alone."""
        return self._task is not None

    @property
    def done(self) -> bool:
        return self.state is ReplicaState.STOPPED

    def snapshot(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state.value,
            "reason": self.reason,
            "since": self.since,
            "port": self.plan.port if self.plan else None,
            "pid": self.process.pid if self.process else None,
            "devices": list(self.placement.device_ids) if self.placement else [],
            "reserved": self.placement.per_device if self.placement else 0,
            "restarts": self.restarts,
            "log": str(self.plan.log_path) if self.plan else None,
        }

    # -- commands ----------------------------------------------------------------------------

    @property
    def holds_reservation(self) -> bool:
        return self.placement is not None and self.state in ACTIVE_STATES

    def note_pending(self, reason: str) -> bool:
        """The scheduler's latest word on why this pending replica waits; True if it changed."""
        assert self.state is ReplicaState.PENDING
        changed, self.reason = self.reason != reason, reason
        return changed

    def note_wait(self, reason: str) -> None:
        """Why this restarting replica, its backoff over, does not start yet (the start gate)."""
        assert self.state is ReplicaState.RESTARTING
        self.reason = reason

    def start(self, placement: Placement | None = None) -> None:
        """Begin the lifecycle task (pending -> starting -> ready ...) on these devices."""
        assert self._task is None, "started twice"
        self.placement = placement
        self._task = asyncio.create_task(self._run(None), name=f"replica-{self.id}")

    def adopt(self, placement: Placement, engine: EngineHandle) -> None:
        """Take over an engine an earlier supervisor started: pending -> starting -> ready once
        its /health answers, with no new process."""
        assert self._task is None, "started twice"
        self.placement = placement
        self.plan = replace(self._make_plan(placement), port=engine.port, log_path=engine.log_path)
        self._task = asyncio.create_task(self._run(engine), name=f"replica-{self.id}")

    async def wait_for_state(self, states: Collection[ReplicaState]) -> ReplicaState:
        """Until the replica is in one of `states`; that state."""
        while self.state not in states:
            await self._changed.wait()
        return self.state

    async def stop(self, drain_timeout: float) -> None:
        """Drain (up to `drain_timeout` s), stop the engine, and return once stopped."""
        if self.state is ReplicaState.STOPPED:  # stopped already: nothing to do
            return
        self._drain_deadline = time.monotonic() + drain_timeout
        self._stop_requested.set()
        if self._task is None:
            self._transition(ReplicaState.STOPPED, "stopped before it started")
            return
        await asyncio.shield(self._task)

    # -- the lifecycle -----------------------------------------------------------------------

    def _transition(self, new: ReplicaState, reason: str) -> None:
        if not can_transition(self.state, new):
            raise RuntimeError(f"{self.id}: illegal transition {self.state} -> {new}")
        old, self.state, self.reason, self.since = self.state, new, reason, time.time()
        self._events.emit(
            EventKind.TRANSITION, self.id, f"{old} -> {new}: {reason}", model=self.model,
            old=old.value, new=new.value, reason=reason,
        )  # fmt: skip
        self._on_change(self)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _run(self, adopted: EngineHandle | None) -> None:
        try:
            await self._lifecycle(adopted)
        except Exception as exc:  # a bug here must not leave an engine behind unowned
            log.exception("%s: lifecycle task crashed", self.id)
            if self.process is not None:
                await self.process.stop(self._timing.stop_grace)
            if self.state is ReplicaState.FAILED or can_transition(self.state, ReplicaState.FAILED):
                await self._failed(f"internal error: {exc!r}")

    async def _failed(self, reason: str) -> None:
        """FAILED, like a crash loop: it stays so (its engine gone) until it is removed."""
        if self.state is not ReplicaState.FAILED:
            self._transition(ReplicaState.FAILED, reason)
        await self._stop_requested.wait()
        self._transition(ReplicaState.STOPPED, "removed")  # FAILED -> STOPPED

    async def _lifecycle(self, adopted: EngineHandle | None) -> None:
        while True:
            if adopted is not None:  # PENDING -> STARTING, with the engine already running
                self.process = process = adopted
                adopted = None
                self._transition(
                    ReplicaState.STARTING,
                    f"re-adopted engine pid {process.pid} on port {process.port}",
                )
            else:
                self.plan = self._make_plan(self.placement)
                # PENDING/RESTARTING -> STARTING
                where = "on its node" if self._prepare else f"on port {self.plan.port}"
                self._transition(ReplicaState.STARTING, f"spawning engine {where}")
                if (spawned := await self._spawn(self.plan)) is None:
                    return
                process = spawned
            outcome, detail = await self._until_ready(process)
            if outcome == _Outcome.EXITED and await self._start_failed(process):
                return
            if outcome == _Outcome.READY:
                self._transition(ReplicaState.READY, detail)  # STARTING -> READY
                outcome, detail = await self._watch(process)
            if outcome == _Outcome.STOP:
                await self._drain_and_stop(process)
                return
            if not await self._backoff(detail, process):
                return

    async def _spawn(self, plan: LaunchPlan) -> EngineHandle | None:
        """Prepare the engine's start (a removal does not wait for it: a cluster node may be
        caching the model) and spawn it; None if the replica was removed meanwhile or cannot
        start at all (then failed)."""
        try:
            if self._prepare is not None:
                prepared = await self._until_stopped_or(self._prepare(plan))
                if prepared is None:
                    self._transition(ReplicaState.STOPPED, "removed before its engine started")
                    return None
                self.plan = plan = prepared
            self.process = await self._launch(plan)
        except OSError as exc:
            # Cannot exec the engine, or cache its model on its node: retrying will not help.
            await self._failed(f"cannot start engine: {exc}")
            return None
        return self.process

    async def _start_failed(self, process: EngineHandle) -> bool:
        """A start failure the backoff cannot cure (start_failure.py): bad configuration ->
        failed at once; out of memory -> back to pending, for the scheduler to place it again
        with the raised need (the registry's hook reads `start_failure` on the transition).
        True if handled (the lifecycle task ends); False: back off as for any crash."""
        code = process.returncode
        failure = classify(code, read_tail(process.log_path))
        self.start_failure = failure
        if failure.kind is FailureKind.OTHER:
            return False
        await process.stop(self._timing.stop_grace)
        now = time.monotonic()
        self._failures.append(now)
        if failure.kind is FailureKind.BAD_CONFIG or self._policy.gives_up(self._failures, now):
            await self._failed(failure.describe(code))  # STARTING -> FAILED
            return True
        self._task, self.pending_since = None, now  # the scheduler places it again
        self._transition(ReplicaState.PENDING, f"{failure.describe(code)}; to be placed again")
        self.placement = None
        if self._stop_requested.is_set():
            self._transition(ReplicaState.STOPPED, "removed")  # PENDING -> STOPPED
        return True

    async def _backoff(self, failure: str, process: EngineHandle) -> bool:
        """After a failure: stop what is left of the engine's group, then wait out the backoff
        (True), or give up / get stopped (False)."""
        now = time.monotonic()
        self._failures.append(now)
        if self._policy.gives_up(self._failures, now):
            recent = len(self._failures)
            await process.stop(self._timing.stop_grace)  # memory is released once it is gone
            await self._failed(
                f"{failure}; {recent} failures in {self._policy.window:.0f}s, giving up"
            )
            return False
        self.restarts += 1
        delay = self._policy.next_delay(self.restarts, self._last_delay, self._rng)
        self._last_delay = delay
        # STARTING/READY -> RESTARTING, before the (up to stop_grace) stop of the rest of the
        # group: the gateway must stop sending requests to it at once.
        self._transition(ReplicaState.RESTARTING, f"{failure}; restart in {round(delay, 2):g}s")
        if process.returncode is None:
            await self._leave_routes()
        await process.stop(self._timing.stop_grace)  # leave no half-dead group behind
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, delay - (time.monotonic() - now))):
                await self._stop_requested.wait()
        if not self._stop_requested.is_set() and self._start_turn is not None:
            await self._until_stopped_or(self._start_turn(self))
        if self._stop_requested.is_set():
            self._transition(ReplicaState.STOPPED, "removed while restarting")
            return False
        return True

    async def _until_stopped_or(self, turn: Awaitable[T]) -> T | None:
        """`turn`'s result, or None on a stop request (then `turn` is cancelled)."""
        waiting = asyncio.ensure_future(turn)
        stopping = asyncio.ensure_future(self._stop_requested.wait())
        try:
            await asyncio.wait({waiting, stopping}, return_when="FIRST_COMPLETED")
        finally:
            for fut in (waiting, stopping):
                fut.cancel()
        if waiting.done() and not waiting.cancelled():
            return waiting.result()  # or its error
        return None

    async def _wait_for(self, process: EngineHandle, timeout: float) -> str | None:
        """Wait up to `timeout` s for the engine to exit or a stop request; None if neither."""
        exited = asyncio.ensure_future(process.wait())
        stopping = asyncio.ensure_future(self._stop_requested.wait())
        try:
            await asyncio.wait({exited, stopping}, timeout=timeout, return_when="FIRST_COMPLETED")
        finally:
            for fut in (exited, stopping):
                fut.cancel()
        if self._stop_requested.is_set():
            return _Outcome.STOP
        if process.returncode is not None:
            return _Outcome.EXITED
        return None

    async def _until_ready(self, process: EngineHandle) -> tuple[str, str]:
        started = time.monotonic()
        next_progress = started + self._timing.progress_interval
        assert self.url is not None
        while True:
            if await self._probe.healthy(self.url):
                return _Outcome.READY, f"/health 200 after {time.monotonic() - started:.1f}s"
            outcome = await self._wait_for(process, timeout=0.5)
            if outcome == _Outcome.STOP:
                return outcome, "stop requested"
            if outcome == _Outcome.EXITED:
                return outcome, (
                    f"engine exited with code {process.returncode} while starting"
                    f" (log: {log_tail(process)})"
                )
            elapsed = time.monotonic() - started
            if elapsed > self._timing.start_timeout:
                return _Outcome.TIMEOUT, f"no /health 200 within {self._timing.start_timeout:.0f}s"
            if time.monotonic() >= next_progress:
                next_progress += self._timing.progress_interval
                log.info("%s: starting for %.0fs; engine log: %s", self.id, elapsed,
                         log_tail(process, lines=1))  # fmt: skip

    async def _watch(self, process: EngineHandle) -> tuple[str, str]:
        """Until the engine exits, a stop is requested, or it is unhealthy by any signal."""
        failures = 0
        progress = ProgressTracker(self._timing.stall_after)
        while True:
            outcome = await self._wait_for(process, timeout=self._timing.health_interval)
            if outcome == _Outcome.STOP:
                return outcome, "stop requested"
            if outcome == _Outcome.EXITED:
                return outcome, f"engine exited with code {process.returncode}"
            healthy, wedged = await self._check(progress)
            if wedged is not None:
                return _Outcome.UNHEALTHY, wedged
            failures = 0 if healthy else failures + 1
            if failures >= self._timing.health_failures:
                return _Outcome.UNHEALTHY, f"{Signal.HEALTH} failed {failures} times in a row"

    async def _check(self, progress: ProgressTracker) -> tuple[bool, str | None]:
        """One liveness round: /health and the engine's counters, asked together, while the
        gateway's report is read every second (a frozen engine answers neither: its probes
        hang until they time out). Whether /health said 200, and why it is wedged, if it is."""
        assert self.url is not None
        checks = asyncio.gather(self._probe.healthy(self.url), self._probe.counters(self.url))
        try:
            while True:
                load = self._gateway.load(self.id) if self._gateway else None
                if (stalled := gateway_stall(load, self._timing.stall_after)) is not None:
                    return False, stalled
                if (await asyncio.wait({checks}, timeout=1.0))[0]:
                    break
        finally:
            if not checks.done():  # the gateway's report came first: its probes are dropped
                checks.cancel()
                await asyncio.wait({checks})
                if not checks.cancelled():
                    checks.exception()  # read: left unread, asyncio logs it as an error
        healthy, counters = checks.result()
        return healthy, progress.observe(counters, time.monotonic())

    async def _leave_routes(self, blind_wait: float = 0.0) -> None:
        """Once the replica has left the route table (it is no longer ready): wait until the
        gateway holds that table, so that no request reaches the engine once it is signalled
        (vLLM ends open streams as if finished on SIGTERM: engine-notes.md). Bounded: a gateway
        that does not answer costs `route_wait` s, then the engine is stopped all the same.
        Without a view of the gateway: `blind_wait` s."""
        if self._gateway is None:
            if blind_wait:
                await asyncio.sleep(blind_wait)
        elif not await self._gateway.unrouted():
            log.warning("%s: the gateway did not confirm the new route table in time", self.id)

    async def _outstanding(self) -> int:
        """Requests still on the engine: its own count, or the gateway's when the engine keeps
        none (disable_log_stats); 0 if neither knows."""
        assert self.url is not None
        if (engine := await self._probe.outstanding(self.url)) is not None:
            return engine
        load = self._gateway.load(self.id) if self._gateway else None
        return load.in_flight if load is not None else 0

    async def _drain_and_stop(self, process: EngineHandle) -> None:
        # STARTING/READY -> DRAINING: the route table drops us, so no new requests arrive.
        self._transition(ReplicaState.DRAINING, "stop requested")
        await self._leave_routes(blind_wait=self._timing.drain_poll)
        while time.monotonic() < self._drain_deadline and process.returncode is None:
            if not await self._outstanding():
                break
            await asyncio.sleep(self._timing.drain_poll)
        killed = await process.stop(self._timing.stop_grace)
        how = "killed after the grace period" if killed else "engine exited"
        self._transition(ReplicaState.STOPPED, how)  # DRAINING -> STOPPED
