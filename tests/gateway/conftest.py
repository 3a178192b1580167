"""The gateway's test rig (stand-in engines and a gateway over them), and the loops: the upstream
client's tests run on asyncio's loop and on uvloop (which the gateway runs on)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp
import openai
import pytest
import uvloop
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from contract import defaults
from contract.routes import ModelRoute, ReplicaRoute, RouteTable
from gateway.admission import Admission
from gateway.app import create_app
from gateway.retry import RetryBudget
from gateway.routes import RouteWatcher
from gateway.state import DOOR
from tests.fake_engine import FakeEngine, make_app

LOOPS: Mapping[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    if item.nodeid.startswith("tests/gateway/test_upstream.py"):
        return LOOPS
    return {"asyncio": asyncio.new_event_loop}


class DoorServer(TestServer):
    """The app served the way the daemon serves it: through its front door (gateway.frontdoor),
    whose own server takes the hot routes (gateway.fastpath); a plain TestServer would give
    every request to aiohttp's server."""

    _listener: asyncio.Server | None = None

    async def start_server(
        self, loop: asyncio.AbstractEventLoop | None = None, **kwargs: Any
    ) -> None:
        if self.runner:
            return
        self.runner = await self._make_runner(handler_cancellation=True, **kwargs)
        await self.runner.setup()
        self._listener = await self.app[DOOR].listen(self.runner, "127.0.0.1", 0)
        self.port = self._listener.sockets[0].getsockname()[1]
        self.scheme = "http"
        self._root = URL(f"http://127.0.0.1:{self.port}")

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        await super().close()


class Rig:
    """Stand-in engines and a gateway over them (app, route watcher, test client), in-process;
    everything it started is closed at the end of the test."""

    def __init__(self, watcher: RouteWatcher) -> None:
        self.watcher = watcher
        self._servers: list[TestServer] = []
        self._clients: list[TestClient] = []

    async def engine(self, engine: FakeEngine | web.Application) -> str:
        """Serve a stand-in engine; its base URL."""
        app = make_app(engine) if isinstance(engine, FakeEngine) else engine
        server = TestServer(app, handler_cancellation=True)
        await server.start_server()
        self._servers.append(server)
        return str(server.make_url("")).rstrip("/")

    async def gateway(
        self,
        routes: RouteTable,
        retry: RetryBudget | None = None,
        queue_timeout: float = defaults.QUEUE_TIMEOUT,
        require_keys: bool = False,
    ) -> TestClient:
        """A gateway serving `routes` (as if the supervisor had published them)."""
        self.watcher.update(routes)
        admission = Admission(self.watcher, queue_timeout=queue_timeout)
        app = create_app(self.watcher, admission, retry=retry, require_keys=require_keys)
        client = TestClient(DoorServer(app))
        await client.start_server()
        self._clients.append(client)
        return client

    async def close(self) -> None:
        for client in self._clients:
            await client.close()
        for server in self._servers:
            await server.close()


SdkFactory = Callable[..., openai.AsyncOpenAI]


@pytest.fixture
async def sdk() -> AsyncIterator[SdkFactory]:
    """`sdk(gateway, key="unused", **options)`: an OpenAI SDK client of a test gateway, closed
    at the end of the test. A client left to the garbage collector closes its sockets later,
    from a test whose loop has ended, by file descriptor numbers that newer connections may
    have been given meanwhile: a request of a later test then waits forever."""
    made: list[openai.AsyncOpenAI] = []

    def make(client: TestClient, key: str = "unused", **options: object) -> openai.AsyncOpenAI:
        api = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=key, **options)  # type: ignore[arg-type]
        made.append(api)
        return api

    yield make
    for api in made:
        await api.close()


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    async with aiohttp.ClientSession() as session:
        rig = Rig(RouteWatcher("http://127.0.0.1:1", session))  # no supervisor: tests set routes
        try:
            yield rig
        finally:
            await rig.close()


def ready_model(name: str, *urls: str, seqs: int = 8) -> ModelRoute:
    """A ready model served by replicas at `urls` (ids `name-0`, `name-1`, ...)."""
    replicas = tuple(ReplicaRoute(f"{name}-{i}", "ready", url, seqs) for i, url in enumerate(urls))
    return ModelRoute(name, "ready", "", replicas)
