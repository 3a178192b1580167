"""Self-correcting estimates and classified start failures, on the simulated GPU box.

The simulated engine's weights are SIM_WEIGHTS_FACTOR x what the checkpoint says (as a model
whose real footprint the estimate misses): the first placement reserves the estimate; once an
engine has reported the KV memory it found, later placements reserve what the engine really
needs for the KV cache the spec intends, within 5%.
"""

from __future__ import annotations

from pathlib import Path

from supervisor.config import ModelSpec
from supervisor.estimate import weight_bytes
from supervisor.events import EventKind
from supervisor.manager import Manager, ModelEntry
from supervisor.states import ReplicaState
from supervisor.store import Store
from tests.checkpoints import llama2_7b
from tests.conftest import ManagerFactory, wait_until
from tests.gpusim.box import SimBox
from tests.gpusim.ledger import GiB, SimGpu

FAST = {"SIM_LOAD_SECONDS": "0.1", "SIM_PROFILE_SECONDS": "0.05"}
SIM_INSIDE_BUDGET = GiB + 256 * 2**20  # the sim engine's activation peak + non-torch buffers


def spec_7b(folder: Path, name: str = "llama", **extra: object) -> ModelSpec:
    return ModelSpec(name=name, source=f"path:{folder}", max_model_len=4096, **extra)  # type: ignore[arg-type]


def real_need(folder: Path, entry: ModelEntry, factor: float) -> int:
    """What the sim engine really needs on its GPU for the KV cache the estimate intends."""
    weights = int(weight_bytes(folder, 2) * factor)
    return weights + SIM_INSIDE_BUDGET + entry.sized.kv_cache


def placed_need(manager: Manager, replica_id: str) -> int:
    placed = [e for e in manager.events.recent(replica_id, kind=EventKind.PLACED)]
    replica = next(r for e in manager.entries() for r in e.replicas if r.id == replica_id)
    assert placed and replica.placement is not None
    return replica.placement.per_device


async def measured(manager: Manager, replica_id: str) -> None:
    await wait_until(
        lambda: any("measured" in e.message for e in
                    manager.events.recent(replica_id, kind=EventKind.MEASURED)),
        what="a measurement",
    )  # fmt: skip


async def test_second_placement_reserves_within_5_percent_of_real_use(
    make_manager: ManagerFactory, tmp_path: Path
):
    sim = SimBox.create(tmp_path, [SimGpu(0, 24 * GiB)])
    store = Store(tmp_path / "sem.db")
    command = sim.engine_command(**FAST, SIM_WEIGHTS_FACTOR="1.1")
    manager = make_manager(command=command, inventory=sim.inventory(), store=store,
                           gpu_memory=sim.nvml())  # fmt: skip
    folder = llama2_7b(tmp_path / "llama2-7b")
    first = await manager.add(spec_7b(folder))
    await wait_until(lambda: first.state.value == "ready", what="first ready")
    assert placed_need(manager, "llama-0") == first.sized.estimated, "first: the estimate"
    await measured(manager, "llama-0")
    truth = real_need(folder, first, 1.1)
    assert first.sized.estimated < truth * 0.97, "the estimate really misses"

    manager.remove("llama", drain_timeout=0)
    await wait_until(lambda: not manager.entries(), what="removed")
    second = await manager.add(spec_7b(folder))
    await wait_until(lambda: second.state.value == "ready", what="second ready")
    reserved = placed_need(manager, "llama-0")
    assert abs(reserved - truth) / truth < 0.05, (reserved / GiB, truth / GiB)
    await measured(manager, "llama-0")  # measuring the corrected engine does not feed back
    again = second.sized.measured
    assert again is not None and abs(again - reserved) / reserved < 0.01
    memory = second.snapshot()["memory"]
    assert memory == {"estimate": first.sized.estimated, "measured": again,
                      "used_for_placement": again}  # fmt: skip
    assert store.measurement("llama", second.replicas[0].digest, "gpu") is not None


async def test_an_out_of_memory_start_is_placed_again_on_the_other_gpu(
    make_manager: ManagerFactory, tmp_path: Path
):
    """Weights 20% over the estimate leave vLLM too little KV memory for max_model_len on the
    estimated budget: the replica goes back to pending with the need its engine showed, which
    GPU0 (5 GiB taken by another user) no longer has and GPU1 has."""
    sim = SimBox.create(tmp_path, [SimGpu(0, 24 * GiB), SimGpu(1, 24 * GiB)])
    sim.ledger.allocate("foreign", 0, 5 * GiB, "another user's job")
    manager = make_manager(command=sim.engine_command(**FAST, SIM_WEIGHTS_FACTOR="1.2"),
                           inventory=sim.inventory(), gpu_memory=sim.nvml())  # fmt: skip
    folder = llama2_7b(tmp_path / "llama2-7b")
    entry = await manager.add(spec_7b(folder))
    await wait_until(lambda: entry.state.value == "ready", what="ready after re-placement")
    replica = entry.replicas[0]
    assert replica.placement is not None and replica.placement.device_ids == ("1",)
    moves = [e.data for e in manager.events.recent("llama-0", kind=EventKind.TRANSITION)]
    assert {"old": "starting", "new": "pending"}.items() <= moves[1].items()
    assert "out of memory at start: ValueError: To serve at least one request" in moves[1]["reason"]
    placed = manager.events.recent("llama-0", kind=EventKind.PLACED)
    assert [e.data["devices"] for e in placed] == [["0"], ["1"]]
    assert replica.restarts == 0
    truth = real_need(folder, entry, 1.2)
    assert abs(replica.placement.per_device - truth) / truth < 0.05


async def test_a_bad_flag_fails_at_once_without_retries(
    make_manager: ManagerFactory, tmp_path: Path
):
    sim = SimBox.create(tmp_path, [SimGpu(0, 24 * GiB)])
    manager = make_manager(command=sim.engine_command(**FAST, SIM_STRICT_ARGS="1"),
                           inventory=sim.inventory())  # fmt: skip
    spec = spec_7b(llama2_7b(tmp_path / "m"), engine_args={"no-such-flag": True})
    entry = await manager.add(spec)
    await wait_until(lambda: entry.replicas[0].state is ReplicaState.FAILED, what="failed")
    replica = entry.replicas[0]
    assert replica.reason.startswith("engine refused its configuration:")
    assert replica.reason.endswith("error: unrecognized arguments: --no-such-flag")
    starts = [e for e in manager.events.recent("llama-0", kind=EventKind.TRANSITION)
              if e.data["new"] == "starting"]  # fmt: skip
    assert len(starts) == 1 and replica.restarts == 0
