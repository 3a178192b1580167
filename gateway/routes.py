"""Keeping the supervisor's route table current: a long-poll loop that survives its absence."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import aiohttp

from contract.routes import RouteTable

log = logging.getLogger("sem.gateway.routes")


class RouteWatcher:
    """Holds the last route table seen; `run()` keeps it fresh until cancelled.

    If the supervisor is away (restarting), the last table stays in use, so ready engines keep
    serving.
    """

    def __init__(
        self, supervisor_url: str, session: aiohttp.ClientSession, poll_timeout: float = 25.0
    ) -> None:
        self._url = supervisor_url.rstrip("/")
        self._session = session
        self._poll_timeout = poll_timeout
        self.table = RouteTable(version=-1)
        self.connected = False
        self._changed = asyncio.Event()  # replaced by a fresh one at every change
        self.waiting = 0  # tasks in wait_change (a request can be seen waiting for a table)
        self._listeners: list[Callable[[], None]] = []

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call `listener()` after every change of the table."""
        self._listeners.append(listener)

    def update(self, table: RouteTable) -> None:
        if table == self.table:
            return
        self.table = table
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        for listener in self._listeners:
            listener()

    async def wait_change(self, timeout: float) -> None:
        """Until the table changes or `timeout` s pass."""
        self.waiting += 1
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._changed.wait()
        finally:
            self.waiting -= 1

    async def run(self) -> None:
        delay = 0.2
        while True:
            after = self.table.version if self.connected else -1
            try:
                async with self._session.get(
                    f"{self._url}/routes",
                    # client=gateway: the supervisor learns which table we route by, and signals an
                    # engine only once we hold a table without it.
                    params={"after": after, "timeout": self._poll_timeout, "client": "gateway"},
                    timeout=aiohttp.ClientTimeout(total=self._poll_timeout + 10),
                ) as response:
                    response.raise_for_status()
                    data = await response.json()
                self.update(RouteTable.from_json(data))
                if not self.connected:
                    log.info("route table v%d from %s", self.table.version, self._url)
                self.connected, delay = True, 0.2
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
                if self.connected:
                    log.warning("supervisor unreachable (%s); keeping the last route table", exc)
                self.connected = False
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
