"""Pure pieces of the model side: the model phase table, the state a model shows, the route
table built from the models, launch plans and device views (no process, no event loop task)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from supervisor.config import ModelSpec
from supervisor.engine import LaunchPlan
from supervisor.estimate import MemoryEstimate
from supervisor.events import EventKind, EventLog
from supervisor.launch import launch_plan
from supervisor.models import ModelEntry
from supervisor.placement import Placement
from supervisor.replica import Replica, ReplicaTiming
from supervisor.reservations import device_views
from supervisor.resources import Device, StaticInventory
from supervisor.restart import RestartPolicy
from supervisor.route_table import build_routes
from supervisor.states import ModelPhase, ModelState, ReplicaState, can_enter, shown_state
from supervisor.units import GiB

NEED = MemoryEstimate(weights=8 * GiB, kv_cache=2 * GiB, overhead=0, kv_tokens=0,
                      kv_bytes_per_token=0)  # fmt: skip


class NoProbe:
    """These replicas never run: nothing is probed."""


def entry(name: str = "m", **extra: object) -> ModelEntry:
    spec = ModelSpec(name=name, source="path:/models/m", **extra)  # type: ignore[arg-type]
    return ModelEntry(spec, "/models/m", NEED, EventLog())


def replica(model: ModelEntry, n: int, state: ReplicaState, placement: Placement | None = None):
    """A replica in `state` with a port (so the gateway could reach it) and no task."""
    replica_id = f"{model.spec.name}-{n}"
    made = Replica(
        replica_id=replica_id, model=model.spec.name, make_plan=None, launch=None,
        probe=NoProbe(), events=model.events, on_change=lambda _: None,
        policy=RestartPolicy(), timing=ReplicaTiming(), initial=state,
    )  # type: ignore[arg-type]  # fmt: skip
    made.plan = LaunchPlan(replica_id, model.spec.name, "/models/m", 9000 + n,
                           Path(f"/logs/{replica_id}.log"), max_num_seqs=4)  # fmt: skip
    made.placement = placement
    made.max_num_seqs = 3
    model.replicas.append(made)
    return made


def test_model_phase_table_allows_the_documented_paths():
    for path in (
        ["new", "downloading", "active", "draining", "removed"],
        ["new", "active"],
        ["downloading", "failed", "draining"],
        ["downloading", "draining"],
    ):
        for old, new in itertools.pairwise(path):
            assert can_enter(ModelPhase(old), ModelPhase(new)), f"{old} -> {new}"


def test_model_phase_table_refuses_shortcuts_and_returns():
    assert not can_enter(ModelPhase.NEW, ModelPhase.DRAINING)
    assert not can_enter(ModelPhase.ACTIVE, ModelPhase.DOWNLOADING)
    assert not can_enter(ModelPhase.FAILED, ModelPhase.ACTIVE)
    assert not can_enter(ModelPhase.DRAINING, ModelPhase.ACTIVE)
    assert not any(can_enter(ModelPhase.REMOVED, p) for p in ModelPhase)


def test_a_model_transition_records_the_event_named_for_the_phase():
    model = entry()
    model.transition(ModelPhase.ACTIVE, "added")
    model.transition(ModelPhase.DRAINING, "draining (deadline 1s)")
    model.transition(ModelPhase.REMOVED, "all replicas stopped")
    events = model.events.recent("m")
    assert [e.kind for e in events] == [
        EventKind.MODEL_ADDED, EventKind.MODEL_REMOVING, EventKind.MODEL_REMOVED,
    ]  # fmt: skip
    assert [(e.data["old"], e.data["new"]) for e in events] == [
        ("new", "active"), ("active", "draining"), ("draining", "removed"),
    ]  # fmt: skip
    assert events[1].message == "draining (deadline 1s)"


def test_an_illegal_model_transition_raises_and_records_nothing():
    model = entry()
    with pytest.raises(RuntimeError, match="illegal transition new -> removed"):
        model.transition(ModelPhase.REMOVED, "too soon")
    assert model.phase is ModelPhase.NEW and model.events.recent() == []


def test_a_failed_model_keeps_its_reason_while_it_is_removed():
    model = entry()
    model.transition(ModelPhase.DOWNLOADING, "caching first")
    model.transition(ModelPhase.FAILED, "hf://x/y: not found")
    assert (model.state, model.reason) == (ModelState.FAILED, "hf://x/y: not found")
    model.transition(ModelPhase.DRAINING, "draining (deadline 1s)")
    assert (model.state, model.reason) == (ModelState.DRAINING, "hf://x/y: not found")


def test_the_state_shown_is_the_phase_or_while_active_the_best_replica():
    assert shown_state(ModelPhase.DOWNLOADING, []) is ModelState.DOWNLOADING
    assert shown_state(ModelPhase.DRAINING, [ReplicaState.READY]) is ModelState.DRAINING
    assert shown_state(ModelPhase.FAILED, []) is ModelState.FAILED
    assert shown_state(ModelPhase.NEW, []) is ModelState.PENDING
    active = [ReplicaState.FAILED, ReplicaState.READY]
    assert shown_state(ModelPhase.ACTIVE, active) is ModelState.READY


def test_routes_are_the_models_live_replicas_at_the_given_version():
    model = entry()
    model.transition(ModelPhase.ACTIVE, "added")
    replica(model, 0, ReplicaState.READY)
    replica(model, 1, ReplicaState.STOPPED)
    table = build_routes({"m": model}, version=7)
    assert table.version == 7
    route = table.models["m"]
    assert (route.state, [r.id for r in route.replicas]) == ("ready", ["m-0"])
    assert route.ready_replicas[0].url == "http://127.0.0.1:9000"
    assert route.ready_replicas[0].max_num_seqs == 3, "the gateway's slots on it"


def test_a_removed_models_ready_replicas_take_no_new_requests():
    model = entry()
    model.transition(ModelPhase.ACTIVE, "added")
    replica(model, 0, ReplicaState.READY)
    model.transition(ModelPhase.DRAINING, "draining (deadline 1s)")
    route = build_routes({"m": model}, version=1).models["m"]
    assert route.state == "draining"
    assert [r.state for r in route.replicas] == ["draining"] and route.ready_replicas == ()


def gpus(spec: str) -> dict[str, Device]:
    return {d.id: d for d in StaticInventory.parse(spec).devices()}


def test_a_gpu_launch_plan_reserves_the_placed_share_of_the_smallest_gpu():
    model = entry(tensor_parallel=2)
    devices = gpus("1x24GiB,1x20GiB")
    placement = Placement("m-0", ("0", "1"), 10 * GiB, "best fit")
    plan = launch_plan(replica_id="m-0", spec=model.spec, model_ref="/models/m", need=NEED,
                       placement=placement, devices=devices, port=9000,
                       state_dir=Path("/state"))  # fmt: skip
    assert plan.gpu_ids == (0, 1) and plan.tensor_parallel == 2
    assert plan.gpu_memory_utilization == pytest.approx(10 / 20)
    assert plan.cpu_kv_cache_gib is None
    assert plan.log_path == Path("/state/logs/m-0.log")


def test_a_gpu_launch_plan_never_asks_for_the_whole_gpu():
    placement = Placement("m-0", ("0",), 24 * GiB, "best fit")
    plan = launch_plan(replica_id="m-0", spec=entry().spec, model_ref="/models/m", need=NEED,
                       placement=placement, devices=gpus("1x24GiB"), port=9000,
                       state_dir=Path("/state"))  # fmt: skip
    assert plan.gpu_memory_utilization == 0.98


def test_a_cpu_launch_plan_sizes_the_kv_cache_instead():
    devices = {d.id: d for d in StaticInventory.parse("cpu:64GiB").devices()}
    placement = Placement("m-0", ("cpu",), 10 * GiB, "best fit")
    plan = launch_plan(replica_id="m-0", spec=entry().spec, model_ref="/models/m", need=NEED,
                       placement=placement, devices=devices, port=9000,
                       state_dir=Path("/state"))  # fmt: skip
    assert plan.gpu_ids == () and plan.gpu_memory_utilization is None
    assert plan.cpu_kv_cache_gib == pytest.approx(2.0)


def test_device_views_sum_what_live_replicas_reserve_and_mark_starting_gpus():
    model = entry()
    devices = list(gpus("2x24GiB").values())
    replica(model, 0, ReplicaState.READY, Placement("m-0", ("0",), 8 * GiB, ""))
    replica(model, 1, ReplicaState.STARTING, Placement("m-1", ("1",), 6 * GiB, ""))
    replica(model, 2, ReplicaState.STOPPED, Placement("m-2", ("1",), 9 * GiB, ""))
    views = device_views(devices, model.replicas)
    assert [(v.reserved, v.starting) for v in views] == [(8 * GiB, False), (6 * GiB, True)]
