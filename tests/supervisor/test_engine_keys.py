"""Every engine demands a secret of its own on /v1 (vLLM's --api-key, given as VLLM_API_KEY):
only the gateway, told it by the route table, can call it; the key survives a supervisor
restart in sem.db, so a re-adopted engine can still be called."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import httpx
from aiohttp.test_utils import TestClient, TestServer

from contract.routes import RouteTable
from gateway.app import create_app
from gateway.routes import RouteWatcher
from supervisor.config import ModelSpec
from supervisor.manager import Manager
from supervisor.store import Store
from tests.conftest import ManagerFactory, wait_until

ASK = {"model": "m", "prompt": "one two", "max_tokens": 2}


async def ready_replica(manager: Manager) -> tuple[str, str]:
    """The ready replica of `m`: its URL and its key, as the route table says."""

    def ready() -> bool:
        model = manager.routes.models.get("m")
        return model is not None and bool(model.ready_replicas)

    await wait_until(ready, what="m ready")
    route = manager.routes.models["m"].ready_replicas[0]
    assert route.url is not None and route.api_key is not None
    return route.url, route.api_key


async def test_a_local_engine_refuses_v1_without_its_key(
    make_manager: ManagerFactory, model_dir: Path
):
    manager = make_manager()
    await manager.add(ModelSpec(name="m", source=f"path:{model_dir}"))
    url, key = await ready_replica(manager)
    async with httpx.AsyncClient(base_url=url) as engine:
        refused = await engine.post("/v1/completions", json=ASK)
        assert refused.status_code == 401
        assert (await engine.get("/v1/models")).status_code == 401
        ok = await engine.post(
            "/v1/completions", json=ASK, headers={"Authorization": f"Bearer {key}"}
        )
        assert ok.status_code == 200
        for open_path in ("/health", "/metrics"):  # as vLLM: the supervisor probes them
            assert (await engine.get(open_path)).status_code == 200


async def test_a_re_adopted_engine_keeps_its_key_and_the_gateway_can_call_it(
    make_manager: ManagerFactory, model_dir: Path, tmp_path: Path
):
    path = tmp_path / "sem.db"
    spec = ModelSpec(name="m", source=f"path:{model_dir}")
    first = make_manager(store=Store(path))
    await first.add(spec)
    url, key = await ready_replica(first)
    pid = first.get("m").replicas[0].process.pid  # type: ignore[union-attr]
    assert [r.api_key for r in Store(path).engines()] == [key]

    second = make_manager(store=Store(path))  # a restarted supervisor, same state
    await second.restore([spec], drain_timeout=1)
    again_url, again_key = await ready_replica(second)
    replica = second.get("m").replicas[0]
    assert replica.process is not None and replica.process.pid == pid, "re-adopted, not restarted"
    assert (again_url, again_key) == (url, key)
    async with aiohttp.ClientSession() as session:
        watcher = RouteWatcher("http://127.0.0.1:1", session)  # the table as /routes sends it
        watcher.update(RouteTable.from_json(second.routes.to_json()))
        async with TestClient(TestServer(create_app(watcher))) as gateway:
            answer = await gateway.post("/v1/completions", json=ASK)
            assert answer.status == 200, await answer.text()
