"""The Ray backend on a local cluster: inventory, engines through node agents, re-adoption,
nodes joining, and a two-replica model that loses a node under load with 0 failed requests."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import aiohttp
import httpx
import psutil
import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from gateway.retry import RetryBudget
from gateway.routes import RouteWatcher
from supervisor.cluster import NODE_ENV
from supervisor.cluster.backend import RayCluster
from supervisor.config import ModelSpec
from supervisor.engine import EngineCommand, HubFetch, LaunchPlan, free_port
from supervisor.events import EventLog
from supervisor.manager import EngineSettings, Manager, SchedulerSettings
from supervisor.probe import EngineProbe
from supervisor.states import ReplicaState
from supervisor.store import Store
from supervisor.units import GiB
from tests.cluster.local_ray import LocalRay, cluster_yaml
from tests.conftest import FAST_POLICY, FAST_TIMING, fake_engine_command, running, wait_until
from tests.e2e.helpers import SemRun
from tests.hubrepos import TINY, Hub, cached_here

pytestmark = pytest.mark.ray


def launch_plan(cluster: RayCluster, node_id: str, model_dir: Path, tmp_path: Path) -> LaunchPlan:
    node = next(n for n in cluster.nodes() if n.node_id == node_id)
    replica_id = f"m-{uuid.uuid4().hex[:6]}"
    return LaunchPlan(
        replica_id=replica_id, served_name="m", model=str(model_dir), port=free_port(),
        log_path=tmp_path / f"{replica_id}.log", max_num_seqs=4, host=node.host, node=node_id,
        api_key="s3cret",
    )  # fmt: skip


async def healthy(url: str) -> bool:
    async with httpx.AsyncClient(trust_env=False) as client:
        try:
            return (await client.get(f"{url}/health")).status_code == 200
        except httpx.HTTPError:
            return False


def test_inventory_lists_every_nodes_declared_gpus(local_ray: LocalRay, ray_cluster: RayCluster):
    devices = ray_cluster.devices()
    by_node = {node: [d for d in devices if d.node == node] for node in local_ray.node_ids.values()}
    assert {node: len(gpus) for node, gpus in by_node.items()} == {
        node: 2 for node in local_ray.node_ids.values()
    }
    assert all(d.kind == "gpu" and d.total == 24 * GiB for d in devices)
    assert sorted(d.index for d in devices) == [0, 0, 1, 1]  # CUDA indexes on their own node
    assert len({d.id for d in devices}) == 4  # ids are cluster-wide


def test_a_cluster_that_keeps_engines_off_its_head_offers_none_of_its_devices(
    local_ray: LocalRay, ray_cluster: RayCluster
):
    head = local_ray.node_ids["head"]
    assert {n.node_id: n.head for n in ray_cluster.nodes()}[head] is True
    assert sum(n.head for n in ray_cluster.nodes()) == 1
    devices = RayCluster(local_ray.address, engines_on_head=False).devices()
    assert devices and all(d.node != head for d in devices)


async def test_engine_runs_on_its_node_through_its_agent(
    local_ray: LocalRay, ray_cluster: RayCluster, model_dir: Path, tmp_path: Path
):
    node_id = local_ray.node_ids["a"]
    plan = launch_plan(ray_cluster, node_id, model_dir, tmp_path)
    engine = await ray_cluster.spawn(fake_engine_command(), plan, uuid.uuid4().hex, {})
    url = f"http://{plan.host}:{plan.port}"
    await wait_until_async(lambda: healthy(url), what="the engine's /health")
    assert psutil.Process(engine.pid).environ()[NODE_ENV] == node_id
    async with httpx.AsyncClient(trust_env=False) as client:
        assert (await client.get(f"{url}/v1/models")).status_code == 401  # no key, no service
        keyed = await client.get(f"{url}/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert keyed.json()["data"][0]["id"] == "m"
    assert "fake engine ready" in await engine.log()
    assert await engine.stop(grace=2) is False  # it exited on SIGTERM
    assert await engine.wait() == -1 and not psutil.pid_exists(engine.pid)


async def test_an_hf_model_is_cached_on_its_node_before_its_engine_starts(
    local_ray: LocalRay, ray_cluster: RayCluster, hub: Hub, tmp_path: Path
):
    """The node's cache folder (here one the supervisor never wrote) gets the model from the
    hub, and the engine starts from it there."""
    here = await cached_here(hub, tmp_path / "supervisor-cache")
    node_cache = tmp_path / "node-cache"
    fetch = HubFetch(f"hf://{TINY}@{here.name}", str(node_cache), hub.url)
    plan = replace(launch_plan(ray_cluster, local_ray.node_ids["a"], here, tmp_path), fetch=fetch)
    plan = await ray_cluster.prepare(plan)
    engine = await ray_cluster.spawn(fake_engine_command(), plan, uuid.uuid4().hex, {})
    try:
        await wait_until_async(lambda: healthy(f"http://{plan.host}:{plan.port}"),
                               what="the engine's /health")  # fmt: skip
        argv = psutil.Process(engine.pid).cmdline()
        model = Path(argv[argv.index("--model") + 1])
        assert model.is_relative_to(node_cache) and model.name == here.name, argv
        assert (model / "config.json").read_bytes() == (here / "config.json").read_bytes()
    finally:
        await engine.stop(grace=2)


async def test_an_engine_dies_with_its_nodes_ray_processes_and_gets_a_port_free_there(
    local_ray: LocalRay, ray_cluster: RayCluster, model_dir: Path, tmp_path: Path
):
    """`ray stop` on a node, or its raylet killed, the machine staying up: its engines go too
    (tethered to their agent), nothing is left holding the node's memory."""
    await asyncio.to_thread(local_ray.start, ["doomed"])
    plan = launch_plan(ray_cluster, local_ray.node_ids["doomed"], model_dir, tmp_path)
    prepared = await ray_cluster.prepare(replace(plan, port=1))  # 1: taken, and not its to pick
    assert prepared.port != 1
    engine = await ray_cluster.spawn(fake_engine_command(), prepared, uuid.uuid4().hex, {})
    await wait_until_async(lambda: healthy(f"http://{prepared.host}:{prepared.port}"),
                           what="the engine's /health")  # fmt: skip
    await asyncio.to_thread(local_ray.kill_ray, "doomed")
    await wait_until(lambda: not running(engine.pid), timeout=20,
                     what="the engine gone with its agent")  # fmt: skip


