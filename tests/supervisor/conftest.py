"""The loopback hub the cache tests share (one per session: building its repos takes a second),
and an admin API client over a manager with a model cache."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import httpx
import pytest

from supervisor.api import create_app
from supervisor.cache import ModelCache
from supervisor.manager import Manager
from tests.hubrepos import GATED, Hub, build_test_hub


@asynccontextmanager
async def cache_admin(manager: Manager, cache: ModelCache) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the admin API over `manager` using `cache`; both are closed after."""
    manager.cache = cache
    app = create_app(manager, manager.events, cache=cache)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sem") as client:
        yield client
    await manager.shutdown(drain_timeout=1)
    await cache.aclose()


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    root = build_test_hub(tmp_path_factory.mktemp("hub"))
    server = Hub(root, gated=[GATED]).start()
    try:
        yield server
    finally:
        server.stop()
