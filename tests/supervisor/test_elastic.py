"""Elastic models on stand-in engines: loaded on demand, unloaded when idle, evicted for room.

One 24 GiB device holds one 7B model (18.1 GiB); the gateway's reports are posted straight to
the manager's DemandBoard, as POST /gateway/report would.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from contract.report import GatewayReport, ModelDemand
from supervisor.autoscale_policy import ScaleSettings
from supervisor.config import ModelSpec
from supervisor.elastic_policy import ElasticSettings
from supervisor.engine_metrics import EngineScraper
from supervisor.events import Event, EventKind
from supervisor.manager import Manager
from supervisor.metrics import SupervisorMetrics
from supervisor.models import ModelEntry
from supervisor.resources import StaticInventory
from supervisor.states import ModelPhase, ModelState, ReplicaState
from supervisor.store import Store
from tests.checkpoints import llama2_7b
from tests.conftest import ManagerFactory, fake_engine_command, wait_until

ONE_GPU = "1x24GiB"
NO_RESIDENCY = ElasticSettings(min_residency=0)

Demand = Callable[[], dict[str, ModelDemand]]


@pytest.fixture
def seven_b(tmp_path: Path) -> Path:
    return llama2_7b(tmp_path / "llama2-7b")


async def add_7b(manager: Manager, folder: Path, name: str, **extra: object) -> ModelEntry:
    spec = ModelSpec(
        name=name,
        source=f"path:{folder}",
        max_model_len=4096,
        load="on_demand",
        **extra,  # type: ignore[arg-type]
    )
    return await manager.add(spec)


@contextlib.asynccontextmanager
async def gateway(
    manager: Manager, demand: Demand, queue_timeout: float | None = None
) -> AsyncIterator[None]:
    """Report `demand()` every 0.1 s, as the gateway's reporter does every second."""

    async def report() -> None:
        while True:
            manager.demand.post(GatewayReport(time=time.time(), models=demand(),
                                              queue_timeout=queue_timeout))  # fmt: skip
            await asyncio.sleep(0.1)

    task = asyncio.create_task(report())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def two_on_room_for_one(
    make_manager: ManagerFactory, folder: Path
) -> tuple[Manager, ModelEntry, ModelEntry]:
    """Models a and b, on demand, on a device that holds one; no minimum residency."""
    manager = make_manager(inventory=StaticInventory.parse(ONE_GPU), elastic=NO_RESIDENCY)
    return manager, await add_7b(manager, folder, "a"), await add_7b(manager, folder, "b")


def ready(entry: ModelEntry) -> bool:
    return entry.state is ModelState.READY


async def test_an_on_demand_model_starts_unloaded_and_a_queued_request_loads_it(
    make_manager: ManagerFactory, seven_b: Path, tmp_path: Path
):
    store = Store(tmp_path / "sem.db")
    manager = make_manager(inventory=StaticInventory.parse(ONE_GPU), store=store)
    entry = await add_7b(manager, seven_b, "a")
    assert entry.phase is ModelPhase.UNLOADED and entry.replicas == []
    route = manager.routes.models["a"]
    assert route.state == "unloaded" and route.replicas == ()
    assert route.reason == "loads on demand: waiting for a request"
    assert route.load_seconds is None
    async with gateway(manager, lambda: {"a": ModelDemand(queued=3)}):
        await wait_until(lambda: ready(entry), what="a loaded on demand")
    loading = manager.events.recent("a", kind=EventKind.MODEL_LOADING)
    assert len(loading) == 1 and loading[0].message.startswith("3 request(s) queued")
    measured = manager.events.recent("a", kind=EventKind.LOAD_MEASURED)
    assert len(measured) == 1
    seconds = measured[0].data["seconds"]
    assert 0 < seconds < 20
    await wait_until(lambda: manager.routes.models["a"].load_seconds == seconds)
    assert float(store.get_meta("load_seconds/a") or 0) == pytest.approx(seconds, abs=1e-3)


async def test_an_idle_model_is_unloaded_after_its_idle_time_and_its_memory_released(
    make_manager: ManagerFactory, seven_b: Path
):
    manager = make_manager(inventory=StaticInventory.parse(ONE_GPU))
    entry = await add_7b(manager, seven_b, "a", idle_unload="1s")
    queued = {"a": ModelDemand(queued=1, last_request=time.time())}
    async with gateway(manager, lambda: queued):
        await wait_until(lambda: ready(entry), what="a loaded")
        replica = entry.replicas[0]
        served_at = time.time()
        queued = {"a": ModelDemand(last_request=served_at)}
        await wait_until(lambda: entry.phase is ModelPhase.UNLOADED, what="a unloaded")
        assert time.time() - served_at >= 1.0
    await wait_until(lambda: replica.state is ReplicaState.STOPPED, what="its engine stopped")
    unloaded = manager.events.recent("a", kind=EventKind.MODEL_UNLOADED)
    assert unloaded[-1].message.startswith("idle for ")
    assert manager.events.recent(replica.id, kind=EventKind.RELEASED)
    assert manager.routes.models["a"].state == "unloaded"
    assert manager.routes.models["a"].replicas == ()


