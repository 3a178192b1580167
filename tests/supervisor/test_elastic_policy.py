"""The elastic policy's every edge, as a pure function: load, idle unload, eviction."""

from __future__ import annotations

from supervisor.elastic_policy import Decision, ElasticSettings, ModelView, UnloadWhy, decide
from supervisor.placement import DeviceView
from supervisor.units import GiB

NOW = 10_000.0
SETTINGS = ElasticSettings(min_residency=30, wait_bound=60)


def device(free_gib: float, total_gib: float = 24, device_id: str = "0") -> DeviceView:
    """A device with `free_gib` unreserved; what sem's replicas hold is the rest."""
    reserved = int((total_gib - free_gib) * GiB)
    return DeviceView(device_id, f"D{device_id}", int(total_gib * GiB), int(total_gib * GiB),
                      reserved, kind="cpu")  # fmt: skip


def loaded(name: str, gib: float = 18, device: str = "0", **extra: object) -> ModelView:
    """A model resident for a while, last used 100 s ago, holding `gib` on `device`."""
    fields: dict[str, object] = dict(
        loaded=True, need=int(gib * GiB), evictable=True, last_used=NOW - 100,
        loaded_at=NOW - 1000, load_seconds=20, reserved={device: int(gib * GiB)},
    )  # fmt: skip
    return ModelView(name=name, **(fields | extra))  # type: ignore[arg-type]


def wanted(name: str, gib: float = 18, queued: int = 1, **extra: object) -> ModelView:
    """An unloaded model with requests queued for it."""
    return ModelView(name=name, loaded=False, need=int(gib * GiB), queued=queued, **extra)  # type: ignore[arg-type]


def unloads(decision: Decision) -> dict[str, UnloadWhy]:
    return {u.model: u.why for u in decision.unloads}


def test_an_unloaded_model_with_requests_queued_is_loaded_once_for_all_of_them():
    decision = decide([wanted("b", queued=5)], [device(24)], NOW, SETTINGS)
    assert [load.model for load in decision.loads] == ["b"]
    assert "5 request(s) queued" in decision.loads[0].reason
    assert decision.unloads == []


def test_an_unloaded_model_nobody_asks_for_stays_unloaded():
    assert decide([wanted("b", queued=0)], [device(24)], NOW, SETTINGS) == Decision()


def test_an_idle_model_is_unloaded_after_its_idle_time_and_not_before():
    idle = loaded("a", idle_unload=60, last_used=NOW - 61)
    fresh = loaded("b", idle_unload=60, last_used=NOW - 59)
    decision = decide([idle, fresh], [device(0)], NOW, SETTINGS)
    assert unloads(decision) == {"a": UnloadWhy.IDLE}
    assert "idle for 61s" in decision.unloads[0].reason


def test_a_model_with_work_queued_or_in_flight_is_never_idle():
    busy = loaded("a", idle_unload=1, last_used=NOW - 500, in_flight=1)
    queued = loaded("b", idle_unload=1, last_used=NOW - 500, queued=1, device="1")
    devices = [device(0), device(0, device_id="1")]
    assert decide([busy, queued], devices, NOW, SETTINGS) == Decision()


def test_without_a_fresh_gateway_report_nothing_is_idle_or_evicted():
    idle = loaded("a", idle_unload=1, last_used=NOW - 500)
    decision = decide([idle, wanted("b")], [device(6)], NOW, SETTINGS, demand_known=False)
    assert decision.unloads == []
    assert [load.model for load in decision.loads] == ["b"]


def test_no_eviction_when_the_model_fits_already():
    decision = decide([loaded("a", gib=6), wanted("b")], [device(18)], NOW, SETTINGS)
    assert decision.unloads == [] and [ld.model for ld in decision.loads] == ["b"]


def test_the_least_recently_used_idle_model_is_evicted_with_its_reason():
    old = loaded("old", gib=10, last_used=NOW - 500)
    recent = loaded("recent", gib=10, last_used=NOW - 5)
    decision = decide([old, recent, wanted("b", gib=10)], [device(4)], NOW, SETTINGS)
    assert unloads(decision) == {"old": UnloadWhy.EVICTED}
    evicted = decision.unloads[0]
    assert evicted.for_model == "b" and evicted.freed == 10 * GiB
    assert "evicted for b" in evicted.reason and "least recently used (500s ago" in evicted.reason


def test_among_equally_recent_models_the_cheapest_to_reload_goes_first():
    slow = loaded("slow", gib=10, last_used=NOW - 100, load_seconds=90)
    quick = loaded("quick", gib=10, last_used=NOW - 100, load_seconds=5)
    decision = decide([slow, quick, wanted("b", gib=10)], [device(4)], NOW, SETTINGS)
    assert unloads(decision) == {"quick": UnloadWhy.EVICTED}


