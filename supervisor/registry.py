"""The models sem runs, by name, and the commands that make, grow and remove them.

A model is created `downloading` (its hf:// files are cached first) or at once `active` with its
replicas pending; removing it drains and stops every replica, then it is gone. The desired state
(what survives a restart) is kept in the store as models are added and removed. Every change is
published in the route table; a change that may let a replica be placed wakes the scheduler.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from supervisor.cache import ModelCache
from supervisor.cache_job import Job
from supervisor.config import LoadMode, ModelSpec, Source
from supervisor.errors import ModelExists, ModelNotFound, SupervisorError
from supervisor.events import EventKind, EventLog
from supervisor.launch import ReplicaFactory
from supervisor.measure import Measurer
from supervisor.models import ModelEntry
from supervisor.replica import Replica
from supervisor.resources import Device
from supervisor.route_table import RoutePublisher
from supervisor.scheduler import Scheduler
from supervisor.sizing import Prepared, after_download, prepare
from supervisor.states import ModelPhase, ReplicaState
from supervisor.store import Origin, Store


class Registry:
    def __init__(
        self,
        *,
        events: EventLog,
        store: Store,
        factory: ReplicaFactory,
        scheduler: Scheduler,
        routes: RoutePublisher,
        cache: ModelCache | None,
        measurer: Measurer,
    ) -> None:
        self._events = events
        self._store = store
        self._factory = factory
        self._scheduler = scheduler
        self._routes = routes
        self.cache = cache  # if set, hf:// sources not cached yet are downloaded first
        self._measurer = measurer  # corrects a model's need from its engines (measure.py)
        self._models: dict[str, ModelEntry] = {}
        self._removals: set[asyncio.Task[None]] = set()
        self._downloads: set[asyncio.Task[None]] = set()
        self._closing = False  # shutting down: a finished download adds no replicas
        self.replica_watchers: list[Callable[[Replica], None]] = []  # told of every transition

    # -- queries -----------------------------------------------------------------------------

    def entries(self) -> list[ModelEntry]:
        return list(self._models.values())

    def find(self, name: str) -> ModelEntry | None:
        return self._models.get(name)

    def get(self, name: str) -> ModelEntry:
        try:
            return self._models[name]
        except KeyError:
            known = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFound(f"model {name!r} is not known (known: {known})") from None

    @property
    def devices(self) -> list[Device]:
        """The inventory as the scheduler last measured it."""
        return self._scheduler.devices

    def replicas(self) -> list[Replica]:
        return [r for e in self._models.values() for r in e.replicas]

    def publish(self) -> None:
        """A new route table from the models as they are now."""
        self._routes.publish(self._models)

    # -- commands ----------------------------------------------------------------------------

    async def prepare(self, spec: ModelSpec) -> Prepared:
        """The model's folder and size, or the download that comes first; InvalidSpec if
        neither can be had."""
        return await prepare(spec, self.cache, self.devices, self._store)

    async def add(self, spec: ModelSpec, origin: Origin = "api") -> ModelEntry:
        """A new model (replicas pending); kept in the desired state across restarts."""
        self._refuse_existing(spec.name)
        prepared = await self.prepare(spec)
        self._refuse_existing(spec.name)  # another add of the name may have won meanwhile
        entry = self.create(spec, origin, prepared)
        self._store.put_desired(spec, origin)
        return entry

    def _refuse_existing(self, name: str) -> None:
        if name in self._models:
            raise ModelExists(f"model {name!r} already exists; remove it first")

    def remove(self, name: str, drain_timeout: float) -> ModelEntry:
        """Begin draining the model; it disappears once every replica has stopped."""
        entry = self.get(name)
        self._store.drop_desired(name)
        self.begin_removal(entry, drain_timeout)
        return entry

    def create(
        self, spec: ModelSpec, origin: Origin, prepared: Prepared, replicas: int | None = None
    ) -> ModelEntry:
        """A new model entry with `replicas` pending replicas (default: as the spec says), or
        `downloading` until its files are cached."""
        if isinstance(prepared, Job):
            entry = ModelEntry(spec, "", None, self._events, origin=origin, download=prepared)
            self._models[spec.name] = entry
            entry.transition(ModelPhase.DOWNLOADING, f"caching {spec.source} first")
            task = asyncio.create_task(self._after_download(entry), name=f"cache-{spec.name}")
            self._downloads.add(task)
            task.add_done_callback(self._downloads.discard)
            self.publish()
            return entry
        model_ref, need = prepared
        entry = ModelEntry(spec, model_ref, need, self._events, origin=origin)
        self._models[spec.name] = entry
        self._admit(entry, replicas)
        return entry

    def new_replica(self, entry: ModelEntry, replica_id: str) -> Replica:
        """A pending replica of the model's current spec (not yet in its list)."""
        return self._factory.new(
            replica_id=replica_id, spec=entry.spec, model_ref=entry.model_ref,
            need=entry.sized, on_change=self._on_replica_change,
        )  # fmt: skip

    def add_replica(self, entry: ModelEntry) -> Replica:
        """One more pending replica beside the model's others (a rollout's successor)."""
        replica = self.new_replica(entry, entry.free_replica_id())
        entry.replicas.append(replica)
        self._changed()
        return replica

    def add_replicas(self, entry: ModelEntry, upto: int | None = None) -> None:
        """New pending replicas until the model has `upto` (default: as the spec says)."""
        upto = entry.spec.min_replicas if upto is None else upto
        while len([r for r in entry.replicas if not r.done]) < upto:
            entry.replicas.append(self.new_replica(entry, entry.free_replica_id()))
        self._changed()

    def retire_replica(self, entry: ModelEntry, replica: Replica, drain_timeout: float) -> None:
        """One replica fewer (autoscaling down): it drains and stops, then leaves the list."""

        async def retire() -> None:
            await replica.stop(drain_timeout)
            if replica in entry.replicas:
                entry.replicas.remove(replica)
            self.publish()

        task = asyncio.create_task(retire(), name=f"retire-{replica.id}")
        self._removals.add(task)
        task.add_done_callback(self._removals.discard)

    def load(self, entry: ModelEntry, reason: str) -> None:
        """An unloaded model becomes active: its replicas queue for placement."""
        entry.replicas = [r for r in entry.replicas if not r.done]  # ids free for reuse
        entry.transition(ModelPhase.ACTIVE, reason)
        leaving = sum(1 for r in entry.replicas if r.state is ReplicaState.DRAINING)
        self.add_replicas(entry, entry.spec.min_replicas + leaving)

    def unload(self, entry: ModelEntry, reason: str, drain_timeout: float) -> None:
        """An active model becomes unloaded: its replicas drain and stop, and their memory goes
        back to the pending queue (each stop wakes the scheduler). It stays known: a request
        for it waits in the gateway's queue and loads it again."""
        entry.transition(ModelPhase.UNLOADED, reason)
        task = asyncio.create_task(
            self._stop_replicas(entry, drain_timeout), name=f"unload-{entry.spec.name}"
        )
        self._removals.add(task)
        task.add_done_callback(self._removals.discard)
        self.publish()

    def replace_lost(self, lost: set[str]) -> None:
        """Cluster nodes left: a replica on one is gone with it, so it is stopped (nothing is
        left to drain) and a new pending one takes its place on a node that is left."""
        for entry in self._models.values():
            for replica in entry.replicas:
                if replica.plan is not None and replica.plan.node in lost and not replica.done:
                    self._events.emit(EventKind.NODE_LOST, replica.id, "its node left; replacing")
                    task = asyncio.create_task(self._replace(entry, replica), name=replica.id)
                    self._removals.add(task)
                    task.add_done_callback(self._removals.discard)
        self._scheduler.replan()  # joined nodes too: replicas that wait for room may fit

    async def _replace(self, entry: ModelEntry, replica: Replica) -> None:
        await replica.stop(0.0)
        if replica in entry.replicas:
            entry.replicas.remove(replica)
        if entry.phase is ModelPhase.ACTIVE and not self._closing:  # not unloaded meanwhile
            self.add_replicas(entry)

    def begin_removal(self, entry: ModelEntry, drain_timeout: float) -> None:
        if entry.leaving:
            return
        entry.transition(ModelPhase.DRAINING, f"draining (deadline {drain_timeout:g}s)")
        if entry.rollout is not None:
            entry.rollout.cancel()
        task = asyncio.create_task(
            self._remove(entry, drain_timeout), name=f"remove-{entry.spec.name}"
        )
        self._removals.add(task)
        task.add_done_callback(self._removals.discard)
        self.publish()

    async def close(self, drain_timeout: float) -> None:
        """Stop every model (drained up to the deadline); return once all engines are gone.
        The desired state stays as it is, for the next start."""
        self._closing = True
        for task in self._downloads:
            task.cancel()  # the cache's own jobs end in its aclose()
        if self._downloads:
            await asyncio.gather(*self._downloads, return_exceptions=True)
        for entry in list(self._models.values()):
            self.begin_removal(entry, drain_timeout)
        if self._removals:
            await asyncio.gather(*self._removals, return_exceptions=True)
        await self._measurer.close()

    # -- internals ---------------------------------------------------------------------------

    def _changed(self) -> None:
        """The models' replicas changed: publish, and let the scheduler place the new ones."""
        self.publish()
        self._scheduler.replan()

    async def _after_download(self, entry: ModelEntry) -> None:
        """Once the files are cached: size the model up and place its replicas."""
        assert entry.download is not None
        try:
            entry.model_ref, entry.estimate = await after_download(
                entry.spec, entry.download, self.devices, self._store
            )
        except SupervisorError as exc:
            if entry.phase is ModelPhase.DOWNLOADING:  # not removed meanwhile
                entry.transition(ModelPhase.FAILED, exc.message)
            self.publish()
            return
        finally:
            entry.download = None
        current = self._models.get(entry.spec.name) is entry
        if not current or entry.phase is not ModelPhase.DOWNLOADING or self._closing:
            return
        assert self.cache is not None
        self.cache.touch(Source.parse(entry.spec.source))
        self._admit(entry)

    def _admit(self, entry: ModelEntry, replicas: int | None = None) -> None:
        """A sized-up model joins the pending queue with `replicas` (default: the spec's), or
        with `load: on_demand` (and no replicas asked for) waits unloaded for a request."""
        if replicas is None and entry.spec.load is LoadMode.ON_DEMAND:
            entry.transition(ModelPhase.UNLOADED, "loads on demand: waiting for a request")
            self.publish()
            return
        entry.transition(
            ModelPhase.ACTIVE,
            f"added from {entry.spec.source};"
            f" needs {entry.sized.per_device / 2**30:.2f} GiB per device",
        )
        self.add_replicas(entry, replicas)

    async def _stop_replicas(self, entry: ModelEntry, drain_timeout: float) -> None:
        await asyncio.gather(*(r.stop(drain_timeout) for r in list(entry.replicas)))

    async def _remove(self, entry: ModelEntry, drain_timeout: float) -> None:
        await self._stop_replicas(entry, drain_timeout)
        if self._models.get(entry.spec.name) is entry:  # not replaced by a new one meanwhile
            del self._models[entry.spec.name]
        entry.transition(ModelPhase.REMOVED, "all replicas stopped")
        self.publish()

    def _on_replica_change(self, replica: Replica) -> None:
        if replica.state in (ReplicaState.STOPPED, ReplicaState.FAILED, ReplicaState.RESTARTING):
            self._store.drop_engine(replica.id)  # its engine is gone (or being replaced)
        if (entry := self._models.get(replica.model)) is not None and replica in entry.replicas:
            self._measurer.note_change(entry, replica)
        self._scheduler.note_change(replica)
        for watcher in self.replica_watchers:
            watcher(replica)
        self.publish()
