"""An admin API client over a manager with a model cache (the loopback hub: tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

from supervisor.api import create_app
from supervisor.cache import ModelCache
from supervisor.manager import Manager


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
