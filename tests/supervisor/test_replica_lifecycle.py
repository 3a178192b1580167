"""Replica lifecycle on a real stand-in engine process; tests named after the edge they cover."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from supervisor.config import ModelSpec
from supervisor.events import EventKind
from supervisor.manager import Manager
from supervisor.procgroup import group_members
from supervisor.states import ReplicaState
from tests.conftest import ManagerFactory, fake_engine_command, wait_until


def spec(model_dir: Path, name: str = "m", **extra: object) -> ModelSpec:
    return ModelSpec(name=name, source=f"path:{model_dir}", **extra)  # type: ignore[arg-type]


def states(manager: Manager, replica_id: str) -> list[str]:
    return [e.data["new"] for e in manager.events.recent(replica_id, kind=EventKind.TRANSITION)]


async def test_pending_to_starting_to_ready(make_manager: ManagerFactory, model_dir: Path):
    manager = make_manager()
    entry = await manager.add(spec(model_dir))
    replica = entry.replicas[0]
    await wait_until(lambda: replica.state is ReplicaState.READY, what="ready")
    assert states(manager, "m-0") == ["starting", "ready"]
    assert entry.state.value == "ready"
    route = manager.routes.models["m"]
    assert route.ready_replicas[0].url == replica.url


async def test_ready_to_draining_to_stopped_kills_the_whole_group(
    make_manager: ManagerFactory, model_dir: Path
):
    manager = make_manager()
    replica = (await manager.add(spec(model_dir))).replicas[0]
    await wait_until(lambda: replica.state is ReplicaState.READY)
    assert replica.process is not None
    pgid = replica.process.pgid
    assert len(group_members(pgid)) >= 2, "the fake engine forks an 'EngineCore' child"
    manager.remove("m", drain_timeout=1)
    await wait_until(lambda: "m" not in manager.routes.models, what="model removed")
    assert states(manager, "m-0")[-2:] == ["draining", "stopped"]
    assert group_members(pgid) == []


async def test_draining_escalates_to_sigkill_when_sigterm_is_ignored(
    make_manager: ManagerFactory, model_dir: Path
):
    manager = make_manager(command=fake_engine_command(FAKE_IGNORE_SIGTERM="1"))
    replica = (await manager.add(spec(model_dir))).replicas[0]
    await wait_until(lambda: replica.state is ReplicaState.READY)
    assert replica.process is not None
    pgid = replica.process.pgid
    await replica.stop(drain_timeout=0)
    assert replica.state is ReplicaState.STOPPED
    assert replica.reason == "killed after the grace period"
    assert group_members(pgid) == []


async def test_ready_to_restarting_when_engine_crashes(
    make_manager: ManagerFactory, model_dir: Path
):
    # 2 s of being healthy: the supervisor's first probes (0.5 s apart while it starts) see it
    # ready even on a loaded machine, so the crash comes from READY.
    manager = make_manager(command=fake_engine_command(FAKE_CRASH_AFTER="2"))
    await manager.add(spec(model_dir))
    await wait_until(lambda: len(states(manager, "m-0")) >= 4, what="a restart")
    history = states(manager, "m-0")
    assert history[:4] == ["starting", "ready", "restarting", "starting"]
    transitions = manager.events.recent("m-0", kind=EventKind.TRANSITION)
    restarting = [e for e in transitions if e.data["new"] == "restarting"]
    assert "engine exited with code 1" in restarting[0].message


async def test_starting_to_restarting_when_exit_before_ready_then_failed(
    make_manager: ManagerFactory, model_dir: Path
):
    manager = make_manager(command=fake_engine_command(FAKE_EXIT_AT_START="3"))
    replica = (await manager.add(spec(model_dir))).replicas[0]
    await wait_until(lambda: replica.state is ReplicaState.FAILED, what="failed")
    assert states(manager, "m-0") == [
        "starting", "restarting", "starting", "restarting", "starting", "failed",
    ]  # fmt: skip
    assert "exited with code 3 while starting" in replica.reason
    assert "failing at start as asked" in replica.reason, "the engine log's tail is kept"
    assert "giving up" in replica.reason
    assert manager.routes.models["m"].state == "failed"


async def test_failed_to_stopped_on_removal(make_manager: ManagerFactory, model_dir: Path):
    manager = make_manager(command=fake_engine_command(FAKE_EXIT_AT_START="3"))
    replica = (await manager.add(spec(model_dir))).replicas[0]
    await wait_until(lambda: replica.state is ReplicaState.FAILED)
    manager.remove("m", drain_timeout=0)
    await wait_until(lambda: "m" not in manager.routes.models)
    assert replica.state is ReplicaState.STOPPED


async def test_two_replicas_get_their_own_ports_and_processes(
    make_manager: ManagerFactory, model_dir: Path
):
    manager = make_manager()
    entry = await manager.add(spec(model_dir, replicas=2))
    await wait_until(lambda: all(r.state is ReplicaState.READY for r in entry.replicas))
    ports = {r.plan.port for r in entry.replicas if r.plan}
    pids = {r.process.pid for r in entry.replicas if r.process}
    assert len(ports) == 2 and len(pids) == 2
    for pid in pids:
        env = psutil.Process(pid).environ()
        assert env["SEM_REPLICA_ID"] in {"m-0", "m-1"}
        assert env["CUDA_VISIBLE_DEVICES"] == ""


async def test_route_table_long_poll_wakes_on_change(make_manager: ManagerFactory, model_dir: Path):
    manager = make_manager()
    before = manager.routes.version
    await manager.add(spec(model_dir))
    table = await manager.wait_routes(after=before, timeout=5)
    assert table.version > before
    # An `after` from an earlier supervisor run (higher than ours) answers at once.
    assert (await manager.wait_routes(after=10**6, timeout=5)).version == manager.routes.version


@pytest.mark.parametrize("bad", ["path:/nonexistent/folder"])
async def test_add_rejects_a_source_without_config_json(make_manager: ManagerFactory, bad: str):
    from supervisor.errors import InvalidSpec

    manager = make_manager()
    with pytest.raises(InvalidSpec, match=r"no config\.json"):
        await manager.add(ModelSpec(name="m", source=bad))
    assert manager.entries() == []


async def test_a_stopped_engine_is_unhealthy_then_replaced_without_waiting_for_sigkill(
    make_manager: ManagerFactory, model_dir: Path
):
    import os
    import signal

    manager = make_manager()
    replica = (await manager.add(spec(model_dir))).replicas[0]
    await wait_until(lambda: replica.state is ReplicaState.READY)
    assert replica.process is not None
    hung = replica.process.pid
    os.killpg(hung, signal.SIGSTOP)  # looks alive, answers nothing
    await wait_until(lambda: replica.state is ReplicaState.RESTARTING, what="unhealthy")
    assert "/health failed" in replica.reason
    await wait_until(lambda: replica.state is ReplicaState.READY, what="ready again")
    assert replica.process.pid != hung
    assert not psutil.pid_exists(hung) or psutil.Process(hung).status() == "zombie"
