"""An engine that fails a request costs the client nothing: replay, stream resume, the retry
budget. In-process stand-in engines that cut their connection as a killed engine does."""

from __future__ import annotations

import asyncio
import json

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient

from contract.routes import RouteTable
from gateway.retry import RetryBudget
from tests.fake_engine import FakeEngine
from tests.gateway.conftest import Rig, ready_model

FAST = RetryBudget(max_attempts=3, quarantine=60, replay_timeout=5, suspect_for=0.5)


def table(version: int, urls: list[str]) -> RouteTable:
    return RouteTable(version, {"m": ready_model("m", *urls)})


async def over(rig: Rig, *engines: FakeEngine) -> TestClient:
    """A gateway over `engines`, replicas m-0, m-1, ... of model m, with a fast retry budget."""
    urls = [await rig.engine(e) for e in engines]
    return await rig.gateway(table(1, urls), retry=RetryBudget(**vars(FAST)))


def engine(**knobs: object) -> FakeEngine:
    return FakeEngine("m", token_delay=0.01, **knobs)  # type: ignore[arg-type]


async def read_stream(response: aiohttp.ClientResponse) -> list[dict[str, object] | str]:
    assert response.status == 200, await response.text()
    raw = (await response.read()).decode()
    out: list[dict[str, object] | str] = []
    for event in raw.split("\n\n"):
        if event.startswith("data: "):
            data = event[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def stream_text(events: list[dict[str, object] | str]) -> str:
    text = ""
    for event in events:
        if isinstance(event, dict):
            for choice in event.get("choices", []):  # type: ignore[union-attr]
                text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
    return text


async def metric(client: TestClient, name: str) -> str:
    body = await (await client.get("/metrics")).text()
    return next((line for line in body.splitlines() if line.startswith(name)), "")


async def test_a_request_whose_engine_dies_is_replayed_on_another_replica(rig):
    dying, healthy = engine(die_after=2), engine()
    client = await over(rig, dying, healthy)
    body = {"model": "m", "prompt": "count 1", "max_tokens": 5}
    response = await client.post("/v1/completions", json=body)
    assert response.status == 200, await response.text()
    data = await response.json()
    assert data["choices"][0]["text"] == " 2 3 4 5 6"
    assert len(dying.requests) == 1 and len(healthy.requests) == 1
    assert "1.0" in await metric(client, 'sem_gateway_retries_total{kind="replay",model="m"}')


async def test_a_stream_cut_mid_way_goes_on_as_one_stream_from_where_it_broke(rig):
    dying, healthy = engine(die_after=4), engine()
    client = await over(rig, dying, healthy)
    body = {"model": "m", "prompt": "count 1", "max_tokens": 10, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    events = await read_stream(await client.post("/v1/completions", json=body))
    assert stream_text(events) == " 2 3 4 5 6 7 8 9 10 11", "what an unbroken run gives"
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = [e for e in events if isinstance(e, dict)]
    assert {c["id"] for c in chunks} == {"cmpl-fake"}
    assert chunks[-1]["usage"]["completion_tokens"] == 10  # type: ignore[index]
    follow = healthy.requests[0]
    assert (follow["prompt"], follow["max_tokens"]) == ("count 1 2 3 4 5", 6)
    assert "1.0" in await metric(client, 'sem_gateway_retries_total{kind="resume",model="m"}')


async def test_a_chat_stream_resumes_with_the_partial_assistant_message(rig):
    dying, healthy = engine(die_after=3), engine()
    client = await over(rig, dying, healthy)
    body = {"model": "m", "messages": [{"role": "user", "content": "count 7"}],
            "max_tokens": 6, "stream": True}  # fmt: skip
    events = await read_stream(await client.post("/v1/chat/completions", json=body))
    assert stream_text(events) == " 8 9 10 11 12 13"
    follow = healthy.requests[0]
    assert follow["messages"][-1] == {"role": "assistant", "content": " 8 9 10"}  # type: ignore[index]
    assert follow["continue_final_message"] is True
    assert follow["add_generation_prompt"] is False


async def test_an_in_band_error_is_a_failure_and_the_generate_stream_resumes(rig):
    flaky, healthy = engine(error_after=3), engine()
    client = await over(rig, flaky, healthy)
    body = {"model": "m", "prompt": "count 1", "max_tokens": 6, "stream": True}
    events = await read_stream(await client.post("/generate", json=body))
    assert "".join(e["text"] for e in events if isinstance(e, dict)) == " 2 3 4 5 6 7"  # type: ignore[misc]
    assert not any(isinstance(e, dict) and "error" in e for e in events)
    last = events[-2]
    assert isinstance(last, dict) and last["usage"]["completion_tokens"] == 6  # both attempts'
    assert events[-1] == "[DONE]"


async def test_a_retry_waits_for_the_restarted_engine(rig):
    dying = engine(die_after=1)
    client = await over(rig, dying)
    restarted = await rig.engine(engine())

    async def restart() -> None:
        await asyncio.sleep(0.5)  # the supervisor notices, the engine comes back on a new port
        rig.watcher.update(table(2, [restarted]))

    task = asyncio.create_task(restart())
    body = {"model": "m", "prompt": "count 1", "max_tokens": 4}
    response = await client.post("/generate", json=body)
    await task
    assert response.status == 200, await response.text()
    assert (await response.json())["text"] == " 2 3 4 5"


async def test_a_request_that_keeps_killing_engines_is_tried_three_times_then_refused(rig):
    first, second = engine(crash_on="boom"), engine(crash_on="boom")
    assert first.die_after is None and second.die_after is None, "they fail the poison only"
    client = await over(rig, first, second)
    poison = {"model": "m", "prompt": "boom now", "max_tokens": 4}
    response = await client.post("/v1/completions", json=poison)
    assert response.status == 502
    assert "3 times" in (await response.json())["error"]["message"]
    sent = len(first.requests) + len(second.requests)
    assert sent == 3
    again = await client.post("/v1/completions", json=poison)
    assert again.status == 422
    assert (await again.json())["error"]["type"] == "request_quarantined"
    assert len(first.requests) + len(second.requests) == sent, "not sent to an engine again"
    fine = await client.post("/v1/completions", json={**poison, "prompt": "count 1"})
    assert fine.status == 200
    assert len(first.requests) + len(second.requests) == sent + 1, "others still go to them"


async def test_an_engine_that_failed_gets_no_new_requests_for_a_while(rig):
    dying, healthy = engine(die_after=1), engine()
    client = await over(rig, dying, healthy)
    body = {"model": "m", "prompt": "count 1", "max_tokens": 3}
    for _ in range(4):
        assert (await client.post("/v1/completions", json=body)).status == 200
    assert (len(dying.requests), len(healthy.requests)) == (1, 4)
    await asyncio.sleep(0.6)  # the suspicion lapses: it is tried again
    await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(4)))
    assert len(dying.requests) > 1


async def test_an_error_event_split_across_reads_is_caught_and_what_came_before_it_is_kept(rig):
    async def broken_stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        tokens = [
            {"id": "cmpl-x", "created": 1, "choices": [{"index": 0, "text": t}]}
            for t in (" 2", " 3")
        ]
        first = "".join(f"data: {json.dumps(t)}\n\n" for t in tokens) + 'data: {"err'
        await response.write(first.encode())
        await asyncio.sleep(0.05)
        await response.write(
            b'or": {"message": "EngineCore died", "code": 500}}\n\ndata: [DONE]\n\n'
        )
        return response

    app = web.Application()
    app.router.add_post("/v1/completions", broken_stream)
    broken = await rig.engine(app)
    healthy = engine()
    client = await over(rig, healthy)
    urls = [broken, rig.watcher.table.models["m"].replicas[0].url]
    rig.watcher.update(table(2, [u for u in urls if u]))
    body = {"model": "m", "prompt": "count 1", "max_tokens": 5, "stream": True}
    events = await read_stream(await client.post("/v1/completions", json=body))
    assert stream_text(events) == " 2 3 4 5 6"
    assert not any(isinstance(e, dict) and "error" in e for e in events)
    assert healthy.requests[0]["prompt"] == "count 1 2 3"
