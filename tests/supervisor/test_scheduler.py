"""The manager schedules replicas onto an injected 2 x 24 GiB inventory (stand-in engines)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import psutil
import pytest

from supervisor.config import ModelSpec
from supervisor.errors import InvalidSpec
from supervisor.events import EventKind
from supervisor.manager import Manager
from supervisor.resources import StaticInventory
from supervisor.scheduler import SchedulerSettings
from supervisor.states import ReplicaState
from tests.checkpoints import llama2_7b
from tests.conftest import ManagerFactory, wait_until

TWO_GPUS = "2x24GiB"


@pytest.fixture
def seven_b(tmp_path: Path) -> Path:
    return llama2_7b(tmp_path / "llama2-7b")


async def add_7b(manager: Manager, folder: Path, name: str, **extra: object):
    spec = ModelSpec(name=name, source=f"path:{folder}", max_model_len=4096, **extra)  # type: ignore[arg-type]
    return await manager.add(spec)


def event_time(manager: Manager, kind: EventKind, subject: str) -> float:
    return next(e.time for e in manager.events.recent(subject, kind=kind))


async def test_two_7b_land_one_per_gpu_and_the_third_waits(
    make_manager: ManagerFactory, seven_b: Path
):
    manager = make_manager(inventory=StaticInventory.parse(TWO_GPUS))
    first = await add_7b(manager, seven_b, "llama-a")
    second = await add_7b(manager, seven_b, "llama-b")
    await wait_until(lambda: first.state.value == "ready" and second.state.value == "ready")
    third = await add_7b(manager, seven_b, "llama-c")
    await wait_until(lambda: third.replicas[0].reason.startswith("needs"), what="a wait reason")
    assert third.state.value == "pending"
    assert third.replicas[0].reason == (
        "needs 18.05 GiB + 0.51 GiB context on 1 GPU; largest free is 5.9 GiB on GPU0"
    )
    gpus = {}
    for entry in (first, second):
        replica = entry.replicas[0]
        env = psutil.Process(replica.process.pid).environ()
        cmdline = psutil.Process(replica.process.pid).cmdline()
        gpus[entry.spec.name] = env["CUDA_VISIBLE_DEVICES"]
        utilization = float(cmdline[cmdline.index("--gpu-memory-utilization") + 1])
        assert utilization == pytest.approx(18.1 / 24, abs=0.01)
    assert sorted(gpus.values()) == ["0", "1"]
    resources = await manager.resources()
    assert [len(d["replicas"]) for d in resources] == [1, 1]
    assert all(d["reserved"] > 18 * 2**30 for d in resources)


async def fill_then_release_one(manager: Manager, folder: Path):
    """llama-a and llama-b fill both GPUs, llama-c waits; then llama-a is removed.
    Returns (llama-a, llama-c)."""
    first = await add_7b(manager, folder, "llama-a")
    second = await add_7b(manager, folder, "llama-b")
    third = await add_7b(manager, folder, "llama-c")
    # Both ready first: an engine that becomes ready also wakes the scheduler (a GPU's
    # one-engine-starting gate opens), which would blur what the callers test.
    await wait_until(lambda: first.state.value == "ready" and second.state.value == "ready")
    await wait_until(lambda: third.replicas[0].reason.startswith("needs"))
    manager.remove("llama-a", drain_timeout=0)
    await wait_until(lambda: "llama-a" not in manager.routes.models)
    return first, third


async def test_third_model_starts_within_a_second_of_a_release(
    make_manager: ManagerFactory, seven_b: Path
):
    manager = make_manager(
        inventory=StaticInventory.parse(TWO_GPUS),
        # only the release can wake it
        scheduling=SchedulerSettings(recheck_interval=3600, pending_recheck=3600),
    )
    first, third = await fill_then_release_one(manager, seven_b)
    await wait_until(lambda: third.state.value == "ready", what="third ready")
    waited = event_time(manager, EventKind.PLACED, "llama-c-0") - event_time(
        manager, EventKind.RELEASED, "llama-a-0"
    )
    assert 0 <= waited < 1.0
    assert third.replicas[0].placement.device_ids == first.replicas[0].placement.device_ids


async def test_without_release_events_the_periodic_recheck_places_it(
    make_manager: ManagerFactory, seven_b: Path
):
    manager = make_manager(
        inventory=StaticInventory.parse(TWO_GPUS),
        scheduling=SchedulerSettings(recheck_interval=1.0, release_triggers=False),
    )
    _, third = await fill_then_release_one(manager, seven_b)
    await wait_until(lambda: third.state.value == "ready", what="third ready")


async def test_without_release_events_or_recheck_it_keeps_waiting(
    make_manager: ManagerFactory, seven_b: Path
):
    """The control for the two tests above: with both switched off nothing places it."""
    manager = make_manager(
        inventory=StaticInventory.parse(TWO_GPUS),
        scheduling=SchedulerSettings(
            recheck_interval=3600, pending_recheck=3600, release_triggers=False
        ),
    )
    _, third = await fill_then_release_one(manager, seven_b)
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        assert third.replicas[0].state is ReplicaState.PENDING
        await asyncio.sleep(0.05)


async def test_tensor_parallel_2_waits_for_both_gpus(make_manager: ManagerFactory, seven_b: Path):
    manager = make_manager(inventory=StaticInventory.parse(TWO_GPUS))
    single = await add_7b(manager, seven_b, "llama-a")
    await wait_until(lambda: single.state.value == "ready")
    pair = await add_7b(manager, seven_b, "llama-tp", tensor_parallel=2, memory="30GiB")
    await wait_until(lambda: pair.replicas[0].reason.startswith("needs"))
    assert "only 1 GPU(s) have that free (GPU1)" in pair.replicas[0].reason
    manager.remove("llama-a", drain_timeout=0)
    await wait_until(lambda: pair.state.value == "ready", what="tp=2 ready")
    replica = pair.replicas[0]
    assert replica.placement.device_ids == ("0", "1")
    env = psutil.Process(replica.process.pid).environ()
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert "--tensor-parallel-size" in psutil.Process(replica.process.pid).cmdline()


async def test_a_model_that_can_never_fit_is_refused(make_manager: ManagerFactory, seven_b: Path):
    manager = make_manager(inventory=StaticInventory.parse(TWO_GPUS))
    with pytest.raises(
        InvalidSpec, match=r"can never be placed: needs 40\.00 GiB \+ 0\.51 GiB context"
    ):
        await add_7b(manager, seven_b, "huge", memory="40GiB")
    with pytest.raises(InvalidSpec, match="needs 4 GPUs; there are 2"):
        await add_7b(manager, seven_b, "wide", tensor_parallel=4)
    assert manager.entries() == []


async def test_adding_never_disturbs_running_models(make_manager: ManagerFactory, seven_b: Path):
    manager = make_manager(inventory=StaticInventory.parse(TWO_GPUS))
    first = await add_7b(manager, seven_b, "llama-a")
    await wait_until(lambda: first.state.value == "ready")
    pid = first.replicas[0].process.pid
    second = await add_7b(manager, seven_b, "llama-b")
    await wait_until(lambda: second.state.value == "ready")
    assert first.replicas[0].process.pid == pid and first.replicas[0].restarts == 0
    kinds = [e.kind for e in manager.events.recent("llama-b")]
    assert kinds[:2] == [EventKind.MODEL_ADDED, EventKind.PLACED]