def test_as_many_victims_as_it_takes_and_no_more():
    models = [loaded(f"m{i}", gib=6, last_used=NOW - 100 + i) for i in range(4)]
    decision = decide([*models, wanted("b", gib=12)], [device(0)], NOW, SETTINGS)
    assert unloads(decision) == {"m0": UnloadWhy.EVICTED, "m1": UnloadWhy.EVICTED}


def test_victims_come_from_the_device_that_needs_the_fewest():
    models = [
        loaded("x1", gib=8, device="0", last_used=NOW - 900),
        loaded("x2", gib=8, device="0", last_used=NOW - 800),
        loaded("y", gib=20, device="1", last_used=NOW - 100),
    ]
    devices = [device(8, device_id="0"), device(4, device_id="1")]
    decision = decide([*models, wanted("b", gib=20)], devices, NOW, SETTINGS)
    assert unloads(decision) == {"y": UnloadWhy.EVICTED}


def test_nothing_is_evicted_when_even_every_candidate_would_not_make_room():
    decision = decide([loaded("a", gib=10), wanted("b", gib=30)], [device(4)], NOW, SETTINGS)
    assert decision.unloads == []


def test_a_higher_priority_model_is_never_evicted_for_a_lower_one():
    models = [loaded("a", priority=5), wanted("b", priority=1)]
    decision = decide(models, [device(6)], NOW, SETTINGS)
    assert decision.unloads == []


def test_equal_priority_may_evict():
    models = [loaded("a", priority=2), wanted("b", priority=2)]
    decision = decide(models, [device(6)], NOW, SETTINGS)
    assert unloads(decision) == {"a": UnloadWhy.EVICTED}


def test_a_model_not_evictable_stays():
    decision = decide([loaded("a", evictable=False), wanted("b")], [device(6)], NOW, SETTINGS)
    assert decision.unloads == []


def test_minimum_residency_keeps_a_just_loaded_model_from_thrashing():
    just = loaded("a", loaded_at=NOW - 29, last_used=NOW - 29)
    assert decide([just, wanted("b")], [device(6)], NOW, SETTINGS).unloads == []
    settled = loaded("a", loaded_at=NOW - 31, last_used=NOW - 31)
    assert unloads(decide([settled, wanted("b")], [device(6)], NOW, SETTINGS)) == {
        "a": UnloadWhy.EVICTED
    }


def test_minimum_residency_yields_when_a_waiting_request_could_not_afford_it():
    # Loaded 5 s ago: 25 s of residency left; the oldest request has waited 30 s and the model
    # it wants loads in 10 s: 30 + 25 + 10 >= 60, so the resident goes now.
    just = loaded("a", loaded_at=NOW - 5, last_used=NOW - 5, load_seconds=1)
    want = wanted("b", oldest_wait=30, load_seconds=10)
    assert unloads(decide([just, want], [device(6)], NOW, SETTINGS)) == {"a": UnloadWhy.EVICTED}
    early = wanted("b", oldest_wait=20, load_seconds=10)  # 20 + 25 + 10 < 60: kept
    [hold] = decide([just, early], [device(6)], NOW, SETTINGS).holds
    assert hold.reason.startswith("a kept 25s more for b: loaded 5s ago (min_residency 30s);")


def test_a_model_used_within_its_reload_time_is_kept_while_the_waiting_can_afford_it():
    # Used 5 s ago, reloads in 20 s: kept 15 s more; the waiting request (10 s so far, 10 s
    # to load) will still be served within the 60 s bound.
    recent = loaded("a", last_used=NOW - 5, load_seconds=20)
    want = wanted("b", queued=2, oldest_wait=10, load_seconds=10)
    decision = decide([recent, want], [device(4)], NOW, SETTINGS)
    assert decision.unloads == [] and [ld.model for ld in decision.loads] == ["b"]
    [hold] = decision.holds
    assert (hold.model, hold.victim, hold.seconds) == ("b", "a", 15)
    assert hold.reason.startswith("a kept 15s more for b: used 5s ago, reloads in ~20s;")
    assert "2 request(s) waiting, the oldest 10s of 60s" in hold.reason


def test_a_kept_model_goes_once_the_oldest_waiting_request_could_not_afford_more():
    recent = loaded("a", last_used=NOW - 5, load_seconds=20)
    late = wanted("b", oldest_wait=36, load_seconds=10)  # 36 + 15 + 10 >= 60
    decision = decide([recent, late], [device(4)], NOW, SETTINGS)
    assert unloads(decision) == {"a": UnloadWhy.EVICTED} and decision.holds == []


