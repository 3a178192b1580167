"""Publishing the route table: built from the models (pure), versioned, long-polled.

The gateway routes by this table alone. `build_routes` makes it from the models as they are;
`RoutePublisher` keeps the latest, bumps its version at every change and wakes the long-polls
(`GET /routes?after=V&timeout=S`).
"""

from __future__ import annotations

import asyncio
import contextlib
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

    def publish(self, models: Mapping[str, ModelEntry]) -> None:
        """Rebuild the route table with a new version and wake the long-polls."""
        self.table = build_routes(models, self.table.version + 1)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def close(self) -> None:
        """From now on long-polls answer at once."""
        self._closed = True

    async def wait(self, after: int, timeout: float) -> RouteTable:
        """The route table once its version is past `after`, or as it is after `timeout` s."""
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
