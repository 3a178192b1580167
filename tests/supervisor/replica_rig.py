"""Stand-ins for one replica's world, in memory: its engine, its launcher, its probe.

`Rig` wires a `Replica` to them with millisecond timings, and keeps what the replica reported
(its events, every state `on_change` was told of), so a test can drive any edge of the
transition table without a process (tests/supervisor/test_replica_edges.py).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from supervisor.engine import LaunchPlan, Prepare
from supervisor.events import Event, EventKind, EventLog
from supervisor.gateway_view import GatewayView
from supervisor.liveness import Counters
from supervisor.placement import Placement
from supervisor.probe import EngineProbe
from supervisor.replica import Replica, ReplicaTiming
from supervisor.restart import RestartPolicy
from supervisor.states import ReplicaState

TIMING = ReplicaTiming(
    start_timeout=60, health_interval=0.01, health_failures=2, progress_interval=60,
    stop_grace=0.01, drain_poll=0.01,
)  # fmt: skip
POLICY = RestartPolicy(backoff_base=0.02, backoff_cap=0.02, max_failures=3, window=60)
STEP = 2.0  # seconds any one transition may take here (they take milliseconds)


@dataclass
class FakeEngine:
    """An engine process in memory: alive until told to exit or stopped."""

    port: int
    log_path: Path
    pid: int
    ignores_sigterm: bool = False  # stop() then has to "kill" it after the grace period
    returncode: int | None = None
    stops: int = 0
    _exited: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def pgid(self) -> int:
        return self.pid

    def exit(self, code: int) -> None:
        self.returncode = code
        self._exited.set()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    async def stop(self, grace: float) -> bool:
        self.stops += 1
        if self.returncode is None:
            self.exit(-9 if self.ignores_sigterm else -15)
            return self.ignores_sigterm
        return False


@dataclass
class FakeLauncher:
    """Launches FakeEngines (or fails to exec, when told) and keeps them in order."""

    ignores_sigterm: bool = False
    error: OSError | None = None
    engines: list[FakeEngine] = field(default_factory=list)
    _launched: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, plan: LaunchPlan) -> FakeEngine:
        if self.error is not None:
            raise self.error
        engine = FakeEngine(plan.port, plan.log_path, 1000 + len(self.engines),
                            ignores_sigterm=self.ignores_sigterm)  # fmt: skip
        self.engines.append(engine)
        self._launched.set()
        return engine

    async def engine(self, number: int) -> FakeEngine:
        """The `number`th engine launched (1-based), once it is."""
        async with asyncio.timeout(STEP):
            while len(self.engines) < number:
                self._launched.clear()
                await self._launched.wait()
        return self.engines[number - 1]


@dataclass
class FakeProbe:
    """Answers /health, the outstanding-request count and the counters as the test sets them."""

    health: bool = False
    outstanding_answers: list[int | None] = field(default_factory=list)  # then 0
    outstanding_asked: int = 0
    counters_now: Counters | None = None  # what /metrics says of the engine's work
    hangs: bool = False  # frozen (SIGSTOP): /health and /metrics never answer

    async def healthy(self, base_url: str) -> bool:
        if self.hangs:
            await asyncio.Event().wait()
        return self.health

    async def counters(self, base_url: str) -> Counters | None:
        return self.counters_now

    async def outstanding(self, base_url: str) -> int | None:
        self.outstanding_asked += 1
        return self.outstanding_answers.pop(0) if self.outstanding_answers else 0


class Rig:
    """One replica over the stand-ins, with what it reported."""

    def __init__(
        self,
        log_dir: Path,
        policy: RestartPolicy,
        timing: ReplicaTiming,
        gateway: GatewayView | None = None,
        prepare: Prepare | None = None,
    ) -> None:
        """`gateway`: the gateway's side (its reports, its long-polls of the route table, which
        every state change publishes anew), else none; `prepare`: before each spawn (a cluster
        node caching the model), else none."""
        self.launcher = FakeLauncher()
        self.probe = FakeProbe()
        self.events = EventLog()
        self.seen: list[ReplicaState] = []  # every state on_change was told of
        self.plans = 0
        self._ports = itertools.count(9000)
        self._log_dir = log_dir
        self.broken_plan: Exception | None = None  # make_plan raises this from now on
        self.log_text = "loading weights\nRuntimeError: Engine core initialization failed\n"
        self.replica = Replica(
            replica_id="m-0", model="m", make_plan=self._make_plan, launch=self.launcher,
            probe=cast(EngineProbe, self.probe), events=self.events,
            on_change=self._on_change, policy=policy, timing=timing, gateway=gateway,
            prepare=prepare,
        )  # fmt: skip
        self.gateway = gateway

    def _on_change(self, replica: Replica) -> None:
        self.seen.append(replica.state)
        if self.gateway is not None:
            self.gateway.routes.publish({})

    def _make_plan(self, placement: Placement | None) -> LaunchPlan:
        if self.broken_plan is not None:
            raise self.broken_plan
        self.plans += 1
        log_path = self._log_dir / "m-0.log"
        log_path.write_text(self.log_text)
        return LaunchPlan(replica_id="m-0", served_name="m", model="/models/m",
                          port=next(self._ports), log_path=log_path, max_num_seqs=4)  # fmt: skip

    def start(self) -> None:
        self.replica.start(Placement("m-0", ("cpu",), 2**30, "fits"))

    async def reach(self, state: ReplicaState) -> None:
        async with asyncio.timeout(STEP):
            await self.replica.wait_for_state({state})

    def transitions(self) -> list[Event]:
        return self.events.recent("m-0", kind=EventKind.TRANSITION)

    def assert_edge(self, old: ReplicaState, new: ReplicaState, reason: str, since: float) -> Event:
        """The replica is in `new`, and its last event records `old -> new` after `since`, with
        a reason containing `reason`; that event."""
        assert self.replica.state is new
        event = self.transitions()[-1]
        assert (event.data["old"], event.data["new"]) == (old.value, new.value)
        assert reason in event.data["reason"], event.data["reason"]
        assert event.message == f"{old} -> {new}: {event.data['reason']}"
        assert since <= event.time <= time.time()
        assert self.replica.reason == event.data["reason"]
        assert abs(self.replica.since - event.time) < 0.1
        assert self.seen[-1] is new
        return event
