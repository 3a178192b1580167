"""The front door's own server for the hot routes (gateway.fastpath): plain requests are answered
by it, anything else by aiohttp's server on the same connection, and a client sees one HTTP/1.1
server either way: answers whole and in order, kept alive, streams intact. Which server answered
shows in the `Server` header, which only aiohttp's sends."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httptools
import pytest
from aiohttp import web

from contract.routes import RouteTable
from gateway.admission import Admission
from gateway.app import create_app
from gateway.limits import Limits
from gateway.proxy import http_chunk
from gateway.state import DOOR
from tests.fake_engine import FakeEngine
from tests.gateway.conftest import Rig, ready_model
from tests.gateway.door_rig import (
    closed_within,
    completion,
    post_head,
    raw_connection,
    served,
    wait_for,
)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def by_aiohttp(self) -> bool:
        return "aiohttp" in self.headers.get("server", "")

    def json(self) -> dict[str, object]:
        data = json.loads(self.body)
        assert isinstance(data, dict)
        return data

    def text(self) -> str:
        """A completion's text: a whole answer's, or a stream's events joined."""
        if self.headers.get("content-type", "").startswith("text/event-stream"):
            events = [e.removeprefix(b"data: ") for e in self.body.split(b"\n\n") if e]
            assert events[-1] == b"[DONE]", events[-3:]
            chunks = [json.loads(e) for e in events[:-1]]
            return "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        return str(self.json()["choices"][0]["text"])  # type: ignore[index]


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    """One HTTP/1.1 response, its body whole (by length or chunks)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines if ln)}
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    else:
        assert headers.get("transfer-encoding") == "chunked", headers
        pieces = []
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            pieces.append(await reader.readexactly(size))
            await reader.readexactly(2)
        await reader.readexactly(2)
        body = b"".join(pieces)
    return Answer(int(status_line.split()[1]), headers, body)


@asynccontextmanager
async def connected(rig: Rig) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A gateway over one stand-in engine, served through its front door, and a raw
    connection to it (closed at the end)."""
    url = await rig.engine(FakeEngine("m"))
    async with served(rig, RouteTable(1, {"m": ready_model("m", url)}), Limits()) as gw:
        reader, writer = await raw_connection(gw.port)
        try:
            yield reader, writer
        finally:
            writer.close()


