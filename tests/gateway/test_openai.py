"""OpenAI routes and streaming through the gateway, with the official OpenAI SDK as the client."""

from __future__ import annotations

import asyncio
import contextlib
import json

import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from contract.routes import RouteTable
from gateway.state import ADMISSION
from tests.conftest import wait_until
from tests.fake_engine import FakeEngine
from tests.gateway.conftest import Rig, ready_model

TOKEN_DELAY = 0.1


@pytest.fixture
def fake() -> FakeEngine:
    return FakeEngine("m", token_delay=TOKEN_DELAY)


@pytest.fixture
async def gateway(rig: Rig, fake: FakeEngine) -> TestClient:
    return await rig.gateway(RouteTable(1, {"m": ready_model("m", await rig.engine(fake))}))


async def test_completion_and_chat_through_the_sdk(gateway, sdk):
    api = sdk(gateway)
    completion = await api.completions.create(model="m", prompt="a b", max_tokens=3)
    assert completion.choices[0].text == " b a b"
    assert completion.usage is not None and completion.usage.completion_tokens == 3
    chat = await api.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x y"}], max_tokens=2
    )
    assert chat.choices[0].message.content == " y x"


def completion_chunk(text: str) -> bytes:
    chunk = {"id": "cmpl-held", "object": "text_completion", "created": 1, "model": "m",
             "choices": [{"index": 0, "text": text, "finish_reason": None}]}  # fmt: skip
    return f"data: {json.dumps(chunk)}\n\n".encode()


def two_writes(first: bytes, gate: asyncio.Event, then: bytes) -> web.Application:
    """A stand-in engine whose stream is `first`, then `then` once `gate` is set."""

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(first)
        await gate.wait()
        await response.write(then)
        return response

    engine = web.Application()
    engine.router.add_post("/v1/completions", stream)
    return engine


async def over(rig: Rig, engine: web.Application) -> TestClient:
    """A gateway whose model m is served by `engine`."""
    return await rig.gateway(RouteTable(1, {"m": ready_model("m", await rig.engine(engine))}))


async def test_stream_chunks_arrive_as_the_engine_sends_them(rig, sdk):
    """Streamed, not buffered: the engine sends its last chunk only once the client has the
    first, so a gateway that held chunks back would never finish."""
    client_has_first = asyncio.Event()

    engine = two_writes(completion_chunk(" first"), client_has_first,
                        completion_chunk(" last") + b"data: [DONE]\n\n")  # fmt: skip
    gateway = await over(rig, engine)
    stream = await sdk(gateway).completions.create(model="m", prompt="a", max_tokens=2, stream=True)
    texts = []
    async with asyncio.timeout(5):  # buffered, the first chunk would wait for the last: forever
        async for chunk in stream:
            texts.append(chunk.choices[0].text)
            client_has_first.set()
    assert texts == [" first", " last"]


async def test_what_one_engine_read_brings_reaches_the_client_in_one_write(rig):
    """Three events the engine sent at once go out as one HTTP chunk (one write, not three),
    whole and in order; the next read, its own chunk."""
    second_read = asyncio.Event()
    together = b"".join(completion_chunk(t) for t in (" a", " b", " c"))

    engine = two_writes(together, second_read, completion_chunk(" d") + b"data: [DONE]\n\n")
    gateway = await over(rig, engine)
    body = {"model": "m", "prompt": "a", "max_tokens": 4, "stream": True}
    response = await gateway.post("/v1/completions", json=body)
    http_chunks, piece = [], b""
    async with asyncio.timeout(5):
        async for data, end_of_chunk in response.content.iter_chunks():
            piece += data
            if end_of_chunk:
                http_chunks.append(piece)
                piece = b""
                second_read.set()
    assert http_chunks[0] == together
    assert b"".join(http_chunks) == together + completion_chunk(" d") + b"data: [DONE]\n\n"


