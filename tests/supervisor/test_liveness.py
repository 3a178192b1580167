"""Liveness by progress, stop before signal, drain by the gateway's count: the pure decisions
(liveness.py, the route publisher's view of the gateway), then one replica over the in-memory
rig (replica_rig.py) with a gateway side: its reports on a DemandBoard, its long-polls of the
route table played by the test."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from contract.report import GatewayReport, ReplicaLoad
from supervisor.demand import DemandBoard
from supervisor.gateway_view import GatewayView
from supervisor.liveness import Counters, ProgressTracker, gateway_stall, parse_counters
from supervisor.placement import Placement
from supervisor.route_table import RoutePublisher
from supervisor.states import ReplicaState
from tests.supervisor.replica_rig import POLICY, STEP, TIMING, FakeEngine, Rig

S = ReplicaState
STALL = 0.3  # the rig's stall_after: wedged after this long without progress

METRICS = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 2.0
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 40.0
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="m"} 7.0
vllm:generation_tokens_total{engine="1",model_name="m"} 3.0
"""


def test_counters_sum_tokens_over_engines_and_need_both_families():
    assert parse_counters(METRICS) == Counters(tokens=50.0, running=2)
    # disable_log_stats: no request gauges, nothing to judge progress by
    without_gauges = "\n".join(line for line in METRICS.splitlines() if "num_requests" not in line)
    assert parse_counters(without_gauges) is None
    assert parse_counters("") is None


def test_progress_tracker_flags_a_counter_stuck_while_requests_run():
    tracker = ProgressTracker(stall_after=10)
    assert tracker.observe(Counters(5, 2), now=0) is None
    assert tracker.observe(Counters(9, 2), now=8) is None, "moving"
    assert tracker.observe(Counters(9, 2), now=17) is None, "stuck 9 s: not yet"
    assert tracker.observe(None, now=18) is None, "no answer proves nothing"
    why = tracker.observe(Counters(9, 2), now=18.5)
    assert why == (
        "tokens processed stuck at 9 for 10.5s with 2 request(s) running (engine counters)"
    )


def test_progress_tracker_ignores_an_idle_engine():
    tracker = ProgressTracker(stall_after=10)
    for now in range(0, 60, 5):
        assert tracker.observe(Counters(5, 0), now=now) is None
    assert tracker.observe(Counters(5, 1), now=61) is None, "work began at 61, not at 0"


def test_gateway_stall_needs_work_in_flight_and_a_long_silence():
    assert gateway_stall(None, 10) is None, "no fresh report"
    assert gateway_stall(ReplicaLoad(in_flight=0, stalled_for=None), 10) is None
    assert gateway_stall(ReplicaLoad(in_flight=3, stalled_for=9.9), 10) is None
    why = gateway_stall(ReplicaLoad(in_flight=3, stalled_for=12.0), 10)
    assert why == "no progress for 12.0s with 3 request(s) in flight (gateway report)"


async def test_gateway_holds_a_version_only_once_it_asks_past_it():
    routes = RoutePublisher()
    routes.publish({})
    assert await routes.gateway_holds(routes.table.version, timeout=5), "no gateway: at once"
    poll = asyncio.create_task(routes.wait(routes.table.version, 30, gateway=True))
    await asyncio.sleep(0)
    routes.publish({})  # the gateway's poll returns this table...
    assert (await poll).version == 2
    started = time.monotonic()
    assert not await routes.gateway_holds(2, timeout=0.2), "...but it has not said it holds it"
    assert time.monotonic() - started >= 0.2
    holding = asyncio.create_task(routes.gateway_holds(2, timeout=5))
    next_poll = asyncio.create_task(routes.wait(2, 30, gateway=True))  # "I hold 2"
    assert await asyncio.wait_for(holding, STEP)
    routes.close()
    await next_poll


def post(board: DemandBoard, replica: str, in_flight: int, stalled_for: float | None) -> None:
    load = ReplicaLoad(in_flight=in_flight, stalled_for=stalled_for)
    board.post(GatewayReport(time=time.time(), replicas={replica: load}))


class Gateway:
    """The gateway's side of one rig: reports on the board; `follow()` long-polls the route
    table as the gateway does, each poll saying which version it holds."""

    def __init__(self) -> None:
        self.board = DemandBoard()
        self.routes = RoutePublisher()
        self.view = GatewayView(self.board, self.routes, route_wait=STEP)
        self.follower: asyncio.Task[None] | None = None

    def follow(self) -> None:
        async def loop() -> None:
            held = -1
            while True:
                held = (await self.routes.wait(held, 30, gateway=True)).version

        self.follower = asyncio.create_task(loop())