async def test_idle_time_counts_from_ready_not_from_a_request_that_waited_for_the_load(
    make_manager: ManagerFactory, seven_b: Path
):
    """The only request arrived before a slow load (2 s here) ended: the model is not idle the
    moment it is ready (seen on real vLLM: unloaded 68 s after serving, idle_unload 150 s)."""
    manager = make_manager(command=fake_engine_command(FAKE_START_DELAY="2"),
                           inventory=StaticInventory.parse(ONE_GPU))  # fmt: skip
    entry = await add_7b(manager, seven_b, "a", idle_unload="1s")
    arrived = time.time()
    demand = {"a": ModelDemand(queued=1, last_request=arrived)}
    async with gateway(manager, lambda: demand):
        await wait_until(lambda: ready(entry), timeout=30, what="a loaded")
        demand = {"a": ModelDemand(last_request=arrived)}  # served; nothing new since
        await wait_until(lambda: entry.phase is ModelPhase.UNLOADED, what="a unloaded")
    became_ready = next(
        e.time
        for e in manager.events.recent("a-0", kind=EventKind.TRANSITION)
        if e.data["new"] == "ready"
    )
    unloaded = manager.events.recent("a", kind=EventKind.MODEL_UNLOADED)[-1].time
    assert unloaded - became_ready >= 1.0, "idle counted from before it could serve"


async def test_a_busy_model_is_not_idle(make_manager: ManagerFactory, seven_b: Path):
    manager = make_manager(inventory=StaticInventory.parse(ONE_GPU))
    entry = await add_7b(manager, seven_b, "a", idle_unload="0.2s")
    async with gateway(manager, lambda: {"a": ModelDemand(queued=1, in_flight=1)}):
        await wait_until(lambda: ready(entry), what="a loaded")
        await asyncio.sleep(0.3)  # past its idle time, by the clock alone
        assert manager.elastic.step().unloads == []
    assert entry.phase is ModelPhase.ACTIVE


async def test_an_idle_model_is_evicted_for_one_that_has_requests_waiting(
    make_manager: ManagerFactory, seven_b: Path
):
    manager, first, second = await two_on_room_for_one(make_manager, seven_b)
    demand = {"a": ModelDemand(queued=1)}
    async with gateway(manager, lambda: demand):
        await wait_until(lambda: ready(first), what="a loaded")
        demand = {"a": ModelDemand(last_request=time.time()), "b": ModelDemand(queued=2)}
        await wait_until(lambda: ready(second), what="b loaded in a's place")
    assert first.phase is ModelPhase.UNLOADED
    evicting = manager.events.recent("a", kind=EventKind.EVICTING)
    assert len(evicting) == 1 and evicting[0].data["for_model"] == "b"
    assert evicting[0].message.startswith("evicted for b (priority 0 >= 0)")


@pytest.mark.parametrize("queue_timeout", [600.0, 1.0])
async def test_a_swap_waits_until_it_pays_unless_the_gateways_bound_says_go(
    make_manager: ManagerFactory, seven_b: Path, queue_timeout: float
):
    """a, just used, is kept for its reload time before b takes its place; with the gateway's
    --queue-timeout at 1 s, b's request cannot afford that (nor b's own load), so a goes at once."""
    manager, first, second = await two_on_room_for_one(make_manager, seven_b)
    demand = {"a": ModelDemand(queued=1)}
    async with gateway(manager, lambda: demand, queue_timeout):
        await wait_until(lambda: ready(first), what="a loaded")
        assert first.load_seconds is not None and first.load_seconds > 0  # measured
        used = time.time()
        demand = {"a": ModelDemand(last_request=used), "b": ModelDemand(queued=1)}
        await wait_until(lambda: ready(second), what="b loaded in a's place")
    evicting = manager.events.recent("a", kind=EventKind.EVICTING)
    held = manager.events.recent("a", kind=EventKind.SWAP_HELD)
    assert len(evicting) == 1
    if queue_timeout == 1.0:
        assert held == []
        return
    assert len(held) == 1, "one event a hold, not one a round"
    assert held[0].data["for_model"] == "b"
    assert held[0].message.startswith("a kept ")
    # Evicted once idle for its reload time: not before (a round is ~0.1 s late at most).
    assert evicting[0].time - used >= first.load_seconds - 0.05


