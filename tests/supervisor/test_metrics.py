"""GET /metrics and GET /throughput over a manager running stand-in engines: states, pending
time and kind, memory per device, event-derived counters, and the engines' own metrics."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from supervisor.api import create_app
from supervisor.config import ModelSpec
from supervisor.engine_metrics import EngineScraper
from supervisor.gpu_usage import ProcessMemory, Usage
from supervisor.manager import Manager
from supervisor.metrics import SupervisorMetrics
from supervisor.replica import Replica
from supervisor.resources import StaticInventory
from tests.conftest import ManagerFactory, fake_engine_command, wait_until

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class FakeProcessMemory:
    """What NVML would say: bytes per pid per GPU, set by the test."""

    def __init__(self) -> None:
        self.found: Usage = {}

    def usage(self) -> Usage:
        return self.found


@asynccontextmanager
async def metrics_api(
    manager: Manager, scrape_timeout: float = 2.0, processes: ProcessMemory | None = None
) -> AsyncIterator[tuple[httpx.AsyncClient, SupervisorMetrics]]:
    scraper = EngineScraper(timeout=scrape_timeout)
    metrics = SupervisorMetrics(manager, manager.events, scraper, processes)
    await metrics.start()
    app = create_app(manager, manager.events, metrics=metrics)
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://sem") as client:
            yield client, metrics
    finally:
        await metrics.aclose()


async def scrape(client: httpx.AsyncClient) -> Samples:
    """Every sample of GET /metrics, which must parse as one valid exposition."""
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    names = [f.name for f in text_string_to_metric_families(response.text)]
    assert len(names) == len(set(names)), "a family appears twice"
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(response.text)
        for s in f.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The one sample of `name` whose labels include `labels`; None if there is none."""
    found = [
        v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items()
    ]
    assert len(found) <= 1, f"{name} {labels} matches {len(found)} samples"
    return found[0] if found else None


def spec(model_dir: Path, name: str, **fields: object) -> ModelSpec:
    return ModelSpec.model_validate({"name": name, "source": f"path:{model_dir}", **fields})


async def serving(manager: Manager, model_dir: Path, name: str = "m", **fields: object) -> Replica:
    """Add a one-replica model and wait until it is ready; its replica."""
    await manager.add(spec(model_dir, name, **fields))
    await wait_until(lambda: manager.get(name).state.value == "ready", what=f"{name} ready")
    return manager.get(name).replicas[0]


async def complete(replica: Replica, requests: int, max_tokens: int) -> None:
    """Completions straight to the replica's engine (the gateway is not part of these tests)."""
    assert replica.url is not None and replica.plan is not None
    key = {"Authorization": f"Bearer {replica.plan.api_key}"}  # every engine demands its key
    async with httpx.AsyncClient(base_url=replica.url, headers=key) as engine:
        for _ in range(requests):
            body = {"model": replica.model, "prompt": "one two", "max_tokens": max_tokens}
            assert (await engine.post("/v1/completions", json=body)).status_code == 200


async def test_ready_model_states_memory_placements_and_engine_metrics(
    make_manager: ManagerFactory, model_dir: Path
) -> None:
    manager = make_manager(inventory=StaticInventory.parse("cpu:4GiB"))
    async with metrics_api(manager) as (client, _):
        await complete(await serving(manager, model_dir, memory="1GiB"), 3, max_tokens=4)
        samples = await scrape(client)

    assert value(samples, "sem_supervisor_model_state", model="m", state="ready") == 1
    assert value(samples, "sem_supervisor_model_state", model="m", state="pending") == 0
    replica = {"model": "m", "replica": "m-0"}
    assert value(samples, "sem_supervisor_replica_state", state="ready", **replica) == 1
    assert value(samples, "sem_supervisor_replica_state", state="starting", **replica) == 0
    assert value(samples, "sem_supervisor_replica_pending_seconds", **replica) is None
    device = {"device": "cpu", "kind": "cpu"}
    assert value(samples, "sem_supervisor_device_total_bytes", **device) == 4 * 2**30
    assert value(samples, "sem_supervisor_device_reserved_bytes", **device) == 2**30
    assert value(samples, "sem_supervisor_device_reserved_by_replica_bytes", **replica) == 2**30
    assert value(samples, "sem_supervisor_placement_decisions_total", model="m",
                 outcome="placed") == 1  # fmt: skip
    assert value(samples, "sem_supervisor_engine_scrape_up", **replica) == 1
    assert value(samples, "sem_supervisor_downloads_active") == 0
    # The engine's own metrics, its names kept, with model and replica added.
    assert value(samples, "vllm:generation_tokens_total", model_name="m", **replica) == 12
    assert value(samples, "vllm:request_success_total", **replica) == 3
    assert value(samples, "vllm:kv_cache_usage_perc", **replica) == 0


async def test_pending_replica_has_its_wait_and_kind(
    make_manager: ManagerFactory, model_dir: Path
) -> None:
    manager = make_manager(inventory=StaticInventory.parse("cpu:1GiB"))
    async with metrics_api(manager) as (client, _):
        await manager.add(spec(model_dir, "first", memory="700MiB"))
        await manager.add(spec(model_dir, "second", memory="700MiB"))
        waiting = manager.get("second").replicas[0]
        await wait_until(lambda: "largest free" in waiting.reason, what="second waits")
        samples = await scrape(client)

    replica = {"model": "second", "replica": "second-0"}
    assert value(samples, "sem_supervisor_model_state", model="second", state="pending") == 1
    pending = value(samples, "sem_supervisor_replica_pending_seconds", **replica)
    assert pending is not None and pending > 0
    assert value(samples, "sem_supervisor_replica_pending_reason", reason_kind="memory",
                 **replica) == 1  # fmt: skip
    assert value(samples, "sem_supervisor_placement_decisions_total", model="second",
                 outcome="pending") == 1  # fmt: skip


