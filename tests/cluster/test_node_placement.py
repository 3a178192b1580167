"""Placement with a node dimension: one node per replica, a model's replicas spread over nodes."""

from __future__ import annotations

from supervisor.placement import DeviceView, Request, plan
from supervisor.units import GiB


def gpus(node: str, count: int, size: int = 24 * GiB) -> list[DeviceView]:
    return [
        DeviceView(f"{node}/{i}", f"{node} GPU{i}", size, size, 0, node=node) for i in range(count)
    ]


def test_replicas_of_a_model_go_to_different_nodes_when_they_can():
    requests = [Request(f"m-{i}", 8 * GiB, seq=i, group="m") for i in range(2)]
    decision = plan(requests, gpus("a", 2) + gpus("b", 2))
    nodes = {p.device_ids[0].split("/")[0] for p in decision.placements}
    assert nodes == {"a", "b"}


def test_a_replica_avoids_nodes_its_model_already_runs_on():
    decision = plan([Request("m-1", 8 * GiB, group="m", avoid_nodes=frozenset({"a"}))],
                    gpus("a", 2) + gpus("b", 2))  # fmt: skip
    assert decision.placements[0].device_ids == ("b/0",)


def test_a_second_replica_shares_a_node_when_no_other_node_has_room():
    devices = gpus("a", 2) + gpus("b", 1, size=4 * GiB)
    decision = plan([Request("m-1", 8 * GiB, group="m", avoid_nodes=frozenset({"a"}))], devices)
    assert decision.placements[0].device_ids[0].startswith("a/")


def test_tensor_parallel_devices_are_all_on_one_node():
    devices = gpus("a", 1) + gpus("b", 2)
    decision = plan([Request("tp-0", 8 * GiB, devices=2, group="tp")], devices)
    assert decision.placements[0].device_ids == ("b/0", "b/1")


def test_enough_gpus_in_all_but_not_on_one_node_waits_and_says_why():
    decision = plan([Request("tp-0", 8 * GiB, devices=2)], gpus("a", 1) + gpus("b", 1))
    assert not decision.placements
    assert "no node has 2" in decision.waits[0].reason


def test_without_a_group_best_fit_alone_decides():
    devices = gpus("a", 1, size=40 * GiB) + gpus("b", 1, size=16 * GiB)
    decision = plan([Request("x-0", 8 * GiB, avoid_nodes=frozenset({"b"}))], devices)
    assert decision.placements[0].device_ids == ("b/0",)