async def test_a_model_with_requests_in_flight_is_not_evicted_for_an_equal_priority(
    make_manager: ManagerFactory, seven_b: Path
):
    manager, first, second = await two_on_room_for_one(make_manager, seven_b)
    demand = {"a": ModelDemand(queued=1)}
    async with gateway(manager, lambda: demand):
        await wait_until(lambda: ready(first), what="a loaded")
        demand = {"a": ModelDemand(in_flight=1), "b": ModelDemand(queued=1)}
        await wait_until(
            lambda: bool(second.replicas) and second.replicas[0].reason.startswith("needs"),
            what="b waiting for memory",
        )
        assert manager.elastic.step().unloads == []
    assert ready(first) and second.state is ModelState.PENDING
    assert manager.events.recent("a", kind=EventKind.EVICTING) == []


async def test_a_model_loaded_always_is_not_evicted_by_default(
    make_manager: ManagerFactory, seven_b: Path
):
    manager = make_manager(inventory=StaticInventory.parse(ONE_GPU), elastic=NO_RESIDENCY)
    always = await manager.add(ModelSpec(name="a", source=f"path:{seven_b}", max_model_len=4096))
    second = await add_7b(manager, seven_b, "b")
    await wait_until(lambda: ready(always), what="a ready")
    async with gateway(manager, lambda: {"b": ModelDemand(queued=1)}):
        await wait_until(lambda: second.phase is ModelPhase.ACTIVE, what="b loading")
        assert manager.elastic.step().unloads == []
    assert ready(always)


async def test_replicas_scale_up_under_a_queue_and_back_down_when_calm(
    make_manager: ManagerFactory, model_dir: Path
):
    quick = ScaleSettings(window=0.3, calm=0.5, cooldown=0.2)
    manager = make_manager(elastic=ElasticSettings(scale=quick))
    entry = await manager.add(ModelSpec(name="m", source=f"path:{model_dir}",
                                  replicas={"min": 1, "max": 2, "target_queue_per_replica": 2}))  # type: ignore[arg-type]  # fmt: skip
    await wait_until(lambda: ready(entry), what="m ready")

    def live() -> list[str]:
        return [r.id for r in entry.replicas if r.state is ReplicaState.READY]

    demand = {"m": ModelDemand(queued=5, in_flight=1)}
    async with gateway(manager, lambda: demand):
        await wait_until(lambda: len(live()) == 2, what="a second replica")
        up = manager.events.recent("m", kind=EventKind.SCALED)
        assert [e.data["delta"] for e in up] == [1]
        assert up[0].message.startswith("5 queued on 1 replica(s) for ")
        demand = {"m": ModelDemand(in_flight=1)}
        await wait_until(lambda: len(live()) == 1, what="back to one replica")
    await wait_until(lambda: len(entry.replicas) == 1, what="the retired replica gone")
    scaled = manager.events.recent("m", kind=EventKind.SCALED)
    assert [e.data["delta"] for e in scaled] == [1, -1]
    assert scaled[1].message.startswith("calm for ")
    assert len(manager.routes.models["m"].replicas) == 1


async def test_elastic_decisions_are_counted_by_action(make_manager: ManagerFactory):
    manager = make_manager()
    metrics = SupervisorMetrics(manager, manager.events, EngineScraper())
    for kind, data in [
        (EventKind.MODEL_LOADING, {}), (EventKind.MODEL_UNLOADED, {}), (EventKind.EVICTING, {}),
        (EventKind.SCALED, {"delta": 1}), (EventKind.SCALED, {"delta": 1}),
        (EventKind.SCALED, {"delta": -1}),
    ]:  # fmt: skip
        metrics.count(Event(kind, "m", "why", data=data))

    def counted(action: str) -> float | None:
        return metrics.registry.get_sample_value(
            "sem_supervisor_elastic_decisions_total", {"model": "m", "action": action}
        )

    assert [counted(a) for a in ("load", "unload", "evict", "scale_up", "scale_down")] == [
        1, 1, 1, 2, 1,
    ]  # fmt: skip
    await metrics.aclose()


async def test_a_restart_keeps_an_on_demand_model_unloaded_and_its_load_time(
    make_manager: ManagerFactory, seven_b: Path, tmp_path: Path
):
    store = Store(tmp_path / "sem.db")
    first = make_manager(inventory=StaticInventory.parse(ONE_GPU), store=store)
    entry = await add_7b(first, seven_b, "a")
    async with gateway(first, lambda: {"a": ModelDemand(queued=1)}):
        await wait_until(lambda: ready(entry), what="a loaded")
    first.remove("a", drain_timeout=0)  # its engine stops: nothing to re-adopt
    await wait_until(lambda: "a" not in first.routes.models, what="a gone")
    store.put_desired(entry.spec, "api")  # as if the supervisor had been restarted instead

    second = make_manager(inventory=StaticInventory.parse(ONE_GPU), store=store)
    await second.restore([], drain_timeout=1)
    again = second.get("a")
    assert again.phase is ModelPhase.UNLOADED and again.replicas == []
    second.elastic.step()
    assert second.routes.models["a"].load_seconds == pytest.approx(entry.load_seconds, abs=1e-3)