async def test_a_restarted_supervisor_re_adopts_engines_through_their_agents(
    local_ray: LocalRay, ray_cluster: RayCluster, model_dir: Path, tmp_path: Path
):
    plan = launch_plan(ray_cluster, local_ray.node_ids["a"], model_dir, tmp_path)
    engine = await ray_cluster.spawn(fake_engine_command(), plan, uuid.uuid4().hex, {})
    await ray_cluster.close()  # the supervisor goes away; the detached agent stays
    await asyncio.to_thread(ray_cluster.connect)
    adopted = (await ray_cluster.adopt())[plan.replica_id]
    assert (adopted.pid, adopted.port) == (engine.pid, plan.port)
    await adopted.stop(grace=2)
    assert not psutil.pid_exists(engine.pid)
    assert plan.replica_id not in await ray_cluster.adopt()


async def test_a_joining_node_is_seen_within_a_poll(local_ray: LocalRay, ray_cluster: RayCluster):
    seen: list[set[str]] = []
    ray_cluster.watch(lambda joined, lost: seen.append(joined))
    try:
        await asyncio.to_thread(local_ray.start, ["b"])
        started = time.monotonic()
        await wait_until(lambda: any(local_ray.node_ids["b"] in s for s in seen), timeout=10)
        assert time.monotonic() - started < 3
    finally:
        await ray_cluster.stop_watching()
    assert sum(d.node == local_ray.node_ids["b"] for d in ray_cluster.devices()) == 2


