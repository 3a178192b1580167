"""A gateway served the way the daemon serves it (through its front door, on a loopback port),
and raw sockets to misbehave against it: what the front-door tests need that a test client
(which bypasses the door) cannot give."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from contract.routes import RouteTable
from gateway.admission import Admission
from gateway.app import create_app
from gateway.frontdoor import FrontDoor
from gateway.limits import Limits
from gateway.state import DOOR
from tests.gateway.conftest import Rig


@dataclass
class Served:
    """A gateway on 127.0.0.1:`port`, and its front door."""

    port: int
    door: FrontDoor

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@asynccontextmanager
async def served(
    rig: Rig, routes: RouteTable, limits: Limits, queue_timeout: float = 30.0
) -> AsyncIterator[Served]:
    rig.watcher.update(routes)
    app = create_app(
        rig.watcher, Admission(rig.watcher, queue_timeout=queue_timeout), limits=limits
    )
    runner = web.AppRunner(
        app, handler_cancellation=True, keepalive_timeout=limits.keepalive_timeout
    )
    await runner.setup()
    listener = await app[DOOR].listen(runner, "127.0.0.1", 0)
    try:
        yield Served(listener.sockets[0].getsockname()[1], app[DOOR])
    finally:
        listener.close()
        await runner.cleanup()


async def raw_connection(
    port: int, rcvbuf: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A plain TCP connection; `rcvbuf`: a small receive buffer (a client that reads little)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock)


def post_head(path: str, body: bytes | None, extra: str = "") -> bytes:
    """An HTTP/1.1 POST's head (and body, when given) as a client writes it."""
    length = f"Content-Length: {len(body)}\r\n" if body is not None else ""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n{length}{extra}\r\n"
    )
    return head.encode() + (body or b"")


async def post(url: str, body: bytes) -> tuple[int, Any]:
    """POST `body` on a connection of its own: the status and the parsed JSON answer."""
    async with aiohttp.ClientSession() as session, session.post(url, data=body) as answer:
        return answer.status, await answer.json()


def completion(max_tokens: int, stream: bool = False, **more: object) -> bytes:
    return json.dumps(
        {"model": "m", "prompt": "one two", "max_tokens": max_tokens, "stream": stream} | more
    ).encode()


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> float:
    """Seconds until the server closed the connection (reading and dropping what it sends);
    fails the test past `seconds`."""
    start = time.monotonic()
    async with asyncio.timeout(seconds):
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:  # reset, or a write of ours met the closed socket
            pass
    return time.monotonic() - start


async def wait_for(condition: Callable[[], bool], seconds: float) -> None:
    """Until `condition()` holds (checked every 10 ms); fails the test past `seconds`."""
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0.01)