@pytest.fixture
async def gateway_rig(tmp_path: Path) -> AsyncIterator[Callable[[], tuple[Rig, Gateway]]]:
    made: list[tuple[Rig, Gateway]] = []

    def factory() -> tuple[Rig, Gateway]:
        gateway = Gateway()
        timing = replace(TIMING, stall_after=STALL, health_interval=0.05)
        made.append((Rig(tmp_path, POLICY, timing, gateway.view), gateway))
        return made[-1]

    yield factory
    for rig, gateway in made:
        if not rig.replica.done:
            async with asyncio.timeout(STEP * 3):
                await rig.replica.stop(drain_timeout=0)
        if gateway.follower is not None:
            gateway.follower.cancel()
        assert all(e.returncode is not None for e in rig.launcher.engines), "engine left running"


async def ready(rig: Rig) -> FakeEngine:
    rig.probe.health = True
    rig.replica.start(Placement("m-0", ("cpu",), 2**30, "fits"))
    await rig.reach(S.READY)
    return await rig.launcher.engine(1)


async def test_a_healthy_engine_whose_counters_stand_still_is_restarted(gateway_rig):
    rig, _ = gateway_rig()
    engine = await ready(rig)
    since = time.time()
    rig.probe.counters_now = Counters(tokens=120, running=3)  # /health 200, no token moves
    await rig.reach(S.RESTARTING)
    event = rig.assert_edge(S.READY, S.RESTARTING, "(engine counters); restart in", since)
    assert "stuck at 120" in event.data["reason"] and engine.returncode == -15
    assert STALL <= event.time - since < STEP


async def test_a_busy_engine_whose_counters_move_stays_ready(gateway_rig):
    rig, _ = gateway_rig()
    await ready(rig)
    for tokens in range(20):
        rig.probe.counters_now = Counters(tokens=tokens, running=3)
        await asyncio.sleep(STALL / 4)
    assert rig.replica.state is S.READY


async def test_a_frozen_engine_the_gateway_reports_stalled_is_restarted_at_once(
    gateway_rig, caplog: pytest.LogCaptureFixture
):
    rig, gateway = gateway_rig()
    engine = await ready(rig)
    since = time.time()
    rig.probe.hangs = True  # SIGSTOP: /health and /metrics never answer
    post(gateway.board, "m-0", in_flight=4, stalled_for=STALL + 0.1)
    await rig.reach(S.RESTARTING)
    event = rig.assert_edge(S.READY, S.RESTARTING, "4 request(s) in flight (gateway report)", since)
    assert event.time - since < 1.5, "within a second of the report, not after /health timeouts"
    assert engine.returncode == -15
    rig.probe.hangs = False  # the engine started in its place answers
    await asyncio.sleep(0.1)  # a few loop turns: the dropped probes end, cancelled
    gc.collect()  # a probe round left unreaped is logged when collected
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], "the abandoned probes are reaped, not logged as never retrieved"


async def test_an_unhealthy_engine_is_signalled_only_once_the_gateway_holds_a_table_without_it(
    gateway_rig,
):
    rig, gateway = gateway_rig()
    engine = await ready(rig)
    gateway.follow()
    await asyncio.sleep(0.05)  # the gateway holds the table with m-0 ready
    gateway.follower.cancel()  # ... and is slow to take the next one
    rig.probe.health = False
    await rig.reach(S.RESTARTING)
    await asyncio.sleep(0.3)
    assert engine.returncode is None, "the gateway may still route to it: not signalled yet"
    gateway.follow()  # the gateway polls again, holding the table without m-0
    async with asyncio.timeout(STEP):
        await engine.wait()
    assert gateway.routes.table.version > 0


async def test_removal_waits_for_the_gateways_in_flight_when_the_engine_counts_none(gateway_rig):
    rig, gateway = gateway_rig()
    engine = await ready(rig)
    rig.probe.outstanding_answers = [None] * 1000  # disable_log_stats: no request gauges
    post(gateway.board, "m-0", in_flight=2, stalled_for=0.0)
    stopping = asyncio.create_task(rig.replica.stop(drain_timeout=30))
    await rig.reach(S.DRAINING)
    await asyncio.sleep(0.3)
    assert engine.returncode is None and not stopping.done(), "2 requests still in flight"
    post(gateway.board, "m-0", in_flight=0, stalled_for=None)
    async with asyncio.timeout(STEP):
        await stopping
    assert engine.returncode == -15 and rig.replica.state is S.STOPPED