async def test_crash_loop_at_start_counts_restarts_then_a_give_up_by_cause(
    make_manager: ManagerFactory, model_dir: Path
) -> None:
    manager = make_manager(command=fake_engine_command(FAKE_EXIT_AT_START="3"))
    async with metrics_api(manager) as (client, _):
        await manager.add(spec(model_dir, "m"))
        replica = manager.get("m").replicas[0]
        await wait_until(lambda: replica.state.value == "failed", what="given up")
        samples = await scrape(client)
    # FAST_POLICY: the third failure gives up; the two before it were restarts.
    assert value(samples, "sem_supervisor_restarts_total", model="m",
                 cause="exited_starting") == 2  # fmt: skip
    assert value(samples, "sem_supervisor_replica_failures_total", model="m",
                 cause="exited_starting") == 1  # fmt: skip
    assert value(samples, "sem_supervisor_replica_state", replica="m-0", state="failed") == 1


async def test_engine_killed_while_ready_counts_an_exit(
    make_manager: ManagerFactory, model_dir: Path
) -> None:
    manager = make_manager()
    async with metrics_api(manager) as (client, _):
        replica = await serving(manager, model_dir)
        assert replica.process is not None
        os.kill(replica.process.pid, signal.SIGKILL)
        await wait_until(lambda: replica.restarts >= 1, what="a restart")
        samples = await scrape(client)
    assert value(samples, "sem_supervisor_restarts_total", model="m", cause="exited") == 1
    assert value(samples, "sem_supervisor_replica_restarts", replica="m-0") == 1


async def test_a_hung_engine_is_skipped_and_counted(
    make_manager: ManagerFactory, model_dir: Path
) -> None:
    manager = make_manager()
    async with metrics_api(manager, scrape_timeout=0.5) as (client, _):
        process = (await serving(manager, model_dir)).process
        assert process is not None
        os.kill(process.pid, signal.SIGSTOP)  # its /metrics will not answer
        try:
            samples = await scrape(client)
        finally:
            os.kill(process.pid, signal.SIGCONT)
    replica = {"model": "m", "replica": "m-0"}
    assert value(samples, "sem_supervisor_engine_scrape_up", **replica) == 0
    assert value(samples, "sem_supervisor_engine_scrape_errors_total", **replica) == 1
    assert value(samples, "sem_supervisor_model_state", model="m", state="ready") == 1
    assert value(samples, "vllm:num_requests_running", **replica) is None


async def test_throughput_is_requests_and_tokens_per_second_per_model(
    make_manager: ManagerFactory, model_dir: Path
) -> None:
    manager = make_manager()
    async with metrics_api(manager) as (client, _):
        replica = await serving(manager, model_dir)
        idle = (await client.get("/throughput")).json()
        assert idle["models"] == {"m": {"requests_per_s": 0.0, "tokens_per_s": 0.0}}
        await complete(replica, 4, max_tokens=5)
        busy = (await client.get("/throughput")).json()
    rate = busy["models"]["m"]
    assert rate["requests_per_s"] > 0
    # 5 tokens per request: the two rates come from the same interval.
    assert abs(rate["tokens_per_s"] - 5 * rate["requests_per_s"]) < 0.01 * rate["tokens_per_s"]


async def test_status_page_is_one_self_contained_file(make_manager: ManagerFactory) -> None:
    async with metrics_api(make_manager()) as (client, _):
        root = await client.get("/")
        page = await client.get("/status")
    assert root.status_code in (302, 307) and root.headers["location"] == "/status"
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "innerHTML" not in page.text and "src=" not in page.text.replace("default-src", "")
    assert "http://" not in page.text and "https://" not in page.text


async def test_gpu_memory_used_by_each_replica_and_by_others(
    make_manager: ManagerFactory, model_dir: Path
) -> None:
    gpus = FakeProcessMemory()
    manager = make_manager(inventory=StaticInventory.parse("2x24GiB"))
    async with metrics_api(manager, processes=gpus) as (client, _):
        engine = (await serving(manager, model_dir, memory="4GiB")).process
        assert engine is not None
        core = psutil.Process(engine.pid).children()[0].pid  # its EngineCore, same group
        stranger = 2**22 + 7  # above pid_max: a process of no replica (or of the host)
        gpus.found = {"0": {engine.pid: 3 << 30, core: 1 << 30, stranger: 5 << 30}, "1": {}}
        samples = await scrape(client)
    replica = {"model": "m", "replica": "m-0"}
    assert value(samples, "sem_supervisor_device_used_by_replica_bytes", device="0",
                 **replica) == 4 << 30  # fmt: skip
    assert value(samples, "sem_supervisor_device_used_by_others_bytes", device="0") == 5 << 30
    assert value(samples, "sem_supervisor_device_used_by_others_bytes", device="1") == 0
    assert value(samples, "sem_supervisor_device_reserved_by_replica_bytes", device="0",
                 **replica) == 4 << 30  # fmt: skip
