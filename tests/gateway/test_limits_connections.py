"""The front door's connection limits: clients that do not read, trickle headers or bodies, idle
on kept-alive connections, or open too many connections cannot hold a slot or a descriptor."""

from __future__ import annotations

import asyncio
import time

import pytest

from contract.routes import RouteTable
from gateway.frontdoor import Closed
from gateway.limits import Limits
from tests.fake_engine import FakeEngine
from tests.gateway.conftest import Rig, ready_model
from tests.gateway.door_rig import (
    closed_within,
    completion,
    post,
    post_head,
    raw_connection,
    served,
    wait_for,
)


async def test_a_client_that_stops_reading_loses_its_stream_and_its_slot(rig: Rig) -> None:
    engine = FakeEngine("m", token_delay=0)
    url = await rig.engine(engine)
    routes = RouteTable(1, {"m": ready_model("m", url, seqs=2)})
    limits = Limits(client_write_timeout=1.0)
    async with served(rig, routes, limits) as gw:
        clients = []  # the writers too: a writer collected closes its connection
        for _ in range(2):  # both slots, taken by clients that never read their streams
            reader, writer = await raw_connection(gw.port, rcvbuf=4096)
            big = completion(20_000, stream=True, prompt="x" * 4000)  # 4 kB events
            writer.write(post_head("/v1/completions", big))
            clients.append((reader, writer))
        await wait_for(lambda: engine.running == 2, 5)
        start = time.monotonic()
        status, answer = await post(f"{gw.url}/v1/completions", completion(4))
        assert status == 200, answer
        assert answer["choices"][0]["text"] == " two one two one"
        waited = time.monotonic() - start
        assert waited < 20, f"the third request waited {waited:.1f}s"  # without: 503 at 30 s
        assert gw.door.closed[Closed.NOT_READING] == 2
        await wait_for(lambda: engine.aborted == 2, 10)  # the engine's generations were cancelled
        for reader, _ in clients:
            await closed_within(reader, 5)


async def test_stalled_headers_are_closed_and_do_not_stop_real_requests(rig: Rig) -> None:
    url = await rig.engine(FakeEngine("m"))
    routes = RouteTable(1, {"m": ready_model("m", url)})
    limits = Limits(header_timeout=0.5)
    async with served(rig, routes, limits) as gw:
        stalled = []
        for _ in range(20):
            reader, writer = await raw_connection(gw.port)
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\n")  # and no more
            stalled.append((reader, writer))
        status, _ = await post(f"{gw.url}/v1/completions", completion(2))
        assert status == 200  # served while 20 connections stall
        closed = await asyncio.gather(*(closed_within(r, 3) for r, _ in stalled))
        assert max(closed) < 0.5 + 1.0
        assert gw.door.closed[Closed.HEADERS] == 20
        await wait_for(lambda: gw.door.open == 0, 2)


async def test_connections_over_the_cap_are_closed_at_accept_until_stalled_ones_go(
    rig: Rig,
) -> None:
    url = await rig.engine(FakeEngine("m"))
    routes = RouteTable(1, {"m": ready_model("m", url)})
    limits = Limits(header_timeout=0.5, max_connections=8)
    async with served(rig, routes, limits) as gw:
        stalled = []
        for _ in range(8):
            reader, writer = await raw_connection(gw.port)
            writer.write(b"POST /v1/completions HTTP/1.1\r\n")
            stalled.append((reader, writer))
        await wait_for(lambda: gw.door.open == 8, 2)
        reader, writer = await raw_connection(gw.port)  # the 9th: closed at once
        writer.write(post_head("/v1/completions", completion(2)))
        assert await closed_within(reader, 1) < 1
        assert gw.door.closed[Closed.OVER_CAP] == 1
        await asyncio.gather(*(closed_within(r, 3) for r, _ in stalled))
        status, _ = await post(f"{gw.url}/v1/completions", completion(2))
        assert status == 200


async def test_a_trickled_body_is_a_408_within_the_body_timeout(rig: Rig) -> None:
    url = await rig.engine(FakeEngine("m"))
    routes = RouteTable(1, {"m": ready_model("m", url)})
    async with served(rig, routes, Limits(body_timeout=0.5)) as gw:
        reader, writer = await raw_connection(gw.port)
        body = completion(2)
        writer.write(post_head("/v1/completions", body)[: -len(body) + 10])  # 10 bytes of body
        start = time.monotonic()
        async with asyncio.timeout(3):
            head = await reader.readuntil(b"\r\n\r\n")
            answer = await reader.read(4096)
        assert time.monotonic() - start < 0.5 + 1.0
        assert head.startswith(b"HTTP/1.1 408")
        assert b'"type": "request_timeout"' in answer
        writer.close()  # or the gateway lingers, reading the rest of the body, for 10 s


async def trickle_head(writer: asyncio.StreamWriter) -> None:
    """A request head, a byte every 50 ms, never complete."""
    for byte in b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nX-Slow: " + b"x" * 1000:
        writer.write(bytes([byte]))
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("trickle", [False, True], ids=["idle", "trickling-next-head"])
async def test_an_idle_kept_alive_connection_is_closed_after_the_keepalive_timeout(
    rig: Rig, trickle: bool
) -> None:
    """Idle, or sending its next request's head a byte at a time: partial headers do not
    hold a kept-alive connection past the keep-alive timeout."""
    url = await rig.engine(FakeEngine("m"))
    routes = RouteTable(1, {"m": ready_model("m", url)})
    async with served(rig, routes, Limits(keepalive_timeout=0.5)) as gw:
        reader, writer = await raw_connection(gw.port)
        writer.write(post_head("/v1/completions", completion(2)))
        async with asyncio.timeout(3):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        trickling = asyncio.create_task(trickle_head(writer)) if trickle else None
        assert await closed_within(reader, 3) < 0.5 + 1.5
        if trickling is not None:
            trickling.cancel()
        await wait_for(lambda: gw.door.open == 0, 2)
