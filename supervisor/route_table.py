"""Publishing the route table: built from the models (pure), versioned, long-polled.

The gateway routes by this table alone. `build_routes` makes it from the models as they are;
`RoutePublisher` keeps the latest, bumps its version at every change and wakes the long-polls
(`GET /routes?after=V&timeout=S`).

The gateway's long-polls (`client=gateway`) also say which table it routes by: it asks for a
version after the one it holds. So before an engine is signalled, the supervisor can wait until
the gateway holds a table without it (`gateway_holds`), and no request is sent to it afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping

from contract.routes import ModelRoute, ReplicaRoute, RouteTable
from supervisor.models import ModelEntry
from supervisor.states import ReplicaState


def replica_route_state(entry: ModelEntry, state: ReplicaState) -> ReplicaState:
    """What the gateway is told of a replica: a removed model's replicas take no new requests
    even while they are still ready."""
    return ReplicaState.DRAINING if entry.leaving else state


def build_routes(models: Mapping[str, ModelEntry], version: int) -> RouteTable:
    """The route table of these models, at `version` (pure)."""
    return RouteTable(
        version=version,
        models={
            name: ModelRoute(
                name=name,
                state=entry.state.value,
                reason=entry.reason,
                replicas=tuple(
                    ReplicaRoute(
                        id=r.id,
                        state=replica_route_state(entry, r.state).value,
                        url=r.url,
                        max_num_seqs=r.max_num_seqs,
                        api_key=r.plan.api_key if r.plan else None,
                    )
                    for r in entry.replicas
                    if not r.done
                ),
                load_seconds=entry.load_seconds,
            )
            for name, entry in models.items()
        },
    )


class RoutePublisher:
    """The latest route table, and the long-polls waiting for a newer one."""

    def __init__(self) -> None:
        self.table = RouteTable()
        self._changed = asyncio.Event()  # replaced by a fresh one at every publish
        self._closed = False  # shut down: long-polls answer at once
        self._gateway_version = -1  # the newest table the gateway said it holds
        self._gateway_polls = 0  # the gateway's long-polls in flight now
        self._gateway_last = float("-inf")  # monotonic time one last ended
        self._gateway_moved = asyncio.Event()  # replaced by a fresh one at every new version

    def publish(self, models: Mapping[str, ModelEntry]) -> None:
        """Rebuild the route table with a new version and wake the long-polls."""
        self.table = build_routes(models, self.table.version + 1)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def close(self) -> None:
        """From now on long-polls answer at once."""
        self._closed = True

    async def wait(self, after: int, timeout: float, gateway: bool = False) -> RouteTable:
        """The route table once its version is past `after`, or as it is after `timeout` s.
        `gateway`: the poll is the gateway's, which holds table `after`."""
        if not gateway:
            return await self._wait(after, timeout)
        if after <= self.table.version:  # not a table of an earlier run of the supervisor
            self._gateway_saw(after)
        self._gateway_polls += 1
        try:
            return await self._wait(after, timeout)
        finally:
            self._gateway_polls -= 1
            self._gateway_last = time.monotonic()

    def _gateway_saw(self, version: int) -> None:
        if version > self._gateway_version:
            self._gateway_version = version
            moved, self._gateway_moved = self._gateway_moved, asyncio.Event()
            moved.set()

    @property
    def gateway_attached(self) -> bool:
        """A gateway long-polls now, or did within the last second (between two polls)."""
        return self._gateway_polls > 0 or time.monotonic() - self._gateway_last < 1.0

    async def gateway_holds(self, version: int, timeout: float) -> bool:
        """Until the gateway holds table `version` or a newer one (True), or `timeout` s pass
        (False); True at once when no gateway is attached (nothing routes by the table)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._gateway_version < version:
            if not self.gateway_attached or (remaining := deadline - loop.time()) <= 0:
                return not self.gateway_attached
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, 0.5)):
                    await self._gateway_moved.wait()
        return True

    async def _wait(self, after: int, timeout: float) -> RouteTable:
        if after > self.table.version or self._closed:
            return self.table  # the caller saw an earlier run of the supervisor: answer now
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (
            self.table.version <= after
            and not self._closed
            and (remaining := deadline - loop.time()) > 0
        ):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._changed.wait()
        return self.table
