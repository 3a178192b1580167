"""API keys at the gateway (gateway.keys): the OpenAI SDK's `api_key` is the key; unknown keys
get 401, other models 403, a key over its requests or tokens per minute 429 with Retry-After."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from contract.routes import KeyRoute, RouteTable, key_hash
from gateway.keys import Bucket
from gateway.routes import RouteWatcher
from tests.fake_engine import FakeEngine
from tests.gateway.conftest import Rig, SdkFactory, ready_model

KEY = "sem-the-first-key"


def key_route(**limits: object) -> KeyRoute:
    return KeyRoute("k1", key_hash(KEY), **limits)  # type: ignore[arg-type]


async def serve(rig: Rig, *keys: KeyRoute, require: bool = False) -> TestClient:
    models = {name: ready_model(name, await rig.engine(FakeEngine(name))) for name in ("m", "n")}
    return await rig.gateway(RouteTable(1, models, keys), require_keys=require)


@pytest.fixture
def sdk(sdk: SdkFactory) -> Callable[..., openai.AsyncOpenAI]:
    """The SDK with this module's key by default, and no retries (a refusal is the answer)."""

    def make(client: TestClient, key: str = KEY) -> openai.AsyncOpenAI:
        return sdk(client, key, max_retries=0)

    return make


async def complete(api: openai.AsyncOpenAI, model: str = "m", max_tokens: int = 2) -> str:
    answer = await api.completions.create(model=model, prompt="a b", max_tokens=max_tokens)
    return answer.choices[0].text


async def test_the_sdk_api_key_is_the_key(rig, sdk):
    gateway = await serve(rig, key_route())
    assert await complete(sdk(gateway)) == " b a"
    with pytest.raises(openai.AuthenticationError) as refused:
        await complete(sdk(gateway, "sem-not-a-key"))
    assert refused.value.body["type"] == "invalid_api_key"  # type: ignore[index]
    response = await gateway.post("/generate", json={"model": "m", "prompt": "a"})
    assert response.status == 401
    assert (await response.json())["error"]["type"] == "invalid_api_key"


async def test_keys_off_until_one_exists_or_required(rig, sdk):
    open_door = await serve(rig)
    assert await complete(sdk(open_door, "anything")) == " b a"
    required = await serve(rig, require=True)
    with pytest.raises(openai.AuthenticationError):
        await complete(sdk(required))


async def test_a_key_may_use_only_its_models(rig, sdk):
    gateway = await serve(rig, key_route(models=("m",)))
    assert await complete(sdk(gateway)) == " b a"
    with pytest.raises(openai.PermissionDeniedError) as refused:
        await complete(sdk(gateway), model="n")
    assert refused.value.status_code == 403
    listed = await sdk(gateway).models.list()
    assert [m.id for m in listed.data] == ["m"]


async def test_requests_per_minute_gives_429_with_retry_after(rig, sdk):
    gateway = await serve(rig, key_route(requests_per_minute=2))
    api = sdk(gateway)
    await complete(api)
    await complete(api)
    with pytest.raises(openai.RateLimitError) as refused:
        await complete(api)
    assert refused.value.body["type"] == "rate_limit_exceeded"  # type: ignore[index]
    assert 1 <= int(refused.value.response.headers["Retry-After"]) <= 30


async def test_a_key_over_its_tokens_is_refused_until_it_refills(rig, sdk):
    gateway = await serve(rig, key_route(tokens_per_minute=3))
    api = sdk(gateway)
    await complete(api, max_tokens=3)  # the bucket had 3: now empty
    with pytest.raises(openai.RateLimitError) as refused:
        await complete(api, max_tokens=1)
    assert "tokens per minute" in refused.value.message


async def test_usage_per_key_in_the_metrics(rig, sdk):
    gateway = await serve(rig, key_route())
    api = sdk(gateway)
    await complete(api, max_tokens=2)
    await complete(api, max_tokens=3)
    text = await (await gateway.get("/metrics")).text()
    assert 'sem_gateway_key_requests_total{key="k1"} 2.0' in text
    assert 'sem_gateway_key_tokens_total{key="k1"} 5.0' in text


async def test_open_routes_stay_open_and_a_revoked_key_is_refused(rig, sdk):
    gateway = await serve(rig, key_route(), require=True)
    for path in ("/health", "/metrics", "/openapi.json", "/docs"):
        assert (await gateway.get(path)).status == 200, path
    assert await complete(sdk(gateway)) == " b a"
    table = rig.watcher.table
    rig.watcher.update(dataclasses.replace(table, version=2, keys=()))
    with pytest.raises(openai.AuthenticationError):
        await complete(sdk(gateway))


def test_a_bucket_refills_at_its_rate():
    bucket = Bucket(60, now=0.0)  # one a second
    bucket.take(61, now=0.0)  # into debt: -1
    assert bucket.wait(now=0.0) == pytest.approx(2.0)
    assert bucket.wait(now=1.0) == pytest.approx(1.0)
    assert bucket.wait(now=2.0) == 0.0
    assert bucket.wait(now=1000.0) == 0.0 and bucket.level == 60


async def test_the_route_watcher_sends_the_admin_token():
    """The route table holds secrets: the supervisor answers it only with the admin token."""
    table = RouteTable(3, {}, (key_route(),))

    async def routes(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Bearer admin-s3cret":
            return web.json_response({"error": {"type": "unauthorized"}}, status=401)
        return web.json_response(table.to_json())

    app = web.Application()
    app.router.add_get("/routes", routes)
    async with TestServer(app) as supervisor, aiohttp.ClientSession() as session:
        url = str(supervisor.make_url(""))
        watcher = RouteWatcher(url, session, poll_timeout=0.1, token="admin-s3cret")
        refused = RouteWatcher(url, session, poll_timeout=0.1)
        tasks = [asyncio.create_task(w.run()) for w in (watcher, refused)]
        try:
            await watcher.wait_change(timeout=10)
            assert watcher.table == table and watcher.connected
            assert not refused.connected and refused.table.version == -1
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
