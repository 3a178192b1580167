"""bench/proxy_floor.py: the floor proxy must be a proxy (what it is measured as), so its answers,
whole and streamed, are the engine's own, byte for byte, over one kept-alive connection."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from bench.proxy_floor import FloorProxy
from gateway.upstream import UpstreamPool
from tests.fake_engine import FakeEngine, make_app

BODY = {"model": "m", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 6}


@pytest.fixture
async def engine_and_floor() -> AsyncIterator[tuple[str, str]]:
    engine = TestServer(make_app(FakeEngine("m")))
    await engine.start_server()
    engine_url = str(engine.make_url("")).rstrip("/")
    pool = UpstreamPool()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: FloorProxy(pool, engine_url), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield engine_url, f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await pool.close()
        await engine.close()


async def answers(base: str, session: aiohttp.ClientSession) -> tuple[bytes, bytes]:
    path = f"{base}/v1/chat/completions"
    async with session.post(path, json=BODY) as whole:
        assert whole.status == 200
        plain = await whole.read()
    async with session.post(path, json={**BODY, "stream": True}) as streamed:
        assert streamed.status == 200
        assert streamed.headers["Content-Type"] == "text/event-stream"
        return plain, await streamed.read()


async def test_floor_proxy_answers_as_the_engine_does(engine_and_floor: tuple[str, str]) -> None:
    engine, floor = engine_and_floor
    connector = aiohttp.TCPConnector(limit=1)  # one connection: keep-alive works both ways
    async with aiohttp.ClientSession(connector=connector) as session:
        direct = await answers(engine, session)
        through = [await answers(floor, session), await answers(floor, session)]
    for plain, stream in through:
        assert json.loads(plain)["choices"] == json.loads(direct[0])["choices"]
        assert stream.endswith(b"data: [DONE]\n\n")
        assert strip_ids(stream) == strip_ids(direct[1])  # every event, in order


def strip_ids(stream: bytes) -> list[object]:
    """The stream's events without what differs per request (ids, timestamps)."""
    events = []
    for block in stream.split(b"\n\n"):
        data = block.removeprefix(b"data: ")
        if not data or data == b"[DONE]":
            continue
        event = json.loads(data)
        events.append(event.get("choices"))
    return events
