"""The headroom rule and vLLM's per-rank utilization, as pure functions."""

from __future__ import annotations

import pytest

from supervisor.gpu_budget import (
    CONTEXT_COST,
    NCCL_COST,
    fits,
    start_cost,
    tp_reservations,
    tp_utilization,
    utilization,
)
from supervisor.placement import DeviceView, has_room
from supervisor.units import GiB

H200 = int(139.8 * GiB)


def test_a_gap_equal_to_the_reservation_is_not_enough():
    """Seen on an H200: a 39.0 GiB reservation in a 39.3 GiB gap failed vLLM's start check."""
    reservation = int(39.0 * GiB)
    assert not fits(int(39.3 * GiB), reservation)
    assert fits(reservation + CONTEXT_COST, reservation)
    assert not fits(reservation + CONTEXT_COST - 1, reservation)


def test_tensor_parallel_adds_nccl_on_each_rank():
    assert start_cost(1) == CONTEXT_COST
    assert start_cost(2) == CONTEXT_COST + NCCL_COST
    assert not fits(10 * GiB + CONTEXT_COST, 10 * GiB, tensor_parallel=2)


def test_has_room_applies_the_headroom_on_gpus_only():
    gpu = DeviceView("0", "GPU0", 24 * GiB, free=18 * GiB, reserved=0)
    assert not has_room(gpu, 18 * GiB)
    assert has_room(gpu, 18 * GiB - CONTEXT_COST)
    cpu = DeviceView("cpu", "CPU", 24 * GiB, free=18 * GiB, reserved=0, kind="cpu")
    assert has_room(cpu, 18 * GiB)


def test_has_room_counts_what_sem_reserved_too():
    busy = DeviceView("0", "GPU0", 24 * GiB, free=24 * GiB, reserved=10 * GiB, starting=True)
    assert not has_room(busy, 14 * GiB - CONTEXT_COST + 1)
    assert has_room(busy, 14 * GiB - CONTEXT_COST)


def test_utilization_rounds_up_so_the_budget_covers_the_reservation():
    u = utilization(int(39.0 * GiB), H200)
    assert u == pytest.approx(0.279, abs=0.0001)
    assert u * H200 >= 39.0 * GiB
    assert utilization(12 * GiB, 24 * GiB) == 0.5


def test_utilization_refuses_more_than_the_gpu():
    with pytest.raises(ValueError, match="do not fit"):
        utilization(25 * GiB, 24 * GiB)


def test_unequal_tensor_parallel_gpus_take_the_smallest_and_reserve_per_gpu():
    """vLLM applies one utilization to each rank's own total: 16 GiB a rank on 24 + 48 GiB."""
    totals = [24 * GiB, 48 * GiB]
    u = tp_utilization(16 * GiB, totals)
    assert u == pytest.approx(0.6667, abs=0.0001)
    small, large = tp_reservations(16 * GiB, totals)
    assert small >= 16 * GiB and small - 16 * GiB < 0.001 * GiB
    assert large >= u * 48 * GiB and large >= 32 * GiB, "the larger GPU must have u x 48 free"
