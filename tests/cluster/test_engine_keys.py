"""Engine keys: the route table carries them (an optional field) and the gateway sends them."""

from __future__ import annotations

import aiohttp
from aiohttp.test_utils import TestClient, TestServer

from contract.routes import ModelRoute, ReplicaRoute, RouteTable
from gateway.app import create_app
from gateway.routes import RouteWatcher
from tests.fake_engine import FakeEngine, make_app


def keyed_table(url: str, key: str | None) -> RouteTable:
    replica = ReplicaRoute("m-0", "ready", url, 8, api_key=key)
    return RouteTable(1, {"m": ModelRoute("m", "ready", "", (replica,))})


def test_the_key_goes_over_the_wire_only_when_there_is_one():
    keyed, plain = keyed_table("http://10.0.0.2:9000", "k"), keyed_table("http://h:1", None)
    assert RouteTable.from_json(keyed.to_json()) == keyed
    assert RouteTable.from_json(plain.to_json()) == plain
    assert "api_key" not in plain.to_json()["models"]["m"]["replicas"][0]


async def test_the_gateway_sends_each_engine_its_key_and_only_that_key():
    engine = TestServer(make_app(FakeEngine("m"), api_key="s3cret"))
    await engine.start_server()
    url = str(engine.make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as session:
        watcher = RouteWatcher("http://127.0.0.1:1", session)
        client = TestClient(TestServer(create_app(watcher)))
        await client.start_server()
        try:
            body = {"model": "m", "prompt": "count 1", "max_tokens": 2}
            watcher.update(keyed_table(url, "s3cret"))
            answer = await client.post("/v1/completions", json=body)
            assert (await answer.json())["choices"][0]["text"] == " 2 3"
            watcher.update(RouteTable(2, keyed_table(url, "wrong").models))
            refused = await client.post("/v1/completions", json=body)
            assert refused.status != 200  # the engine said 401: a stale key is not a pass
        finally:
            await client.close()
            await engine.close()
