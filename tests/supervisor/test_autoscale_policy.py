"""Replica autoscaling as a pure function: the window, the calm, cooldowns, room and priority."""

from __future__ import annotations

from supervisor.autoscale_policy import (
    ScaleDecision,
    ScaleMemory,
    ScaleSettings,
    ScaleView,
    Waiting,
    decide_scale,
)  # fmt: skip
from supervisor.placement import DeviceView
from supervisor.units import GiB

SETTINGS = ScaleSettings(window=10, calm=60, cooldown=30)
ROOMY = [DeviceView("0", "D0", 64 * GiB, 64 * GiB, 8 * GiB, kind="cpu")]
FULL = [DeviceView("0", "D0", 64 * GiB, 64 * GiB, 60 * GiB, kind="cpu")]


def model(**extra: object) -> ScaleView:
    fields: dict[str, object] = dict(
        name="m", replicas=1, min=1, max=3, target=2, slots=4, need=8 * GiB
    )
    return ScaleView(**(fields | extra))  # type: ignore[arg-type]


def run(
    view: ScaleView, times: list[float], devices: list[DeviceView] = ROOMY,
    waiting: list[Waiting] | None = None, memory: dict[str, ScaleMemory] | None = None,
) -> ScaleDecision:  # fmt: skip
    """The same view seen at each of `times`; the last round's decision."""
    decision = ScaleDecision(memory=memory or {})
    for now in times:
        decision = decide_scale([view], devices, waiting or [], decision.memory, now, SETTINGS)
    return decision


def deltas(decision: ScaleDecision) -> list[int]:
    return [s.delta for s in decision.scales]


def test_a_queue_above_target_for_the_window_adds_a_replica_with_its_reason():
    decision = run(model(queued=5), [0, 5, 10])
    assert deltas(decision) == [1]
    assert decision.scales[0].reason == "5 queued on 1 replica(s) for 10s (target 2 per replica)"


def test_a_burst_shorter_than_the_window_adds_nothing():
    assert deltas(run(model(queued=5), [0, 5, 9.9])) == []
    calm_between = decide_scale([model(queued=0)], ROOMY, [],
                                run(model(queued=5), [0, 5]).memory, 6, SETTINGS)  # fmt: skip
    assert deltas(run(model(queued=5), [7, 12], memory=calm_between.memory)) == []


def test_at_target_is_not_above_it():
    assert deltas(run(model(queued=2), [0, 100])) == []


def test_never_above_max_nor_while_a_replica_is_still_coming_up():
    assert deltas(run(model(queued=50, replicas=3), [0, 100])) == []
    assert deltas(run(model(queued=50, coming_up=True), [0, 100])) == []


def test_no_scale_up_without_room():
    assert deltas(run(model(queued=50), [0, 100], devices=FULL)) == []


def test_a_waiting_model_of_higher_or_equal_priority_or_larger_keeps_the_room():
    higher = Waiting("other", priority=1, need=1 * GiB)
    larger = Waiting("other", priority=-5, need=20 * GiB)
    smaller_lower = Waiting("other", priority=-5, need=1 * GiB)
    busy = model(queued=50)
    assert deltas(run(busy, [0, 100], waiting=[higher])) == []
    assert deltas(run(busy, [0, 100], waiting=[larger])) == []
    assert deltas(run(busy, [0, 100], waiting=[smaller_lower])) == [1]


def test_calm_for_the_period_removes_one_down_to_min():
    calm = model(replicas=2, queued=0, in_flight=4)
    decision = run(calm, [0, 30, 60])
    assert deltas(decision) == [-1]
    assert decision.scales[0].reason == (
        "calm for 60s: nothing queued, 4 in flight fit on 1 replica(s)"
    )
    assert deltas(run(model(replicas=1), [0, 100])) == []  # at min


def test_in_flight_work_that_needs_every_replica_is_not_calm():
    assert deltas(run(model(replicas=2, in_flight=5), [0, 100])) == []


def test_cooldown_after_a_scaling():
    first = run(model(queued=50), [0, 10])
    assert deltas(first) == [1]
    again = run(model(queued=50, replicas=2), [11, 25, 39.9], memory=first.memory)
    assert deltas(again) == []
    later = run(model(queued=50, replicas=2), [40, 50], memory=first.memory)
    assert deltas(later) == [1]
