"""What does a proxy written in Python cost at least? The floor under sem's gateway.

A raw asyncio protocol parsed by httptools in front (bench/servers.py's `RawProtocol` way: no
request or response objects), sem's own engine client behind (gateway.upstream: keep-alive
pool, httptools, streams piped in the connection's callback), and nothing between: the body is
parsed as JSON (a proxy must read `model`), the answer or each engine read goes to the client in
one write. No admission, keys, validation, metrics, limits or resume: what remains per request
once the server is as light as Python allows and sem decides nothing. bench/gateway_overhead.py
runs it in the gateway's place with `--proxy floor`, so the two compare in one harness.

    .venv/bin/python bench/proxy_floor.py PORT ENGINE_URL
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import uvloop

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a file: sem's packages from this checkout
    sys.path.insert(0, str(REPO))

from bench.servers import RawProtocol  # noqa: E402
from gateway.upstream import UpstreamPool  # noqa: E402

JSON_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


class FloorProxy(RawProtocol):
    """bench/servers.py's raw protocol, its answer relayed from the engine: one client
    connection, requests one at a time (no pipelining), keep-alive."""

    def __init__(self, pool: UpstreamPool, engine: str) -> None:
        super().__init__()
        self.pool, self.engine = pool, engine

    def answer(self, path: str, body: bytes) -> None:
        asyncio.get_running_loop().create_task(self.relay(path, body))

    async def relay(self, path: str, raw: bytes) -> None:
        transport = self.transport
        assert transport is not None
        stream = json.loads(raw).get("stream") is True
        async with self.pool.post(self.engine, path, raw) as upstream:
            if not stream:
                answer = await upstream.read()
                transport.write(JSON_HEAD % len(answer) + answer)
                return
            transport.write(SSE_HEAD)

            def take(chunk: bytes) -> bytes:
                transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                return b""

            upstream.pipe(take)
            async for _ in upstream:  # until the engine's answer ends
                pass
            transport.write(b"0\r\n\r\n")


async def serve(port: int, engine: str) -> None:
    pool = UpstreamPool()
    loop = asyncio.get_running_loop()
    await loop.create_server(lambda: FloorProxy(pool, engine), "127.0.0.1", port, backlog=4096)
    await asyncio.Event().wait()  # until terminated


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), sys.argv[2]))
