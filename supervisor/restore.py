"""At start: the models kept in the store, with the engines that outlived the last supervisor.

Desired state and engine records live in the store (store.py). `restore` rebuilds the stored
models, re-adopts each live engine that is still theirs (adoption.py says when), and retires the
engines of an earlier run that have no place now. The daemon then applies what changed in
models.yaml, exactly as a reload does later.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import replace

from supervisor.adoption import adopted_engine, is_our_engine, why_not_adoptable
from supervisor.config import LoadMode
from supervisor.elastic import ADOPTED
from supervisor.engine import Adopt, RemoteEngine
from supervisor.errors import SupervisorError
from supervisor.events import EventKind, EventLog
from supervisor.models import ModelEntry
from supervisor.placement import Placement
from supervisor.probe import EngineProbe
from supervisor.registry import Registry
from supervisor.store import EngineRecord, Store, spec_digest

Remote = Mapping[str, RemoteEngine] | None  # a cluster's engines by replica id; None: one box


class Restorer:
    def __init__(
        self,
        registry: Registry,
        store: Store,
        probe: EngineProbe,
        events: EventLog,
        stop_grace: float,
        adopt: Adopt | None = None,
    ) -> None:
        self._registry = registry
        self._store = store
        self._probe = probe
        self._events = events
        self._stop_grace = stop_grace
        self._adopt_remote = adopt  # a cluster's: its node agents own the engines

    async def restore(self) -> None:
        """The stored models, their live engines re-adopted, the other engines retired.

        Runs before the scheduler starts and before the route table is served, so the first
        table a gateway sees already has the re-adopted engines.
        """
        records = self._store.engines()
        remote = await self._adopt_remote() if self._adopt_remote else None
        adopted: set[str] = set()
        for desired in self._store.desired():
            spec = desired.spec
            try:
                prepared = await self._registry.prepare(spec)
                entry = self._registry.create(spec, desired.origin, prepared, replicas=0)
            except SupervisorError as exc:
                self._events.emit(EventKind.MODEL_INVALID, spec.name, exc.message)
                continue
            if entry.download is not None:
                continue  # not cached: no engine can have run from it
            mine = [r for r in records if r.model == spec.name]
            adopted |= await self._adopt(entry, mine, remote)
            if entry.replicas or spec.load is not LoadMode.ON_DEMAND:
                self._registry.add_replicas(entry)
            else:  # nothing of it ran before: it waits for a request, as at a first start
                self._registry.unload(entry, "loads on demand: waiting for a request", 0)
        leftovers = [r for r in records if r.replica not in adopted]
        await asyncio.gather(*(self._retire(record, remote) for record in leftovers))

    async def _adopt(
        self, entry: ModelEntry, records: list[EngineRecord], remote: Remote
    ) -> set[str]:
        """Take over the model's recorded engines that are still its own, up to its replica
        count; the ids of the replicas that did."""
        adopted: set[str] = set()
        for record in records:
            if len(entry.replicas) == entry.spec.min_replicas:
                break
            if why := await self._why_not_adoptable(record, entry, remote):
                self._events.emit(EventKind.NOT_ADOPTED, record.replica,
                                  f"{why}; starting afresh")  # fmt: skip
                continue
            replica = self._registry.new_replica(entry, record.replica)
            placement = Placement(replica.id, record.devices, record.reserved, ADOPTED,
                                  record.reservations)  # fmt: skip
            if remote is None:
                replica.adopt(placement, adopted_engine(record))
                key = record.api_key
            else:  # on a cluster node
                replica.adopt(placement, remote[record.replica])
                key = remote[record.replica].api_key
            assert replica.plan is not None
            replica.plan = replace(replica.plan, api_key=key)  # the key its engine demands
            entry.replicas.append(replica)
            adopted.add(replica.id)
        return adopted

    async def _why_not_adoptable(
        self, record: EngineRecord, entry: ModelEntry, remote: Remote
    ) -> str | None:
        if remote is None:
            return await why_not_adoptable(record, entry.spec, self._probe)
        if record.replica not in remote:
            return "its engine runs on no node of the cluster"
        if record.spec_digest != spec_digest(entry.spec):
            return f"its engine was started from another spec of {entry.spec.name}"
        return None

    async def _retire(self, record: EngineRecord, remote: Remote) -> None:
        """An engine of an earlier run that has no place now: stop it, forget it."""
        if remote is not None:
            if (engine := remote.get(record.replica)) is not None:
                self._events.emit(EventKind.RETIRED, record.replica,
                                  "stopping its engine on its node")  # fmt: skip
                await engine.stop(self._stop_grace)
        elif await asyncio.to_thread(is_our_engine, record):
            self._events.emit(EventKind.RETIRED, record.replica,
                              f"stopping engine pid {record.pid}")  # fmt: skip
            await adopted_engine(record).stop(self._stop_grace)
        self._store.drop_engine(record.replica)
