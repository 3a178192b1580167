"""The metrics' pure parts: causes and pending kinds from the reasons sem really gives, the
engines' families relabelled and merged, and request/token rates from successive scrapes."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from supervisor.engine_metrics import Rate, Relabelled, Scrape, Target, Throughput, parse
from supervisor.gpu_usage import attribute
from supervisor.metrics import Cause, PendingKind, cause_of, model_of, pending_kind
from supervisor.placement import DeviceView, Request, plan
from supervisor.units import GiB

A0 = Target("a", "a-0", "http://127.0.0.1:1")
A1 = Target("a", "a-1", "http://127.0.0.1:2")
B0 = Target("b", "b-0", "http://127.0.0.1:3")


def engine_text(name: str, requests: float, tokens: float) -> str:
    labels = f'engine="0",model_name="{name}"'
    return (
        "# TYPE vllm:num_requests_running gauge\n"
        f"vllm:num_requests_running{{{labels}}} 2.0\n"
        "# TYPE vllm:request_success_total counter\n"
        f'vllm:request_success_total{{{labels},finished_reason="length"}} {requests}\n'
        f'vllm:request_success_total{{{labels},finished_reason="stop"}} 0.0\n'
        "# TYPE vllm:generation_tokens_total counter\n"
        f"vllm:generation_tokens_total{{{labels}}} {tokens}\n"
        "# TYPE process_cpu_seconds_total counter\n"
        "process_cpu_seconds_total 12.0\n"
    )


def scrape(**texts: tuple[Target, float, float]) -> Scrape:
    return Scrape(families={t: parse(engine_text(t.model, r, k)) for t, r, k in texts.values()})


@pytest.mark.parametrize(
    ("reason", "cause"),
    [  # the reasons replica.py gives
        ("engine exited with code 1; restart in 1s", Cause.EXITED),
        (
            "engine exited with code 1 while starting (log: boom); restart in 1s",
            Cause.EXITED_STARTING,
        ),
        ("/health failed 3 times in a row; restart in 2s", Cause.UNHEALTHY),
        ("no /health 200 within 600s; restart in 4s", Cause.START_TIMEOUT),
        ("cannot start engine: [Errno 2] No such file", Cause.CANNOT_START),
        ("internal error: RuntimeError('x')", Cause.INTERNAL),
        ("engine exited with code 1; 5 failures in 600s, giving up", Cause.EXITED),
        ("something new", Cause.OTHER),
    ],
)
def test_cause_of_each_failure_reason(reason: str, cause: Cause) -> None:
    assert cause_of(reason) is cause


def _reason(need_gib: float, devices: list[DeviceView], waited: float = 0) -> str:
    decision = plan([Request("m-0", int(need_gib * GiB), waited=waited)], devices)
    assert decision.placements == []
    return decision.waits[0].reason


def test_pending_kind_of_each_reason_the_planner_gives() -> None:
    gpu = DeviceView("0", "GPU0", 8 * GiB, 8 * GiB, 0)
    busy = DeviceView("0", "GPU0", 8 * GiB, 8 * GiB, 0, starting=True)
    assert pending_kind(_reason(10, [gpu])) is PendingKind.MEMORY
    assert pending_kind(_reason(4, [busy])) is PendingKind.ENGINE_STARTING
    assert pending_kind(_reason(4, [])) is PendingKind.NO_DEVICES
    two = plan([Request("m-0", 10 * GiB, waited=100), Request("n-0", 1 * GiB, seq=1)], [gpu]).waits
    assert [pending_kind(w.reason) for w in two] == [PendingKind.MEMORY, PendingKind.QUEUED]
    assert pending_kind("waiting for placement") is PendingKind.NOT_PLANNED


def test_model_of_replica_ids_with_dashes() -> None:
    assert model_of("tiny-llama-base-0") == "tiny-llama-base"
    assert model_of("a-12") == "a"


def test_engine_families_merge_with_model_and_replica_labels() -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Relabelled(scrape(a0=(A0, 3, 30), b0=(B0, 5, 50))))
    text = generate_latest(registry).decode()
    assert text.count("# TYPE vllm:request_success_total counter") == 1
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert "process_cpu_seconds" not in families, "only vllm: families are re-exported"
    tokens = {
        (s.labels["model"], s.labels["replica"], s.labels["model_name"]): s.value
        for s in families["vllm:generation_tokens"].samples
    }
    assert tokens == {("a", "a-0", "a"): 30.0, ("b", "b-0", "b"): 50.0}
    running = families["vllm:num_requests_running"]
    assert running.type == "gauge" and len(running.samples) == 2


def test_rates_per_model_sum_replicas_and_survive_a_counter_reset() -> None:
    meter = Throughput(window=30)
    meter.observe(scrape(a0=(A0, 10, 100), a1=(A1, 0, 0), b0=(B0, 1, 1)), now=100.0)
    assert meter.rates()["a"] == Rate(0.0, 0.0)
    meter.observe(scrape(a0=(A0, 20, 300), a1=(A1, 5, 50), b0=(B0, 1, 1)), now=110.0)
    assert meter.rates() == {"a": Rate(1.5, 25.0), "b": Rate(0.0, 0.0)}
    # a-0's engine restarted (its counters began again); b-0 is gone.
    meter.observe(scrape(a0=(A0, 2, 20), a1=(A1, 10, 100)), now=120.0)
    assert meter.rates() == {"a": Rate(0.5, 5.0)}


def test_rates_cover_the_last_window_only() -> None:
    meter = Throughput(window=10)
    for second, total in ((0, 0), (5, 0), (10, 100), (15, 200), (20, 300)):
        meter.observe(scrape(a0=(A0, total, total)), now=float(second))
    assert meter.rates()["a"] == Rate(20.0, 20.0)  # from t=10 to t=20 only


def test_gpu_memory_goes_to_the_replica_whose_process_group_holds_it() -> None:
    usage = {"0": {10: 5 * GiB, 11: 1 * GiB, 20: 2 * GiB, 30: 3 * GiB}, "1": {}}
    groups = {10: 10, 11: 10, 20: 20, 30: None}  # 11 is 10's EngineCore; 30 is gone
    found = attribute(usage, {10: "a-0", 20: "b-0"}, group_of=groups.get)
    assert found.by_replica == {("0", "a-0"): 6 * GiB, ("0", "b-0"): 2 * GiB}
    assert found.others == {"0": 3 * GiB, "1": 0}
