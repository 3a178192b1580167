"""Reloading models.yaml on a running manager (stand-in engines): add, remove, roll, reject."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from supervisor.config import ModelSpec
from supervisor.errors import InvalidSpec
from supervisor.events import Event, EventKind
from supervisor.manager import Manager
from supervisor.states import ModelState, ReplicaState
from supervisor.store import Store
from tests.conftest import ManagerFactory, wait_until


def spec(model_dir: Path, name: str, **extra: object) -> ModelSpec:
    return ModelSpec(name=name, source=f"path:{model_dir}", **extra)  # type: ignore[arg-type]


def ready(manager: Manager, name: str) -> bool:
    return name in manager.routes.models and manager.get(name).state is ModelState.READY


def pids(manager: Manager, name: str) -> set[int]:
    return {r.process.pid for r in manager.get(name).replicas if r.process and not r.done}


def drain(feed: asyncio.Queue[Event], kind: EventKind) -> list[Event]:
    """The events of `kind` in the queue now, in order."""
    assert not feed.full(), "a full subscription drops its oldest events"
    events = []
    while not feed.empty():
        if (event := feed.get_nowait()).kind is kind:
            events.append(event)
    return events


async def test_reload_adds_new_removes_unlisted_and_leaves_the_rest(
    make_manager: ManagerFactory, model_dir: Path
):
    manager = make_manager(store=Store(None))
    first = await manager.reload([spec(model_dir, "a"), spec(model_dir, "b")], drain_timeout=1)
    assert [s.name for s in first.added] == ["a", "b"]
    await wait_until(lambda: ready(manager, "a") and ready(manager, "b"), what="a, b ready")
    a_pids = pids(manager, "a")

    diff = await manager.reload([spec(model_dir, "a"), spec(model_dir, "c")], drain_timeout=1)
    assert (diff.unchanged, diff.removed, [s.name for s in diff.added]) == (["a"], ["b"], ["c"])
    await wait_until(lambda: ready(manager, "c") and "b" not in manager.routes.models)
    assert pids(manager, "a") == a_pids, "an unchanged model keeps its engine"


async def test_a_changed_model_with_two_replicas_is_rolled_without_downtime(
    make_manager: ManagerFactory, model_dir: Path
):
    manager = make_manager(store=Store(None))
    await manager.reload([spec(model_dir, "m", replicas=2)], drain_timeout=1)
    await wait_until(lambda: len(manager.routes.models["m"].ready_replicas) == 2)
    before = pids(manager, "m")
    ready = {r.id for r in manager.routes.models["m"].ready_replicas}

    with manager.events.subscribe() as feed:  # every event from here on, in order
        diff = await manager.reload([spec(model_dir, "m", replicas=2, max_num_seqs=7)], 1)
        assert [s.name for s in diff.changed] == ["m"]
        rollout = manager.get("m").rollout
        assert rollout is not None
        await asyncio.wait_for(asyncio.shield(rollout), timeout=30)
        transitions = drain(feed, EventKind.TRANSITION)

    # Every change of a replica's state is a transition, published at once: replaying them
    # all gives the ready replicas of every route table the gateway could have seen.
    fewest_ready = len(ready)
    for event in transitions:
        if event.data["new"] == "ready":
            ready.add(event.subject)
        else:
            ready.discard(event.subject)
        fewest_ready = min(fewest_ready, len(ready))
    assert len(transitions) >= 8, "two replicas stopped (2 each), two started (2 each)"
    assert fewest_ready >= 1, "some replica was ready all the while"
    assert not (pids(manager, "m") & before), "both replicas replaced"
    assert len(manager.routes.models["m"].ready_replicas) == 2
    assert {r.max_num_seqs for r in manager.routes.models["m"].replicas} == {7}


async def test_scaling_up_keeps_the_running_engine(make_manager: ManagerFactory, model_dir: Path):
    manager = make_manager(store=Store(None))
    await manager.reload([spec(model_dir, "m")], drain_timeout=1)
    await wait_until(lambda: ready(manager, "m"))
    before = pids(manager, "m")
    await manager.reload([spec(model_dir, "m", replicas=2)], drain_timeout=1)
    await wait_until(lambda: len(manager.routes.models["m"].ready_replicas) == 2)
    assert before < pids(manager, "m")


async def test_an_invalid_model_rejects_the_whole_reload_and_nothing_changes(
    make_manager: ManagerFactory, model_dir: Path, tmp_path: Path
):
    manager = make_manager(store=Store(None))
    await manager.reload([spec(model_dir, "a")], drain_timeout=1)
    await wait_until(lambda: ready(manager, "a"))
    broken = [spec(model_dir, "b"), spec(tmp_path / "nowhere", "c")]
    with pytest.raises(InvalidSpec, match=r"no config\.json"):
        await manager.reload(broken, drain_timeout=1)
    assert [e.spec.name for e in manager.entries()] == ["a"]
    assert manager.get("a").state is ModelState.READY


async def test_a_model_removed_at_runtime_stays_removed_until_its_entry_changes(
    make_manager: ManagerFactory, model_dir: Path
):
    store = Store(None)
    manager = make_manager(store=store)
    config = [spec(model_dir, "a")]
    await manager.reload(config, drain_timeout=1)
    manager.remove("a", drain_timeout=1)
    await wait_until(lambda: "a" not in manager.routes.models)
    assert store.desired() == []

    await manager.reload(config, drain_timeout=1)
    assert manager.entries() == [], "the same file does not bring it back"
    await manager.reload([spec(model_dir, "a", max_num_seqs=4)], drain_timeout=1)
    assert [e.spec.name for e in manager.entries()] == ["a"]
    assert [d.spec.max_num_seqs for d in store.desired()] == [4]


async def test_removal_drains_then_stops_and_releases(
    make_manager: ManagerFactory, model_dir: Path
):
    manager = make_manager(store=Store(None))
    replica = (await manager.add(spec(model_dir, "a"))).replicas[0]
    await wait_until(lambda: ready(manager, "a"))
    manager.remove("a", drain_timeout=1)
    assert manager.routes.models["a"].state == "draining"
    await replica.wait_for_state({ReplicaState.STOPPED})
    await wait_until(lambda: "a" not in manager.routes.models)


async def test_at_start_an_invalid_model_is_skipped_and_the_others_start(
    make_manager: ManagerFactory, model_dir: Path, tmp_path: Path
):
    store = Store(None)
    manager = make_manager(store=store)
    config = [spec(model_dir, "a"), spec(tmp_path / "nowhere", "b")]
    await manager.restore(config, drain_timeout=1)
    await wait_until(lambda: ready(manager, "a"))
    assert [e.spec.name for e in manager.entries()] == ["a"]
    assert [e.subject for e in manager.events.recent(kind=EventKind.MODEL_INVALID)] == ["b"]
    assert list(store.applied_config()) == ["a"], "b is tried again at the next reload"
