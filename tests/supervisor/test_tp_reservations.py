"""Per-GPU reservations of a tensor-parallel engine over unequal GPUs (issue 12, point 4): the
plan, the launch flag, the device views and the store's engine records all carry one figure per
GPU, and a record written by an older sem (one figure for all) still loads."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from supervisor.gpu_budget import tp_reservations
from supervisor.launch import gpu_memory_utilization
from supervisor.placement import DeviceView, Placement, Request, plan
from supervisor.process_start import ProcessStart
from supervisor.resources import Device
from supervisor.store import EngineRecord, Store
from supervisor.units import GiB

RANK = int(9.78 * GiB)
STARTED = ProcessStart("boot", 1.5)
SMALL_LARGE = [
    DeviceView("0", "GPU0", 24 * GiB, 24 * GiB, 0),
    DeviceView("1", "GPU1", 48 * GiB, 48 * GiB, 0),
]


def test_the_plan_reserves_u_x_total_on_each_gpu():
    decision = plan([Request("tp-0", RANK, devices=2)], SMALL_LARGE)
    placement = decision.placements[0]
    assert placement.reserved() == dict(
        zip(("0", "1"), tp_reservations(RANK, [24 * GiB, 48 * GiB]), strict=True)
    )
    assert placement.reserved()["1"] == pytest.approx(2 * RANK, rel=1e-3)


def test_the_larger_gpu_without_u_x_total_free_makes_it_wait_with_the_figures():
    tight = [SMALL_LARGE[0], DeviceView("1", "GPU1", 48 * GiB, 20 * GiB, 0)]
    decision = plan([Request("tp-0", RANK, devices=2)], tight)
    assert decision.placements == []
    assert decision.waits[0].reason == (
        "needs 9.78 GiB + 1.01 GiB context and NCCL on each of 2 GPUs; at utilization 0.4075"
        " (of the smallest GPU) vLLM wants 19.56 GiB on GPU1 (20.0 GiB free)"
    )


def test_the_launch_flag_is_the_smallest_gpus_share_rounded_up():
    devices = {"0": Device("0", "gpu", "g", 24 * GiB, 24 * GiB),
               "1": Device("1", "gpu", "g", 48 * GiB, 48 * GiB)}  # fmt: skip
    placement = plan([Request("tp-0", RANK, devices=2)], SMALL_LARGE).placements[0]
    assert gpu_memory_utilization(placement, devices) == 0.4075


def record(tmp_path: Path, reservations: tuple[int, ...]) -> EngineRecord:
    return EngineRecord("tp-0", "tp", 1234, STARTED, 41000, "digest", ("0", "1"), RANK,
                        tmp_path / "tp-0.log", reservations)  # fmt: skip


def test_engine_records_keep_a_figure_per_gpu(tmp_path: Path):
    store = Store(tmp_path / "sem.db")
    per_gpu = record(tmp_path, (RANK, 2 * RANK))
    store.put_engine(per_gpu)
    assert store.engines() == [per_gpu]
    placement = Placement("tp-0", per_gpu.devices, per_gpu.reserved, "re-adopted",
                          per_gpu.reservations)  # fmt: skip
    assert placement.reserved() == {"0": RANK, "1": 2 * RANK}


def test_an_engine_record_of_an_older_sem_still_loads(tmp_path: Path):
    """An older sem wrote the ids alone in `devices`, each device reserving `reserved`."""
    path = tmp_path / "sem.db"
    Store(path).close()
    with sqlite3.connect(path) as db:
        db.execute(
            "INSERT INTO engines (replica, model, pid, boot_id, started, port, spec_digest,"
            " devices, reserved, log_path, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ("tp-0", "tp", 1234, STARTED.boot, STARTED.seconds, 41000, "digest",
             json.dumps(["0", "1"]), RANK, str(tmp_path / "tp-0.log"), 2.0),
        )  # fmt: skip
    (old,) = Store(path).engines()
    assert old == record(tmp_path, ())
    placement = Placement("tp-0", old.devices, old.reserved, "re-adopted", old.reservations)
    assert placement.reserved() == {"0": RANK, "1": RANK}