async def wait_until_async(check, timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.1)


async def routes_to(watcher: RouteWatcher, manager: Manager) -> None:
    """The in-process gateway's route table follows the manager's, as over /routes."""
    while True:
        watcher.update(manager.routes)
        await manager.wait_routes(manager.routes.version, timeout=5)


def cluster_manager(
    cluster: RayCluster, tmp_path: Path, store: Store, probe: EngineProbe,
    instance: str = "", command: EngineCommand | None = None,
) -> Manager:  # fmt: skip
    """A manager that places on the cluster's nodes and starts engines through their agents."""
    settings = EngineSettings(
        command=command or fake_engine_command(), state_dir=tmp_path,
        instance=instance or uuid.uuid4().hex, parent_env={}, spawn=cluster.spawn,
        adopt=cluster.adopt, prepare=cluster.prepare,
    )  # fmt: skip
    return Manager(
        settings=settings, inventory=cluster, probe=probe, events=EventLog(), store=store,
        policy=FAST_POLICY, timing=FAST_TIMING, scheduling=SchedulerSettings(recheck_interval=0.5),
    )  # fmt: skip


def ready_nodes(manager: Manager) -> dict[str, str]:
    """Ready replica id -> its node."""
    return {
        r.id: r.plan.node or ""
        for r in manager.get("m").replicas
        if r.state is ReplicaState.READY and r.plan is not None
    }


async def test_a_model_on_two_nodes_loses_one_under_load_with_no_failed_request(
    local_ray: LocalRay, ray_cluster: RayCluster, model_dir: Path, tmp_path: Path
):
    """With engines kept off the head (Ray's GCS, which the cluster cannot lose), the two
    replicas go to two worker nodes; either one may go."""
    if "b" not in local_ray.node_ids:
        await asyncio.to_thread(local_ray.start, ["b"])
    ray_cluster.engines_on_head = False
    probe = EngineProbe(timeout=2)
    command = fake_engine_command(FAKE_TOKEN_DELAY="0.01")
    manager = cluster_manager(ray_cluster, tmp_path, Store(None), probe, command=command)
    manager.start()
    ray_cluster.watch(lambda joined, lost: manager.nodes_changed(lost))
    session = aiohttp.ClientSession()
    watcher = RouteWatcher("http://127.0.0.1:1", session)
    follow = asyncio.create_task(routes_to(watcher, manager))
    budget = RetryBudget(max_attempts=3, quarantine=60, replay_timeout=20, suspect_for=0.5)
    client = TestClient(TestServer(create_app(watcher, retry=budget)))
    await client.start_server()
    try:
        await manager.add(
            ModelSpec(name="m", source=f"path:{model_dir}", replicas=2, memory="10GiB")
        )
        await wait_until(lambda: len(ready_nodes(manager)) == 2, timeout=60, what="2 ready")
        nodes = set(ready_nodes(manager).values())
        assert len(nodes) == 2, "two replicas of one model go to two nodes"
        assert local_ray.node_ids["head"] not in nodes
        victim = next(name for name, node in local_ray.node_ids.items() if node in nodes)

        results: list[int] = []
        stop = asyncio.Event()

        async def load() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                body = {"model": "m", "prompt": f"count {n}", "max_tokens": 8}
                response = await client.post("/v1/completions", json=body)
                results.append(response.status)

        loaders = [asyncio.create_task(load()) for _ in range(4)]
        await wait_until(lambda: len(results) >= 20, what="load running")
        local_ray.kill(victim)
        lost = local_ray.node_ids[victim]
        await wait_until(
            lambda: len(ready_nodes(manager)) == 2 and lost not in ready_nodes(manager).values(),
            timeout=60, what="the lost replica restarted on a node that is left",
        )  # fmt: skip
        served = len(results)
        await wait_until(lambda: len(results) >= served + 20, what="load after the recovery")
        stop.set()
        await asyncio.gather(*loaders)
        assert results.count(200) == len(results), f"failed: {[s for s in results if s != 200]}"
    finally:
        ray_cluster.engines_on_head = True
        await ray_cluster.stop_watching()
        await manager.shutdown(drain_timeout=1)
        follow.cancel()
        await client.close()
        await session.close()
        await probe.aclose()