async def test_plain_requests_are_answered_by_the_front_door_the_rest_by_aiohttp(
    rig: Rig,
) -> None:
    async with connected(rig) as (reader, writer):
        for stream in (False, True, False):
            writer.write(post_head("/v1/completions", completion(4, stream=stream)))
            answer = await read_answer(reader)
            assert answer.status == 200 and not answer.by_aiohttp
            assert answer.text() == " two one two one"
        writer.write(b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n")  # not a hot route
        health = await read_answer(reader)
        assert health.status == 200 and health.by_aiohttp
        writer.write(post_head("/v1/completions", completion(3)))  # aiohttp's from now on
        later = await read_answer(reader)
        assert later.status == 200 and later.by_aiohttp and later.text() == " two one two"


async def test_pipelined_requests_are_answered_in_order(rig: Rig) -> None:
    async with connected(rig) as (reader, writer):
        writer.write(b"".join(post_head("/v1/completions", completion(n)) for n in (1, 2, 3)))
        texts = [(await read_answer(reader)).text() for _ in range(3)]
        assert texts == [" two", " two one", " two one two"]


async def test_bodies_in_pieces_chunked_or_expecting_continue_are_answered(rig: Rig) -> None:
    url = await rig.engine(FakeEngine("m"))
    routes = RouteTable(1, {"m": ready_model("m", url)})
    body = completion(2)
    async with served(rig, routes, Limits()) as gw:
        reader, writer = await raw_connection(gw.port)  # the body after its head, apart
        writer.write(post_head("/v1/completions", body)[: -len(body) // 2])
        await asyncio.sleep(0.05)  # let the gateway read the first part alone
        writer.write(body[-len(body) // 2 :])
        assert (await read_answer(reader)).text() == " two one"
        writer.close()

        reader, writer = await raw_connection(gw.port)  # chunked
        chunked = b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)
        writer.write(post_head("/v1/completions", None, "Transfer-Encoding: chunked\r\n"))
        writer.write(chunked)
        assert (await read_answer(reader)).text() == " two one"
        writer.close()

        reader, writer = await raw_connection(gw.port)  # Expect: 100-continue, as curl sends
        head = post_head("/v1/completions", None, f"Content-Length: {len(body)}\r\n"
                         "Expect: 100-continue\r\n")  # fmt: skip
        writer.write(head)
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100")
        writer.write(body)
        assert (await read_answer(reader)).text() == " two one"
        writer.close()


async def test_errors_on_the_fast_path_have_the_gateway_shape(rig: Rig) -> None:
    async with connected(rig) as (reader, writer):
        for body, status in ((b"{not json", 400), (completion(2, model="nope"), 404)):
            writer.write(post_head("/v1/completions", body))
            answer = await read_answer(reader)
            assert answer.status == status and not answer.by_aiohttp
            error = answer.json()["error"]
            assert isinstance(error, dict) and error["message"]
        writer.write(post_head("/v1/completions", completion(1)))  # the connection goes on
        assert (await read_answer(reader)).text() == " two"


async def test_a_stopping_gateway_lets_a_fast_path_stream_finish(rig: Rig) -> None:
    engine = FakeEngine("m", token_delay=0.05)
    rig.watcher.update(RouteTable(1, {"m": ready_model("m", await rig.engine(engine))}))
    app = create_app(rig.watcher, Admission(rig.watcher))
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=10)
    await runner.setup()
    listener = await app[DOOR].listen(runner, "127.0.0.1", 0)
    reader, writer = await raw_connection(listener.sockets[0].getsockname()[1])
    writer.write(post_head("/v1/completions", completion(20, stream=True)))
    await wait_for(lambda: engine.running == 1, 5)
    listener.close()  # the gateway stops, as the daemon does, with the stream in flight
    stopping = asyncio.create_task(runner.cleanup())
    answer = await read_answer(reader)
    assert answer.status == 200 and answer.text() == " two one" * 10  # all 20 tokens
    await asyncio.wait_for(stopping, 10)
    assert await closed_within(reader, 3) < 3
    writer.close()


async def test_stopping_drains_both_servers_within_one_shutdown_timeout(rig: Rig) -> None:
    engine = FakeEngine("m", token_delay=0.2)  # 100 tokens: 20 s, past the shutdown timeout
    rig.watcher.update(RouteTable(1, {"m": ready_model("m", await rig.engine(engine))}))
    app = create_app(rig.watcher, Admission(rig.watcher))
    timeout = 1.5
    app[DOOR].shutdown_timeout = timeout  # as the daemon sets both from --shutdown-timeout
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=timeout)
    await runner.setup()
    listener = await app[DOOR].listen(runner, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    fast, slow = await raw_connection(port), await raw_connection(port)
    body = completion(100, stream=True)
    fast[1].write(post_head("/v1/completions", body))
    slow[1].write(post_head("/v1/completions", body, "Connection: close\r\n"))  # aiohttp's
    await wait_for(lambda: engine.running == 2, 5)
    listener.close()
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(runner.cleanup(), 3 * timeout)
    took = asyncio.get_running_loop().time() - started
    assert timeout <= took < 1.6 * timeout, took  # one timeout for both, not one after the other
    await wait_for(lambda: engine.running == 0, 5)  # both streams cancelled: vLLM aborts them
    for reader, writer in (fast, slow):
        await closed_within(reader, 3)
        writer.close()


async def test_a_client_that_leaves_cancels_its_request_and_the_engine_aborts(rig: Rig) -> None:
    engine = FakeEngine("m", token_delay=0.05)
    url = await rig.engine(engine)
    routes = RouteTable(1, {"m": ready_model("m", url)})
    async with served(rig, routes, Limits()) as gw:
        for stream in (True, False):  # mid-stream, and while a whole answer is awaited
            reader, writer = await raw_connection(gw.port)
            writer.write(post_head("/v1/completions", completion(200, stream=stream)))
            await wait_for(lambda: engine.running == 1, 5)
            writer.close()
            await wait_for(lambda: engine.running == 0, 5)
        assert engine.aborted == 2
        await wait_for(lambda: not gw.door.serving, 2)
        reader, writer = await raw_connection(gw.port)  # the slots came back
        writer.write(post_head("/v1/completions", completion(2)))
        assert (await read_answer(reader)).text() == " two one"
        writer.close()


@pytest.mark.parametrize("size", [1, 255, 4095, 4096, 70_000])
def test_a_streamed_piece_is_framed_as_one_http_chunk_of_its_size(size: int) -> None:
    """The heads are made once for sizes under 4 KiB and formatted past that: both must frame
    the piece as an HTTP/1.1 parser reads it."""
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    got: list[bytes] = []
    parser = httptools.HttpResponseParser(type("Sink", (), {"on_body": got.append})())
    parser.feed_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    parser.feed_data(http_chunk(data) + b"0\r\n\r\n")
    assert b"".join(got) == data