def test_a_model_idle_for_its_reload_time_goes_and_priority_is_not_weighed():
    idle_enough = loaded("a", last_used=NOW - 20, load_seconds=20)
    assert unloads(decide([idle_enough, wanted("b")], [device(4)], NOW, SETTINGS)) == {
        "a": UnloadWhy.EVICTED
    }
    recent = loaded("a", last_used=NOW - 5, load_seconds=20)
    urgent = wanted("b", priority=1)
    assert unloads(decide([recent, urgent], [device(4)], NOW, SETTINGS)) == {"a": UnloadWhy.EVICTED}


def test_a_loaded_models_queue_is_served_before_it_is_swapped_out():
    decision = decide([loaded("a", queued=3), wanted("b")], [device(6)], NOW, SETTINGS)
    assert decision.unloads == []


def test_in_flight_work_is_never_evicted_for_an_equal_priority():
    busy = loaded("a", in_flight=2)
    waited_long = wanted("b", waited=500, pending=True)
    assert decide([busy, waited_long], [device(6)], NOW, SETTINGS).unloads == []


def test_in_flight_work_is_evicted_only_for_a_higher_priority_past_its_bound():
    busy = loaded("a", in_flight=2, priority=0)
    impatient = loaded("b", priority=1, pending=True, waited=61, reserved={})
    patient = loaded("b", priority=1, pending=True, waited=59, reserved={})
    assert decide([busy, patient], [device(6)], NOW, SETTINGS).unloads == []
    decision = decide([busy, impatient], [device(6)], NOW, SETTINGS)
    assert unloads(decision) == {"a": UnloadWhy.EVICTED}
    assert "2 in flight" in decision.unloads[0].reason


def test_a_loaded_model_with_a_pending_replica_also_makes_room():
    growing = loaded("b", pending=True, reserved={}, waited=3)
    decision = decide([loaded("a"), growing], [device(6)], NOW, SETTINGS)
    assert unloads(decision) == {"a": UnloadWhy.EVICTED}


def test_memory_already_on_its_way_out_is_counted_and_not_evicted_twice():
    draining = ModelView("gone", loaded=False, need=18 * GiB, reserved={"0": 18 * GiB})
    decision = decide([draining, loaded("a", gib=4), wanted("b")], [device(2)], NOW, SETTINGS)
    assert decision.unloads == []


def test_an_idle_unload_in_the_same_round_makes_the_room():
    idle = loaded("a", idle_unload=10, last_used=NOW - 100)
    other = loaded("c", gib=4, device="0", last_used=NOW - 900)
    decision = decide([idle, other, wanted("b")], [device(2)], NOW, SETTINGS)
    assert unloads(decision) == {"a": UnloadWhy.IDLE}


def test_two_models_wanting_memory_do_not_count_the_same_room_twice():
    victims = [loaded("x", gib=10, last_used=NOW - 900), loaded("y", gib=10, last_used=NOW - 800)]
    models = [*victims, wanted("b", gib=10, priority=1), wanted("c", gib=10)]
    decision = decide(models, [device(4)], NOW, SETTINGS)
    assert unloads(decision) == {"x": UnloadWhy.EVICTED, "y": UnloadWhy.EVICTED}
    assert {u.for_model for u in decision.unloads} == {"b", "c"}


def test_tensor_parallel_needs_room_on_as_many_devices():
    devices = [device(4, device_id="0"), device(4, device_id="1")]
    models = [
        loaded("x", gib=20, device="0", last_used=NOW - 900),
        loaded("y", gib=20, device="1", last_used=NOW - 800),
        wanted("b", gib=16, tensor_parallel=2),
    ]
    assert unloads(decide(models, devices, NOW, SETTINGS)) == {
        "x": UnloadWhy.EVICTED, "y": UnloadWhy.EVICTED,
    }  # fmt: skip


def test_a_load_nobody_waits_for_any_more_is_given_up_while_still_without_memory():
    stale = ModelView("b", loaded=True, need=18 * GiB, on_demand=True, pending=True, waited=70)
    decision = decide([loaded("a"), stale], [device(6)], NOW, SETTINGS)
    assert unloads(decision) == {"b": UnloadWhy.UNWANTED}  # and a is not evicted for it
    assert decision.unloads[0].reason == (
        "no request waits for it any more after 70s without memory"
    )
    always = ModelView("b", loaded=True, need=18 * GiB, pending=True, waited=70)
    assert decide([always], [device(6)], NOW, SETTINGS).unloads == []  # it wants to run