async def test_a_restarted_supervisor_re_adopts_its_replicas_with_their_keys(
    ray_cluster: RayCluster, model_dir: Path, tmp_path: Path
):
    spec = ModelSpec(name="m", source=f"path:{model_dir}", memory="10GiB")
    probe, instance = EngineProbe(timeout=2), uuid.uuid4().hex
    first = cluster_manager(ray_cluster, tmp_path, Store(tmp_path / "sem.db"), probe, instance)
    first.start()
    await first.restore([spec], drain_timeout=1)
    await wait_until(lambda: len(ready_nodes(first)) == 1, timeout=60, what="ready")
    before = first.routes.models["m"].replicas[0]
    pid = first.get("m").replicas[0].snapshot()["pid"]
    # The supervisor process dies: its tasks end, stopping nothing; it leaves the cluster.
    await first._scheduler.stop()
    for replica in first.get("m").replicas:
        assert replica._task is not None
        replica._task.cancel()
    await ray_cluster.close()
    await asyncio.to_thread(ray_cluster.connect)

    second = cluster_manager(ray_cluster, tmp_path, Store(tmp_path / "sem.db"), probe, instance)
    second.start()
    try:
        await second.restore([spec], drain_timeout=1)
        await wait_until(lambda: len(ready_nodes(second)) == 1, timeout=30, what="re-adopted")
        replica = second.get("m").replicas[0]
        assert (replica.id, replica.snapshot()["pid"]) == (before.id, pid)
        route = second.routes.models["m"].replicas[0]
        assert (route.url, route.api_key) == (before.url, before.api_key)
        async with httpx.AsyncClient(trust_env=False) as client:
            key = {"Authorization": f"Bearer {route.api_key}"}
            answer = await client.get(f"{route.url}/v1/models", headers=key)
            assert answer.status_code == 200
    finally:
        await second.shutdown(drain_timeout=1)
        await probe.aclose()


def test_sem_run_with_a_cluster_in_models_yaml_serves_from_engines_on_its_nodes(
    local_ray: LocalRay, model_dir: Path, tmp_path: Path
):
    """The whole path: `sem run` joins the cluster from models.yaml, places two replicas on two
    nodes, and its gateway (which alone has the engines' keys) answers; SIGTERM leaves nothing."""
    config = tmp_path / "models.yaml"
    model = f"  - name: m\n    source: path:{model_dir}\n    memory: 10GiB\n    replicas: 2\n"
    config.write_text(cluster_yaml(local_ray.address, model))
    run = SemRun(config=config, state_dir=tmp_path / "state", engine_python=sys.executable,
                 engine_module="tests.fake_engine").start()  # fmt: skip
    try:
        run.wait_ready(["m"], timeout=90)
        body = {"model": "m", "prompt": "count 1", "max_tokens": 3}
        answer = httpx.post(f"{run.gateway}/v1/completions", json=body, timeout=30)
        assert answer.json()["choices"][0]["text"] == " 2 3 4"
        models = httpx.get(f"{run.supervisor}/models", timeout=5).json()["models"]
        devices = [r["devices"][0] for r in models[0]["replicas"]]
        assert len({d.split("/")[0] for d in devices}) == 2, f"not on two nodes: {devices}"
        assert run.stop()[0] == 0
        assert run.leftovers() == []
    finally:
        run.kill_all()