async def test_a_client_that_reads_slowly_gets_every_byte_in_order(rig):
    """Past 64 KiB unsent to a client, the relay stops writing straight to its socket and
    waits for it to drain (reading from the engine pauses past 256 KiB): nothing is lost,
    duplicated or reordered across the switch, and back."""
    count = 4000
    events = [completion_chunk(f" {i:05d}" + "x" * 2000) for i in range(count)]

    async def fast(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in events:
            await response.write(event)
        await response.write(b"data: [DONE]\n\n")
        return response

    engine = web.Application()
    engine.router.add_post("/v1/completions", fast)
    gateway = await over(rig, engine)
    body = {"model": "m", "prompt": "a", "max_tokens": count, "stream": True}
    response = await gateway.post("/v1/completions", json=body)
    received = await response.content.readexactly(1000)
    await asyncio.sleep(0.5)  # the engine has sent everything; the client read 1 KB of ~8 MB
    received += await response.content.read()
    assert received == b"".join(events) + b"data: [DONE]\n\n"


async def test_chat_stream_with_usage(gateway, sdk):
    api = sdk(gateway)
    stream = await api.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "p q"}], max_tokens=3, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    content, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            content += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert content == " q p q"
    assert usage is not None and usage.completion_tokens == 3


async def test_unknown_model_is_an_openai_404(gateway, sdk):
    with pytest.raises(openai.NotFoundError) as err:
        await sdk(gateway).completions.create(model="nope", prompt="x", max_tokens=1)
    assert "not served here" in str(err.value)


async def test_generate_stream_sends_text_deltas_then_done(gateway):
    response = await gateway.post(
        "/generate", json={"model": "m", "prompt": "a b", "max_tokens": 3, "stream": True}
    )
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    raw = (await response.read()).decode()
    events = [line[6:] for line in raw.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    deltas = [json.loads(e) for e in events[:-1]]
    assert "".join(d["text"] for d in deltas) == " b a b"
    assert deltas[-1]["finish_reason"] == "length"
    assert deltas[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    assert not any("usage" in d for d in deltas[:-1])  # the count comes once, at the end


async def test_models_list_through_the_sdk(gateway, sdk):
    models = await sdk(gateway).models.list()
    assert [m.id for m in models.data] == ["m"]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_client_that_disconnects_cancels_its_engine_request(gateway, fake, stream):
    body = {"model": "m", "prompt": "a", "max_tokens": 100, "stream": stream}
    if stream:
        response = await gateway.post("/v1/completions", json=body)
        await response.content.readany()  # the first token arrived ...
        response.close()  # ... and the client goes away (10 s of tokens left)
    else:
        request = asyncio.ensure_future(gateway.post("/v1/completions", json=body))
        await wait_until(lambda: fake.running == 1, timeout=5, what="engine busy")
        request.cancel()  # the client goes away mid-generation (10 s of tokens left)
        with contextlib.suppress(asyncio.CancelledError):
            await request
    await wait_until(lambda: fake.running == 0, timeout=2, what="engine request cancelled")
    await wait_until(lambda: gateway.app[ADMISSION].outstanding.get("m-0") == 0, timeout=2)


async def test_metrics_count_requests_tokens_queue_and_time_to_first_token(gateway, sdk):
    api = sdk(gateway)
    await api.completions.create(model="m", prompt="a b", max_tokens=2)
    async for _ in await api.completions.create(model="m", prompt="a", max_tokens=3, stream=True):
        pass
    with pytest.raises(openai.NotFoundError):
        await api.completions.create(model="nope", prompt="x", max_tokens=1)
    response = await gateway.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    text = await response.text()
    ok = 'sem_gateway_requests_total{model="m",outcome="ok",route="/v1/completions"} 2.0'
    assert ok in text
    missing = 'model="(unknown)",outcome="model_not_found",route="/v1/completions"} 1.0'
    assert missing in text
    assert 'sem_gateway_generated_tokens_total{model="m"} 5.0' in text
    assert 'sem_gateway_time_to_first_token_seconds_count{model="m"} 1.0' in text
    assert 'sem_gateway_queue_seconds_count{model="m"} 2.0' in text
    assert 'sem_gateway_request_seconds_count{model="m"} 2.0' in text
    assert 'sem_gateway_queue_depth{model="m"} 0.0' in text
    assert 'sem_gateway_in_flight{model="m"} 0.0' in text
    assert 'sem_gateway_ready_replicas{model="m"} 1.0' in text
