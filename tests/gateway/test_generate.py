"""POST /generate and friends, against an in-process stand-in engine."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from contract.routes import ModelRoute, ReplicaRoute, RouteTable
from gateway.retry import RetryBudget
from gateway.state import ADMISSION, UPSTREAM
from tests.fake_engine import FakeEngine
from tests.gateway.conftest import Rig, ready_model


async def failing_engine() -> web.Application:
    async def boom(_: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "EngineCore died"}}, status=500)

    async def refuse(_: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "max_tokens is too large"}}, status=400)

    async def hang(_: web.Request) -> web.Response:
        await asyncio.sleep(10)
        return web.json_response({})

    async def dies_mid_stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices": [{"text": "a"}]}\n\n')
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()  # the engine process died
        return response

    app = web.Application()
    app.router.add_post("/v1/completions", boom)
    app.router.add_post("/dies/v1/completions", dies_mid_stream)
    app.router.add_post("/v1/chat/completions", refuse)
    app.router.add_post("/hang/v1/chat/completions", hang)
    return app


@pytest.fixture
async def client(rig: Rig) -> TestClient:
    engine = await rig.engine(FakeEngine("m"))
    broken = await rig.engine(await failing_engine())
    starting = ReplicaRoute("slow-0", "starting", "http://127.0.0.1:1", 8)
    routes = RouteTable(1, {
        "m": ready_model("m", engine),
        "slow": ModelRoute("slow", "starting", "spawning engine", (starting,)),
        "broken": ready_model("broken", broken),
        "dies": ready_model("dies", f"{broken}/dies"),
        "hangs": ready_model("hangs", f"{broken}/hang"),
    })  # fmt: skip
    # A broken engine is retried, briefly shunned, then tried again by the next request.
    retry = RetryBudget(suspect_for=0.05, replay_timeout=1)
    return await rig.gateway(routes, retry=retry, queue_timeout=0.3)


async def test_generate_returns_text_finish_reason_and_usage(client):
    response = await client.post(
        "/generate", json={"model": "m", "prompt": "hello there", "max_tokens": 3}
    )
    assert response.status == 200
    assert await response.json() == {
        "model": "m",
        "text": " there hello there",
        "finish_reason": "length",
        "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5},
    }


async def test_unknown_model_is_404_naming_known_ones(client):
    response = await client.post("/generate", json={"model": "nope", "prompt": "hi"})
    assert response.status == 404
    error = (await response.json())["error"]
    assert (
        error["type"] == "model_not_found"
        and "known: broken, dies, hangs, m, slow" in error["message"]
    )


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ('{"model": "m", "prompt": ', 400, None),
        ("[1, 2]", 400, None),
        ('{"model": "m", "prompt": ""}', 422, "prompt"),
        ('{"model": "m"}', 422, "prompt"),
        ('{"prompt": "hi"}', 422, "model"),
        ('{"model": "m", "prompt": "hi", "max_tokens": -1}', 422, "max_tokens"),
        ('{"model": "m", "prompt": "hi", "temperature": "hot"}', 422, "temperature"),
    ],
)
async def test_bad_input_is_a_json_4xx_naming_the_field(client, body, status, param):
    response = await client.post(
        "/generate", data=body, headers={"content-type": "application/json"}
    )
    assert response.status == status
    error = (await response.json())["error"]
    assert error["param"] == param
    if param:
        assert error["message"].startswith(param)


async def test_model_still_starting_is_503_with_retry_after(client):
    response = await client.post("/generate", json={"model": "slow", "prompt": "hi"})
    assert response.status == 503
    assert int(response.headers["Retry-After"]) >= 1
    message = (await response.json())["error"]["message"]
    assert "not ready after 0s: starting (spawning engine)" in message


async def test_engine_error_is_502_not_500(client):
    response = await client.post("/generate", json={"model": "broken", "prompt": "hi"})
    assert response.status == 502
    assert "EngineCore died" in (await response.json())["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
async def test_engine_errors_are_relayed_in_openai_shape(client, stream):
    body = {"model": "broken", "prompt": "hi", "stream": stream}
    response = await client.post("/v1/completions", json=body)
    assert response.status == 502
    error = (await response.json())["error"]
    assert error["type"] == "upstream_error" and "EngineCore died" in error["message"]
    body = {"model": "broken", "messages": [], "stream": stream}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["code"] == 400 and "max_tokens is too large" in error["message"]


@pytest.mark.parametrize("route", ["/v1/completions", "/generate"])
async def test_an_engine_that_always_dies_mid_stream_ends_the_stream_with_an_error_event(
    client, route
):
    response = await client.post(route, json={"model": "dies", "prompt": "hi", "stream": True})
    assert response.status == 200  # the headers went out before the engine died
    events = [e for e in (await response.read()).decode().split("\n\n") if e]
    assert len(events) == 3 + 2, "a chunk from each of 3 attempts (resumed twice), error, [DONE]"
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["type"] == "upstream_error" and "dies-0 unreachable" in error["message"]
    assert "failed on engines 3 times" in error["message"]
    metrics = await (await client.get("/metrics")).text()
    assert f'model="dies",outcome="upstream_error",route="{route}"}} 1.0' in metrics


async def test_an_engine_that_does_not_answer_in_time_is_504(client):
    client.app[UPSTREAM].timeout = 0.2
    response = await client.post("/v1/chat/completions", json={"model": "hangs", "messages": []})
    assert response.status == 504, await response.text()
    assert (await response.json())["error"]["type"] == "upstream_timeout"
    assert client.app[ADMISSION].outstanding["hangs-0"] == 0


async def test_unknown_route_is_json_404(client):
    response = await client.get("/nope")
    assert response.status == 404
    assert (await response.json())["error"]["code"] == 404


async def test_models_and_health(client):
    models = await (await client.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == ["broken", "dies", "hangs", "m", "slow"]
    health = await (await client.get("/health")).json()
    assert health["ready_models"] == ["broken", "dies", "hangs", "m"]


def test_static_routes_parse_and_refuse_garbage():
    from gateway.daemon import static_routes

    table = static_routes(["a=http://127.0.0.1:1", "a=http://127.0.0.1:2@8", "b=http://h:3/"])
    assert [r.url for r in table.models["a"].replicas] == [
        "http://127.0.0.1:1",
        "http://127.0.0.1:2",
    ]
    assert [r.max_num_seqs for r in table.models["a"].replicas] == [4096, 8]
    assert table.models["b"].ready_replicas[0].url == "http://h:3"
    with pytest.raises(ValueError, match="is not MODEL=http"):
        static_routes(["nourl"])
