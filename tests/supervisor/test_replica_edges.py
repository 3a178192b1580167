"""Every edge of the replica's transition table (supervisor/states.py), without a process.

`Replica` takes its launch and probe as arguments: here (replica_rig.py) the engine is in memory and
exits when told, the probe answers what the test says, and the timings are milliseconds. Each
test is named after the edge it drives and checks both the state reached and the event recorded
for it (time and reason). `covers` ties a test to its edge, and the last test proves the tests
together cover the whole table.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from supervisor.engine import LaunchPlan, Prepare
from supervisor.placement import Placement
from supervisor.replica import ReplicaTiming
from supervisor.restart import RestartPolicy
from supervisor.states import ReplicaState, can_transition
from tests.supervisor.replica_rig import POLICY, STEP, TIMING, FakeEngine, Rig

S = ReplicaState
Edge = tuple[ReplicaState, ReplicaState]
TestFn = Callable[..., Any]

COVERED: dict[Edge, list[str]] = {}


def covers(old: ReplicaState, new: ReplicaState) -> Callable[[TestFn], TestFn]:
    """Marks a test as the proof of the edge `old -> new`."""

    def mark(test: TestFn) -> TestFn:
        COVERED.setdefault((old, new), []).append(test.__name__)
        return test

    return mark


@pytest.fixture
async def make_rig(tmp_path: Path) -> AsyncIterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def factory(
        policy: RestartPolicy = POLICY,
        timing: ReplicaTiming = TIMING,
        prepare: Prepare | None = None,
    ) -> Rig:
        rigs.append(Rig(tmp_path, policy, timing, prepare=prepare))
        return rigs[-1]

    yield factory
    for rig in rigs:  # whatever state a test left it in, the replica must still stop
        if rig.replica.done:
            continue
        async with asyncio.timeout(STEP):
            await rig.replica.stop(drain_timeout=0)
        assert rig.replica.state is S.STOPPED
        assert all(e.returncode is not None for e in rig.launcher.engines), "engine left running"


async def started_rig(
    make_rig: Callable[..., Rig], healthy: bool = False, **kwargs: Any
) -> tuple[Rig, FakeEngine]:
    """A rig whose replica was placed, with its first engine launched."""
    rig = make_rig(**kwargs)
    rig.probe.health = healthy
    rig.start()
    return rig, await rig.launcher.engine(1)


async def ready_rig(make_rig: Callable[..., Rig], **kwargs: Any) -> tuple[Rig, FakeEngine]:
    rig, engine = await started_rig(make_rig, healthy=True, **kwargs)
    await rig.reach(S.READY)
    return rig, engine


async def restarting_rig(make_rig: Callable[..., Rig], backoff: float) -> Rig:
    """A rig whose first engine died before it was ready: restarting, after `backoff` s."""
    policy = RestartPolicy(backoff_base=backoff, max_failures=3, window=60)
    rig, engine = await started_rig(make_rig, policy=policy)
    engine.exit(1)
    await rig.reach(S.RESTARTING)
    return rig


# -- pending -----------------------------------------------------------------------------------


@covers(S.PENDING, S.STARTING)
async def test_pending_to_starting_when_placed(make_rig):
    rig = make_rig()
    since = time.time()
    rig.start()
    await rig.reach(S.STARTING)
    rig.assert_edge(S.PENDING, S.STARTING, "spawning engine on port 9000", since)
    assert (await rig.launcher.engine(1)).port == 9000


@covers(S.PENDING, S.STARTING)
async def test_pending_to_starting_when_an_engine_is_adopted(make_rig, tmp_path: Path):
    rig = make_rig()
    rig.probe.health = True
    engine = FakeEngine(port=9500, log_path=tmp_path / "old.log", pid=77)
    since = time.time()
    rig.replica.adopt(Placement("m-0", ("cpu",), 2**30, "re-adopted"), engine)
    await rig.reach(S.READY)
    starting = rig.transitions()[0]
    assert (starting.data["old"], starting.data["new"]) == ("pending", "starting")
    assert starting.data["reason"] == "re-adopted engine pid 77 on port 9500"
    assert since <= starting.time
    assert rig.launcher.engines == [], "no new process"
    assert rig.replica.url == "http://127.0.0.1:9500"


@covers(S.PENDING, S.STOPPED)
async def test_pending_to_stopped_when_stopped_before_it_started(make_rig):
    rig = make_rig()
    since = time.time()
    await rig.replica.stop(drain_timeout=1)
    rig.assert_edge(S.PENDING, S.STOPPED, "stopped before it started", since)
    assert rig.plans == 0 and rig.launcher.engines == []


async def test_stopping_twice_before_it_started_stops_it_once(make_rig):
    rig = make_rig()
    await rig.replica.stop(drain_timeout=1)
    await rig.replica.stop(drain_timeout=1)
    assert rig.replica.state is S.STOPPED
    assert [e.data["new"] for e in rig.transitions()] == ["stopped"]


# -- starting ----------------------------------------------------------------------------------


@covers(S.STARTING, S.READY)
async def test_starting_to_ready_when_health_answers(make_rig):
    rig = make_rig()
    rig.probe.health = True
    since = time.time()
    rig.start()
    engine = await rig.launcher.engine(1)
    await rig.reach(S.READY)
    rig.assert_edge(S.STARTING, S.READY, "/health 200 after", since)
    assert engine.returncode is None


@covers(S.STARTING, S.RESTARTING)
async def test_starting_to_restarting_when_exit_before_ready(make_rig):
    rig, engine = await started_rig(make_rig)
    since = time.time()
    engine.exit(1)
    await rig.reach(S.RESTARTING)
    rig.assert_edge(
        S.STARTING, S.RESTARTING,
        "engine exited with code 1 while starting (log: loading weights | RuntimeError: Engine"
        " core initialization failed); restart in 0.02s",
        since,
    )  # fmt: skip
    assert rig.replica.restarts == 1


@covers(S.STARTING, S.RESTARTING)
async def test_starting_to_restarting_when_no_health_within_start_timeout(make_rig):
    rig = make_rig(timing=replace(TIMING, start_timeout=0.1))
    since = time.time()
    rig.start()
    engine = await rig.launcher.engine(1)
    await rig.reach(S.RESTARTING)  # after one 0.5 s wait for an exit that does not come
    rig.assert_edge(S.STARTING, S.RESTARTING, "no /health 200 within 0s; restart in", since)
    assert engine.stops >= 1 and engine.returncode is not None, "the silent engine was stopped"


@covers(S.STARTING, S.FAILED)
async def test_starting_to_failed_when_the_engine_cannot_be_executed(make_rig):
    rig = make_rig()
    rig.launcher.error = FileNotFoundError(2, "No such file or directory", "/no/python")
    since = time.time()
    rig.start()
    await rig.reach(S.FAILED)
    rig.assert_edge(S.STARTING, S.FAILED, "cannot start engine: [Errno 2]", since)
    assert rig.replica.restarts == 0, "retrying cannot help: no backoff"


@covers(S.STARTING, S.STOPPED)
async def test_starting_to_stopped_when_removed_while_its_model_is_being_cached(make_rig):
    """A cluster node caching a large model: a removal does not wait for the download."""
    caching = asyncio.Event()

    async def slow_cache(plan: LaunchPlan) -> LaunchPlan:
        caching.set()
        await asyncio.sleep(3600)
        return plan

    rig = make_rig(prepare=slow_cache)
    rig.start()
    await asyncio.wait_for(caching.wait(), STEP)
    since = time.time()
    await asyncio.wait_for(rig.replica.stop(drain_timeout=60), STEP)
    rig.assert_edge(S.STARTING, S.STOPPED, "removed before its engine started", since)
    assert rig.launcher.engines == [], "no engine was spawned"


@covers(S.STARTING, S.FAILED)
async def test_starting_to_failed_when_its_model_cannot_be_cached_on_its_node(make_rig):
    async def failing_cache(plan: LaunchPlan) -> LaunchPlan:
        raise NotCachedOnNodeStandIn("hf://o/m@abc could not be cached on node n1: 404")

    rig = make_rig(prepare=failing_cache)
    since = time.time()
    rig.start()
    await rig.reach(S.FAILED)
    rig.assert_edge(S.STARTING, S.FAILED, "cannot start engine: hf://o/m@abc could not", since)


class NotCachedOnNodeStandIn(OSError):
    """supervisor.cluster.backend.NotCachedOnNode, without importing Ray."""


async def exit_while_starting(
    make_rig: Callable[..., Rig], log: str, code: int, then: ReplicaState
) -> tuple[Rig, FakeEngine, float]:
    """A replica whose first engine wrote `log` and exited with `code` before it was ready,
    once the replica reached `then`; the time just before the exit."""
    rig = make_rig()
    rig.log_text = log
    rig.start()
    engine = await rig.launcher.engine(1)
    since = time.time()
    engine.exit(code)
    await rig.reach(then)
    return rig, engine, since


@covers(S.STARTING, S.FAILED)
async def test_starting_to_failed_at_once_when_the_engine_refuses_its_arguments(make_rig):
    log = "usage: vllm serve\nvllm serve: error: unrecognized arguments: --bogus\n"
    rig, _, since = await exit_while_starting(make_rig, log, 2, S.FAILED)
    rig.assert_edge(S.STARTING, S.FAILED,
                    "engine refused its configuration: vllm serve: error: unrecognized arguments:"
                    " --bogus", since)  # fmt: skip
    assert rig.replica.restarts == 0 and len(rig.launcher.engines) == 1, "no retry"


@covers(S.STARTING, S.PENDING)
async def test_starting_to_pending_when_out_of_memory_at_start(make_rig):
    log = "Available KV cache memory: -0.5 GiB\nValueError: No available memory for the cache"
    log += " blocks.\n"
    rig, engine, since = await exit_while_starting(make_rig, log, 1, S.PENDING)
    rig.assert_edge(S.STARTING, S.PENDING,
                    "out of memory at start: ValueError: No available memory for the cache"
                    " blocks.; to be placed again", since)  # fmt: skip
    assert not rig.replica.started and rig.replica.placement is None, "for the scheduler"
    assert rig.replica.start_failure is not None
    assert rig.replica.start_failure.kv_available == -(2**29)
    assert engine.stops == 1 and rig.replica.restarts == 0
    rig.start()  # placed again: a new lifecycle
    await rig.launcher.engine(2)
    await rig.reach(S.STARTING)


@covers(S.STARTING, S.FAILED)
async def test_starting_to_failed_after_max_failures_in_window(make_rig):
    rig = make_rig()  # 3 failures within 60 s: give up
    rig.start()
    for n in (1, 2):
        (await rig.launcher.engine(n)).exit(1)
        await rig.reach(S.RESTARTING)
    last = await rig.launcher.engine(3)
    since = time.time()
    last.exit(1)
    await rig.reach(S.FAILED)
    rig.assert_edge(S.STARTING, S.FAILED, "while starting", since)
    assert rig.transitions()[-1].data["reason"].endswith("3 failures in 60s, giving up")
    assert rig.seen == [S.STARTING, S.RESTARTING] * 2 + [S.STARTING, S.FAILED]
    assert last.stops == 1, "what was left of the engine's group is stopped"


@covers(S.STARTING, S.DRAINING)
async def test_starting_to_draining_on_stop(make_rig):
    rig, engine = await started_rig(make_rig)
    since = time.time()
    stopping = asyncio.create_task(rig.replica.stop(drain_timeout=1))
    await rig.reach(S.DRAINING)
    rig.assert_edge(S.STARTING, S.DRAINING, "stop requested", since)
    await stopping
    assert engine.returncode == -15


# -- ready -------------------------------------------------------------------------------------


@covers(S.READY, S.DRAINING)
async def test_ready_to_draining_on_stop(make_rig):
    rig, engine = await ready_rig(make_rig)
    rig.probe.outstanding_answers = [2, 1]  # two requests in flight, then one, then none
    since = time.time()
    stopping = asyncio.create_task(rig.replica.stop(drain_timeout=5))
    await rig.reach(S.DRAINING)
    rig.assert_edge(S.READY, S.DRAINING, "stop requested", since)
    assert engine.returncode is None, "in-flight requests finish first"
    await stopping
    assert rig.probe.outstanding_asked == 3 and engine.returncode == -15


@covers(S.READY, S.RESTARTING)
async def test_ready_to_restarting_when_the_engine_exits(make_rig):
    rig, engine = await ready_rig(make_rig)
    since = time.time()
    engine.exit(-9)
    await rig.reach(S.RESTARTING)
    rig.assert_edge(S.READY, S.RESTARTING, "engine exited with code -9; restart in 0.02s", since)


@covers(S.READY, S.RESTARTING)
async def test_ready_to_restarting_after_failed_health_checks(make_rig):
    rig, engine = await ready_rig(make_rig)
    since = time.time()
    rig.probe.health = False
    await rig.reach(S.RESTARTING)
    rig.assert_edge(S.READY, S.RESTARTING, "/health failed 2 times in a row; restart in", since)
    assert engine.stops == 1 and engine.returncode == -15, "the hung engine is stopped"


@covers(S.READY, S.FAILED)
async def test_ready_to_failed_after_max_failures_in_window(make_rig):
    rig, engine = await ready_rig(make_rig, policy=RestartPolicy(max_failures=1, window=60))
    since = time.time()
    engine.exit(-9)
    await rig.reach(S.FAILED)
    rig.assert_edge(
        S.READY, S.FAILED, "engine exited with code -9; 1 failures in 60s, giving up", since
    )
    assert len(rig.launcher.engines) == 1


# -- restarting --------------------------------------------------------------------------------


@covers(S.RESTARTING, S.STARTING)
async def test_restarting_to_starting_after_the_backoff(make_rig):
    rig = await restarting_rig(make_rig, backoff=0.2)
    restarting = rig.transitions()[-1]
    await rig.reach(S.STARTING)
    starting = rig.assert_edge(S.RESTARTING, S.STARTING, "spawning engine on port 9001",
                               restarting.time)  # fmt: skip
    assert starting.time - restarting.time >= 0.2 - 0.01, "the backoff was waited out"
    assert (await rig.launcher.engine(2)).port == 9001, "a fresh plan, a new engine"


@covers(S.RESTARTING, S.STOPPED)
async def test_restarting_to_stopped_when_stopped_during_the_backoff(make_rig):
    rig = await restarting_rig(make_rig, backoff=30)
    since = time.time()
    await rig.replica.stop(drain_timeout=1)  # does not wait out the 30 s backoff
    rig.assert_edge(S.RESTARTING, S.STOPPED, "removed while restarting", since)
    assert len(rig.launcher.engines) == 1


async def broken_while_restarting(make_rig: Callable[..., Rig]) -> Rig:
    """A replica whose next launch plan cannot be made, caught while it restarts."""
    rig = await restarting_rig(make_rig, backoff=0.1)
    rig.broken_plan = ValueError("port range exhausted")
    return rig


@covers(S.RESTARTING, S.FAILED)
async def test_restarting_to_failed_when_the_lifecycle_breaks_while_restarting(make_rig):
    # Giving up after too many failures goes STARTING/READY -> FAILED directly (the failure is
    # counted before the replica would enter RESTARTING); from RESTARTING, FAILED is reached
    # only through the lifecycle task's own error guard, here a launch plan that cannot be made.
    since = time.time()
    rig = await broken_while_restarting(make_rig)
    await rig.reach(S.FAILED)
    rig.assert_edge(
        S.RESTARTING, S.FAILED, "internal error: ValueError('port range exhausted')", since
    )


@covers(S.FAILED, S.STOPPED)
async def test_failed_to_stopped_on_removal_after_an_internal_error(make_rig):
    rig = await broken_while_restarting(make_rig)
    await rig.reach(S.FAILED)
    since = time.time()
    await rig.replica.stop(drain_timeout=1)
    rig.assert_edge(S.FAILED, S.STOPPED, "removed", since)


# -- draining and failed -----------------------------------------------------------------------


@covers(S.DRAINING, S.STOPPED)
async def test_draining_to_stopped_once_the_engine_is_idle(make_rig):
    rig, engine = await ready_rig(make_rig)
    since = time.time()
    await rig.replica.stop(drain_timeout=5)
    rig.assert_edge(S.DRAINING, S.STOPPED, "engine exited", since)
    assert engine.returncode == -15


@covers(S.DRAINING, S.STOPPED)
async def test_draining_to_stopped_killed_at_the_drain_deadline(make_rig):
    rig, engine = await ready_rig(make_rig)
    engine.ignores_sigterm = True
    rig.probe.outstanding_answers = [3] * 1000  # never idle: the deadline ends the drain
    since = time.time()
    await rig.replica.stop(drain_timeout=0.1)
    rig.assert_edge(S.DRAINING, S.STOPPED, "killed after the grace period", since)
    draining, stopped = rig.transitions()[-2:]
    assert 0.1 - 0.01 <= stopped.time - draining.time < STEP
    assert engine.returncode == -9


@covers(S.FAILED, S.STOPPED)
async def test_failed_to_stopped_on_removal(make_rig):
    rig = make_rig()
    rig.launcher.error = PermissionError(13, "Permission denied")
    rig.start()
    await rig.reach(S.FAILED)
    since = time.time()
    await rig.replica.stop(drain_timeout=1)
    rig.assert_edge(S.FAILED, S.STOPPED, "removed", since)


# -- the table ---------------------------------------------------------------------------------


def test_every_edge_of_the_table_has_a_test():
    table = {(old, new) for old in S for new in S if can_transition(old, new)}
    assert set(COVERED) == table, {
        "edges without a test": table - set(COVERED),
        "tests of edges not in the table": set(COVERED) - table,
    }
