"""The pooled engine client (gateway.upstream) against a scripted raw HTTP server, on asyncio's
loop and on uvloop (see conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from unittest.mock import Mock

import pytest

from gateway.upstream import EngineDisconnected, UpstreamPool, _Connection
from gateway.usage import completion_tokens, stream_tokens

# One connection's life: reads the requests from `reader`, answers on `writer`.
Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Engine:
    """A raw TCP server running `script` per connection; counts connections."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.url = ""
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Engine:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await self.script(reader, writer)
        writer.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request's body (the client always sends Content-Length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return await reader.readexactly(length)


def answer(body: bytes, status: int = 200) -> bytes:
    return b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)


async def echo_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        writer.write(answer(b"echo " + await read_request(reader)))


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    pool = UpstreamPool(timeout=2)
    yield pool
    await pool.close()


async def post(pool: UpstreamPool, url: str, body: bytes = b"{}") -> tuple[int, bytes]:
    async with pool.post(url, "/v1/completions", body) as exchange:
        return exchange.status, await exchange.read()


async def test_keep_alive_connections_are_reused(pool):
    async with Engine(echo_forever) as engine:
        for n in range(3):
            assert await post(pool, engine.url, b"%d" % n) == (200, b"echo %d" % n)
        assert engine.connections == 1
        assert pool.idle_count(engine.url) == 1


async def test_closing_the_pool_closes_idle_connections_and_those_that_finish_later(pool):
    async def slow_answer(reader, writer):
        while True:
            await read_request(reader)
            await asyncio.sleep(0.1)
            writer.write(answer(b"late"))

    async with Engine(slow_answer) as engine:
        assert await post(pool, engine.url) == (200, b"late")
        busy = asyncio.ensure_future(post(pool, engine.url))
        await asyncio.sleep(0.02)
        await pool.close()  # the busy one is closed too: its caller gets a disconnect
        with pytest.raises(EngineDisconnected):
            await busy
        assert pool.idle_count(engine.url) == 0


async def test_a_connection_the_engine_closed_is_replaced_transparently(pool):
    async def one_answer_then_close_on_the_next(reader, writer):
        writer.write(answer(await read_request(reader)))
        await read_request(reader)  # the next request on this connection: no answer, closed

    async with Engine(one_answer_then_close_on_the_next) as engine:
        assert await post(pool, engine.url, b"a") == (200, b"a")
        assert await post(pool, engine.url, b"b") == (200, b"b")  # retried on a new connection
        assert engine.connections == 2


async def test_an_idle_connection_closed_by_the_engine_is_not_used(pool):
    async def answer_and_close(reader, writer):
        writer.write(answer(await read_request(reader)))  # keep-alive, but closes anyway

    async with Engine(answer_and_close) as engine:
        assert await post(pool, engine.url, b"a") == (200, b"a")
        await asyncio.sleep(0.05)  # the close reaches the pool
        assert pool.idle_count(engine.url) == 0
        assert await post(pool, engine.url, b"b") == (200, b"b")


async def test_connections_the_engine_closed_do_not_count_against_the_idle_limit(pool):
    pool.max_idle = 2
    dead = [_Connection(pool, "127.0.0.1:9") for _ in range(2)]
    for conn in dead:
        pool.put_idle(conn)
        conn.closed = True  # the engine closed them while idle
    live = _Connection(pool, "127.0.0.1:9")
    live.connection_made(Mock(is_closing=Mock(return_value=False)))
    pool.put_idle(live)
    assert pool.idle_count("http://127.0.0.1:9") == 1
    assert pool.idle("127.0.0.1:9") is live


async def test_a_fresh_connection_that_fails_is_not_retried(pool):
    async def close_at_once(reader, writer):
        await read_request(reader)

    async with Engine(close_at_once) as engine:
        with pytest.raises(EngineDisconnected):
            await post(pool, engine.url)
        assert engine.connections == 1


async def test_chunked_and_until_close_bodies(pool):
    async def chunked_then_until_close(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        await read_request(reader)
        writer.write(b"HTTP/1.1 201 OK\r\nConnection: close\r\n\r\nuntil the end")
        await writer.drain()

    async with Engine(chunked_then_until_close) as engine:
        assert await post(pool, engine.url) == (200, b"hello world")
        assert await post(pool, engine.url) == (201, b"until the end")
        assert engine.connections == 1


async def test_large_bodies_whole_or_in_pieces(pool):
    big = bytes(range(256)) * 8192  # 2 MiB: more than the pool reads ahead of a slow caller

    async def send_big(reader, writer):
        while True:
            await read_request(reader)
            writer.write(answer(big))
            await writer.drain()

    async with Engine(send_big) as engine:
        assert await post(pool, engine.url) == (200, big)
        async with pool.post(engine.url, "/v1/completions", b"{}") as exchange:
            pieces = []
            async for piece in exchange:
                await asyncio.sleep(0.001)  # a slow reader
                pieces.append(piece)
        assert b"".join(pieces) == big
        assert engine.connections == 1


async def test_error_statuses_come_with_their_body(pool):
    async def refuse(reader, writer):
        await read_request(reader)
        writer.write(answer(b'{"error": {"message": "no"}}', status=400))

    async with Engine(refuse) as engine:
        assert await post(pool, engine.url) == (400, b'{"error": {"message": "no"}}')


async def test_an_engine_that_does_not_answer_times_out(pool):
    async def silent(reader, writer):
        await read_request(reader)
        await asyncio.sleep(10)

    pool.timeout = 0.2
    async with Engine(silent) as engine:
        with pytest.raises(TimeoutError):
            await post(pool, engine.url)


async def test_an_engine_that_is_not_there_is_a_disconnect(pool):
    with pytest.raises(EngineDisconnected, match="cannot connect"):
        await post(pool, "http://127.0.0.1:1")


async def test_stream_pieces_arrive_as_sent_and_leaving_early_closes_the_connection(pool):
    closed = asyncio.Event()

    async def trickle(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for n in range(100):
            if reader.at_eof():  # the client closed the connection
                closed.set()
                return
            writer.write(b"7\r\ndata: %d\r\n" % (n % 10))
            await writer.drain()
            await asyncio.sleep(0.02)

    async with Engine(trickle) as engine:
        async with pool.post(engine.url, "/v1/completions", b"{}") as exchange:
            pieces = []
            async for piece in exchange:
                pieces.append(piece)
                if len(pieces) == 3:
                    break
        assert pieces == [b"data: 0", b"data: 1", b"data: 2"]  # one by one, not buffered
        await asyncio.wait_for(closed.wait(), 2)  # the engine saw the connection close
        assert pool.idle_count(engine.url) == 0


def test_stream_tokens_count_events_and_prefer_usage():
    events = [b'data: {"a": 1}\n\ndata: {"b": "x\\n"}\n\n', b"data: [DONE]\n\n"]
    assert stream_tokens(events) == 2
    usage = b'data: {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 7}}\n\n'
    assert stream_tokens([*events[:1], usage, b"data: [DONE]\n\n"]) == 7
    assert stream_tokens([]) == 0
    assert completion_tokens(b'{"text": "\\"usage\\": {\\"completion_tokens\\": 9}"}') is None
