"""The models sem runs: add, remove, reload, place on devices, and the route table built from them.

The manager schedules models onto devices. Replicas start `pending`; the scheduler task places
them (placement.py decides) when memory allows. It re-plans every `recheck_interval` and at once
when a replica releases memory (stopped or failed) or finishes starting.

Desired state and engine records live in the store (store.py). At start, `restore` rebuilds the
models from it, re-adopts the engines that outlived the previous supervisor, and applies what
changed in models.yaml, exactly as `reload` does later.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from contract.routes import ModelRoute, ReplicaRoute, RouteTable
from supervisor.adoption import adopted_engine, is_our_engine, why_not_adoptable
from supervisor.cache import Job, ModelCache
from supervisor.config import ModelSpec, Source
from supervisor.engine import (
    Adopt,
    EngineCommand,
    EngineHandle,
    LaunchPlan,
    RemoteEngine,
    Spawn,
    free_port,
    spawn_engine,
    start_time,
)
from supervisor.errors import InvalidSpec, ModelExists, ModelNotFound, SupervisorError
from supervisor.estimate import EstimateError, MemoryEstimate, cpu_kv_cache_gib, estimate
from supervisor.events import EventLog
from supervisor.placement import DeviceView, Placement, Request, never_fits, plan
from supervisor.probe import EngineProbe
from supervisor.reconcile import ConfigDiff, diff_config
from supervisor.replica import Replica, ReplicaTiming
from supervisor.resources import Device, Inventory
from supervisor.restart import RestartPolicy
from supervisor.states import ModelState, ReplicaState, aggregate
from supervisor.store import EngineRecord, Origin, Store, spec_digest

log = logging.getLogger("sem.manager")

# What a model needs before it can have replicas: (engine's model folder, memory per replica),
# or the download of its files that must come first.
Prepared = tuple[str, MemoryEstimate] | Job


@dataclass
class ModelEntry:
    spec: ModelSpec
    model_ref: str  # what the engine's --model gets: a local folder
    estimate: MemoryEstimate | None  # None while its files are being cached
    origin: Origin = "api"  # models.yaml or a runtime add
    replicas: list[Replica] = field(default_factory=list)
    removing: bool = False
    rollout: asyncio.Task[None] | None = None  # replacing replicas after a spec change
    download: Job | None = None  # caching its hf:// source first (state `downloading`)
    failure: str = ""  # why it could not be cached or sized

    def free_replica_id(self) -> str:
        """The first `<name>-<n>` no current replica has: a rollout's new replica runs beside
        the one it replaces, so ids are not positions."""
        taken = {r.id for r in self.replicas}
        return next(i for n in itertools.count() if (i := f"{self.spec.name}-{n}") not in taken)

    @property
    def state(self) -> ModelState:
        if self.removing:
            return ModelState.DRAINING
        if self.failure:
            return ModelState.FAILED
        if self.download is not None:
            return ModelState.DOWNLOADING
        return aggregate([r.state for r in self.replicas])

    @property
    def sized(self) -> MemoryEstimate:
        assert self.estimate is not None, "replicas exist only once the model is sized up"
        return self.estimate

    @property
    def reason(self) -> str:
        if self.failure:
            return self.failure
        if self.download is not None:
            return self.download.describe()
        # The reason of the replica that decides the aggregate state says most.
        for replica in self.replicas:
            if replica.state.value == self.state.value:
                return replica.reason
        return "removing" if self.removing else ""

    def snapshot(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "state": self.state.value,
            "reason": self.reason,
            "spec": self.spec.model_dump(),
            "origin": self.origin,
            "estimate": self.estimate.to_json() if self.estimate else None,
            "download": self.download.to_json() if self.download else None,
            "replicas": [r.snapshot() for r in self.replicas],
        }


@dataclass(frozen=True)
class EngineSettings:
    """How engines are started: shared by every replica."""

    command: EngineCommand
    state_dir: Path
    instance: str
    parent_env: Mapping[str, str]
    spawn: Spawn = spawn_engine  # a Ray cluster's node agents: supervisor/cluster/
    adopt: Adopt | None = None  # a cluster's engines after a restart (None: this machine's pids)


@dataclass(frozen=True)
class SchedulerSettings:
    recheck_interval: float = 10.0
    release_triggers: bool = True  # re-plan at once on a release (off: periodic re-check only)
    starvation_guard: float = 60.0


def local_model_dir(spec: ModelSpec) -> Path:
    """The local folder an engine will load; InvalidSpec if there is none."""
    source = Source.parse(spec.source)
    if source.kind == "path":
        assert source.path is not None
        if not (source.path / "config.json").is_file():
            raise InvalidSpec(
                f"source {spec.source}: no config.json in {source.path}"
                " (expected a Hugging Face model folder; run `make models` for the demo models)"
            )
        return source.path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(source.repo, revision=source.revision, local_files_only=True))
    except LocalEntryNotFoundError:
        raise InvalidSpec(
            f"source {spec.source} is not in the local Hugging Face cache; download it first"
        ) from None


def size_up(spec: ModelSpec, model_dir: Path | None, devices: list[Device]) -> MemoryEstimate:
    """The memory one replica needs; InvalidSpec if it cannot be estimated or never fits."""
    on_gpu = any(d.kind == "gpu" for d in devices)
    try:
        need = estimate(spec, model_dir, on_gpu=on_gpu)
    except EstimateError as exc:
        raise InvalidSpec(str(exc)) from None
    eligible = [(d.label, d.total) for d in devices if on_gpu == (d.kind == "gpu")]
    if problem := never_fits(need.per_device, spec.tensor_parallel, eligible):
        raise InvalidSpec(f"{spec.name} can never be placed: {problem}")
    return need


class Manager:
    def __init__(
        self,
        *,
        settings: EngineSettings,
        inventory: Inventory,
        probe: EngineProbe,
        events: EventLog,
        policy: RestartPolicy | None = None,
        timing: ReplicaTiming | None = None,
        scheduling: SchedulerSettings | None = None,
        store: Store | None = None,
        cache: ModelCache | None = None,
    ) -> None:
        self._settings = settings
        self._store = store or Store(None)
        self._inventory = inventory
        self._probe = probe
        self._events = events
        self._policy = policy or RestartPolicy()
        self._timing = timing or ReplicaTiming()
        self._scheduling = scheduling or SchedulerSettings()
        self._models: dict[str, ModelEntry] = {}
        self._removals: set[asyncio.Task[None]] = set()
        self._routes = RouteTable()
        self._routes_changed = asyncio.Event()  # replaced by a fresh one at every publish
        self._closed = False  # shut down: long-polls answer at once
        self._stopping = False  # shutting down: the scheduler places nothing more
        self._devices: list[Device] = inventory.devices()
        self._seq = itertools.count()
        self._replan = asyncio.Event()
        self._scheduler: asyncio.Task[None] | None = None
        self._reloading = asyncio.Lock()
        self.cache = cache  # if set, hf:// sources not cached yet are downloaded first
        self._downloads: set[asyncio.Task[None]] = set()

    # -- queries -----------------------------------------------------------------------------

    def entries(self) -> list[ModelEntry]:
        return list(self._models.values())

    def get(self, name: str) -> ModelEntry:
        try:
            return self._models[name]
        except KeyError:
            known = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFound(f"model {name!r} is not known (known: {known})") from None

    @property
    def devices(self) -> list[Device]:
        """The inventory as last measured."""
        return self._devices

    @property
    def routes(self) -> RouteTable:
        return self._routes

    async def wait_routes(self, after: int, timeout: float) -> RouteTable:
        """The route table once its version is past `after`, or as it is after `timeout` s."""
        if after > self._routes.version or self._closed:
            return self._routes  # the caller saw an earlier run of the supervisor: answer now
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (
            self._routes.version <= after
            and not self._closed
            and (remaining := deadline - loop.time()) > 0
        ):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._routes_changed.wait()
        return self._routes

    async def resources(self) -> list[dict[str, Any]]:
        self._devices = await asyncio.to_thread(self._inventory.devices)
        views = {v.id: v for v in self._device_views(self._devices)}
        out = []
        for device in self._devices:
            holders = [
                {"replica": r.id, "reserved": r.placement.per_device, "state": r.state.value}
                for r in self._all_replicas()
                if r.holds_reservation and r.placement and device.id in r.placement.device_ids
            ]
            out.append(
                {
                    "id": device.id, "kind": device.kind, "name": device.name,
                    "uuid": device.uuid, "total": device.total, "free": device.free,
                    "reserved": views[device.id].reserved,
                    "available": views[device.id].available, "replicas": holders,
                }
            )  # fmt: skip
        return out

    # -- commands ----------------------------------------------------------------------------

    def start(self) -> None:
        """Run the scheduler (placement of pending replicas) until shutdown."""
        self._scheduler = asyncio.create_task(self._schedule_loop(), name="scheduler")

    def add(self, spec: ModelSpec, origin: Origin = "api") -> ModelEntry:
        """A new model (replicas pending); kept in the desired state across restarts."""
        if spec.name in self._models:
            raise ModelExists(f"model {spec.name!r} already exists; remove it first")
        entry = self._create(spec, origin, self._prepare(spec))
        self._store.put_desired(spec, origin)
        return entry

    def remove(self, name: str, drain_timeout: float) -> ModelEntry:
        """Begin draining the model; it disappears once every replica has stopped."""
        entry = self.get(name)
        self._store.drop_desired(name)
        self._begin_removal(entry, drain_timeout)
        return entry

    async def restore(self, config: list[ModelSpec], drain_timeout: float) -> ConfigDiff:
        """At start: the stored models, their live engines re-adopted, then models.yaml applied.

        Call before `start()` and before the route table is served, so the first table a
        gateway sees already has the re-adopted engines.
        """
        records = self._store.engines()
        remote = await self._settings.adopt() if self._settings.adopt else None
        adopted: set[str] = set()
        for desired in self._store.desired():
            spec = desired.spec
            try:
                entry = self._create(spec, desired.origin, self._prepare(spec), replicas=0)
            except SupervisorError as exc:
                self._events.emit("model_invalid", spec.name, exc.message)
                continue
            if entry.download is not None:
                continue  # not cached: no engine can have run from it
            for record in [r for r in records if r.model == spec.name]:
                if len(entry.replicas) == spec.replicas:
                    break
                if why := await self._why_not_adoptable(record, spec, remote):
                    self._events.emit("not_adopted", record.replica, f"{why}; starting afresh")
                    continue
                replica = self._new_replica(entry, record.replica)
                placement = Placement(replica.id, record.devices, record.reserved, "re-adopted")
                if remote is None:
                    replica.adopt(placement, adopted_engine(record))
                else:  # on a cluster node: with the key its engine demands
                    replica.adopt(placement, remote[record.replica])
                    assert replica.plan is not None
                    replica.plan = replace(replica.plan, api_key=remote[record.replica].api_key)
                entry.replicas.append(replica)
                adopted.add(replica.id)
            self._add_replicas(entry)
        leftovers = [r for r in records if r.replica not in adopted]
        await asyncio.gather(*(self._retire(record, remote) for record in leftovers))
        return await self.reload(config, drain_timeout, strict=False)

    async def reload(
        self, config: list[ModelSpec], drain_timeout: float, strict: bool = True
    ) -> ConfigDiff:
        """Apply models.yaml's changes since it was last applied: new models are added, models
        no longer listed are drained and stopped, changed ones are rolled replica by replica.

        Every added or changed model is checked before anything changes: if one is invalid,
        InvalidSpec says which and why, and what runs is untouched. Not `strict` (at start):
        an invalid model is skipped with a `model_invalid` event, the others go ahead, and the
        skipped one is tried again at the next reload.
        """
        async with self._reloading:
            diff = diff_config(self._store.applied_config(), config)
            prepared: dict[str, Prepared] = {}
            for spec in diff.added + diff.changed:
                try:
                    prepared[spec.name] = self._prepare(spec)
                except SupervisorError as exc:
                    if strict:
                        raise
                    self._events.emit("model_invalid", spec.name, exc.message)
                    log.error("%s", exc.message)
            for spec in diff.added + diff.changed:
                if spec.name not in prepared:
                    continue  # invalid, skipped (not strict)
                entry = self._models.get(spec.name)
                if entry is None or entry.removing:
                    self._create(spec, "config", prepared[spec.name])
                else:
                    self._reconfigure(entry, spec, prepared[spec.name], drain_timeout)
                self._store.put_desired(spec, "config")
            for name in diff.removed:
                entry = self._models.get(name)
                if entry is not None and entry.origin == "config" and not entry.removing:
                    self.remove(name, drain_timeout)
            invalid = {s.name for s in diff.added + diff.changed} - set(prepared)
            self._store.set_applied_config([s for s in config if s.name not in invalid])
            self._events.emit("reloaded", "models.yaml", str(diff))
            return diff

    async def shutdown(self, drain_timeout: float) -> None:
        """Stop every model (drained up to the deadline) and wait until all engines are gone."""
        self._stopping = True  # no more placements
        if self._scheduler is not None:
            self._replan.set()
            await self._scheduler
        for task in self._downloads:
            task.cancel()  # the cache's own jobs end in its aclose()
        if self._downloads:
            await asyncio.gather(*self._downloads, return_exceptions=True)
        for entry in list(self._models.values()):
            self._begin_removal(entry, drain_timeout)  # the desired state stays as it is
        if self._removals:
            await asyncio.gather(*self._removals, return_exceptions=True)
        self._closed = True  # long-polls answer at once from now on
        self._publish()

    def nodes_changed(self, lost: set[str]) -> None:
        """Cluster nodes joined or left: a replica on a lost node is gone with it, so it is
        stopped (nothing is left to drain) and a new pending one takes its place on a node that
        is left. Joined nodes: a re-plan, for replicas that wait for room."""
        for entry in self._models.values():
            for replica in entry.replicas:
                if replica.plan is not None and replica.plan.node in lost and not replica.done:
                    self._events.emit("node_lost", replica.id, "its node left; replacing it")
                    task = asyncio.create_task(self._replace(entry, replica), name=replica.id)
                    self._removals.add(task)
                    task.add_done_callback(self._removals.discard)
        self._replan.set()

    async def _replace(self, entry: ModelEntry, replica: Replica) -> None:
        await replica.stop(0.0)
        if replica in entry.replicas:
            entry.replicas.remove(replica)
        if not entry.removing and not self._stopping:
            self._add_replicas(entry)

    # -- scheduling --------------------------------------------------------------------------

    async def _schedule_loop(self) -> None:
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
        # arrives as the event fires, and the loop would never end.
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._scheduling.recheck_interval):
                    await self._replan.wait()
            self._replan.clear()
            if self._stopping:
                return
            try:
                await self.schedule()
            except Exception:
                log.exception("scheduling failed; retrying at the next re-check")

    async def schedule(self) -> None:
        """One planning round: place what fits now, say why the rest waits."""
        pending = [
            r for e in self._models.values() if not e.removing
            for r in e.replicas if r.state is ReplicaState.PENDING and not r.started
        ]  # fmt: skip
        if not pending:
            return
        self._devices = await asyncio.to_thread(self._inventory.devices)
        entries = {r.id: e for e in self._models.values() for r in e.replicas}
        now = time.monotonic()
        requests = [
            Request(
                replica_id=r.id,
                need=entries[r.id].sized.per_device,
                devices=entries[r.id].spec.tensor_parallel,
                priority=entries[r.id].spec.priority,
                seq=r.seq,
                waited=now - r.pending_since,
                group=entries[r.id].spec.name,
                avoid_nodes=frozenset(
                    s.plan.node
                    for s in entries[r.id].replicas
                    if s.holds_reservation and s.plan is not None and s.plan.node
                ),
            )
            for r in pending
        ]
        decision = plan(requests, self._device_views(self._devices),
                        self._scheduling.starvation_guard)  # fmt: skip
        by_id = {r.id: r for r in pending}
        for placement in decision.placements:
            replica = by_id[placement.replica_id]
            self._events.emit("placed", replica.id, placement.reason,
                              devices=list(placement.device_ids))  # fmt: skip
            replica.start(placement)
        for wait in decision.waits:
            if by_id[wait.replica_id].note_pending(wait.reason):
                self._events.emit("pending", wait.replica_id, wait.reason)
                self._publish()

    def _device_views(self, devices: list[Device]) -> list[DeviceView]:
        reserved = {d.id: 0 for d in devices}
        starting = {d.id: False for d in devices}
        for replica in self._all_replicas():
            if replica.holds_reservation and replica.placement is not None:
                for device_id in replica.placement.device_ids:
                    reserved[device_id] = reserved.get(device_id, 0) + replica.placement.per_device
                    if replica.state is ReplicaState.STARTING:
                        starting[device_id] = True
        return [
            DeviceView(
                d.id, d.label, d.total, d.free, reserved[d.id], starting[d.id], d.kind, d.node
            )
            for d in devices
        ]

    def _all_replicas(self) -> list[Replica]:
        return [r for e in self._models.values() for r in e.replicas]

    # -- internals ---------------------------------------------------------------------------

    def _prepare(self, spec: ModelSpec) -> Prepared:
        """The engine's model folder and the memory a replica needs, or the download that must
        come first (an hf:// source not cached yet); InvalidSpec if neither can be had."""
        if self.cache is None:
            located: Path | Job = local_model_dir(spec)
        else:
            located = self.cache.prepare(Source.parse(spec.source))
        if isinstance(located, Job):
            return located
        return str(located), size_up(spec, located, self._devices)

    def _create(
        self, spec: ModelSpec, origin: Origin, prepared: Prepared, replicas: int | None = None
    ) -> ModelEntry:
        """A new model entry with `replicas` pending replicas (default: as the spec says), or
        `downloading` until its files are cached."""
        if isinstance(prepared, Job):
            entry = ModelEntry(spec, model_ref="", estimate=None, origin=origin, download=prepared)
            self._models[spec.name] = entry
            self._events.emit("model_downloading", spec.name, f"caching {spec.source} first")
            task = asyncio.create_task(self._after_download(entry), name=f"cache-{spec.name}")
            self._downloads.add(task)
            task.add_done_callback(self._downloads.discard)
            self._publish()
            return entry
        model_ref, need = prepared
        entry = ModelEntry(spec=spec, model_ref=model_ref, estimate=need, origin=origin)
        self._models[spec.name] = entry
        self._admit(entry, replicas)
        return entry

    async def _after_download(self, entry: ModelEntry) -> None:
        """Once the files are cached: size the model up and place its replicas."""
        assert entry.download is not None
        name = entry.spec.name
        try:
            path = await entry.download.wait()
            entry.estimate = size_up(entry.spec, path, self._devices)
            entry.model_ref = str(path)
        except SupervisorError as exc:
            entry.failure = exc.message
            self._events.emit("model_failed", name, exc.message)
            self._publish()
            return
        finally:
            entry.download = None
        if self._models.get(name) is not entry or entry.removing or self._stopping:
            return
        assert self.cache is not None
        self.cache.touch(Source.parse(entry.spec.source))
        self._admit(entry)

    def _admit(self, entry: ModelEntry, replicas: int | None = None) -> None:
        """A sized-up model joins the pending queue with `replicas` (default: the spec's)."""
        self._events.emit(
            "model_added", entry.spec.name,
            f"added from {entry.spec.source};"
            f" needs {entry.sized.per_device / 2**30:.2f} GiB per device",
        )  # fmt: skip
        self._add_replicas(entry, replicas)

    def _add_replicas(self, entry: ModelEntry, upto: int | None = None) -> None:
        """New pending replicas until the model has `upto` (default: as the spec says)."""
        upto = entry.spec.replicas if upto is None else upto
        while len([r for r in entry.replicas if not r.done]) < upto:
            entry.replicas.append(self._new_replica(entry, entry.free_replica_id()))
        self._publish()
        self._replan.set()

    def _reconfigure(
        self, entry: ModelEntry, spec: ModelSpec, prepared: Prepared, drain_timeout: float
    ) -> None:
        self._events.emit("model_changed", spec.name, f"new spec; {spec.replicas} replica(s)")
        entry.origin = "config"
        if entry.rollout is not None:
            entry.rollout.cancel()
        entry.rollout = asyncio.create_task(
            self._roll_out(entry, spec, prepared, drain_timeout), name=f"rollout-{spec.name}"
        )

    async def _roll_out(
        self, entry: ModelEntry, spec: ModelSpec, prepared: Prepared, drain_timeout: float
    ) -> None:
        """Bring the replicas in line with a new spec (its files cached first if need be), one
        at a time: extras drained first; then each replica from an older spec gets a successor,
        which starts (beside it if memory allows, else once it is gone) while the old one
        drains; the next waits until that successor is ready, so a model with 2+ replicas keeps
        serving. Then missing ones."""
        if isinstance(prepared, Job):
            path = await prepared.wait()
            prepared = str(path), size_up(spec, path, self._devices)
        entry.spec, (entry.model_ref, entry.estimate) = spec, prepared
        digest = spec_digest(spec)
        live = [r for r in entry.replicas if not r.done]
        extras = live[spec.replicas :]
        await asyncio.gather(*(r.stop(drain_timeout) for r in extras))
        for old in [r for r in live if r not in extras and r.digest != digest]:
            new = self._new_replica(entry, entry.free_replica_id())
            entry.replicas.append(new)
            self._publish()
            self._replan.set()
            await old.stop(drain_timeout)
            entry.replicas.remove(old)
            await new.wait_for_state({ReplicaState.READY, ReplicaState.FAILED})
        entry.replicas = [r for r in entry.replicas if not r.done]
        self._add_replicas(entry)

    def _begin_removal(self, entry: ModelEntry, drain_timeout: float) -> None:
        if entry.removing:
            return
        entry.removing = True
        if entry.rollout is not None:
            entry.rollout.cancel()
        self._events.emit(
            "model_removing", entry.spec.name, f"draining (deadline {drain_timeout:g}s)"
        )
        task = asyncio.create_task(
            self._remove(entry, drain_timeout), name=f"remove-{entry.spec.name}"
        )
        self._removals.add(task)
        task.add_done_callback(self._removals.discard)
        self._publish()

    async def _why_not_adoptable(
        self, record: EngineRecord, spec: ModelSpec, remote: Mapping[str, RemoteEngine] | None
    ) -> str | None:
        if remote is None:
            return await why_not_adoptable(record, spec, self._probe)
        if record.replica not in remote:
            return "its engine runs on no node of the cluster"
        if record.spec_digest != spec_digest(spec):
            return f"its engine was started from another spec of {spec.name}"
        return None

    async def _retire(
        self, record: EngineRecord, remote: Mapping[str, RemoteEngine] | None
    ) -> None:
        """An engine of an earlier run that has no place now: stop it, forget it."""
        if remote is not None:
            if (engine := remote.get(record.replica)) is not None:
                self._events.emit("retired", record.replica, "stopping its engine on its node")
                await engine.stop(self._timing.stop_grace)
        elif await asyncio.to_thread(is_our_engine, record):
            self._events.emit("retired", record.replica, f"stopping engine pid {record.pid}")
            await adopted_engine(record).stop(self._timing.stop_grace)
        self._store.drop_engine(record.replica)

    async def _remove(self, entry: ModelEntry, drain_timeout: float) -> None:
        await asyncio.gather(*(r.stop(drain_timeout) for r in entry.replicas))
        self._models.pop(entry.spec.name, None)
        self._events.emit("model_removed", entry.spec.name, "all replicas stopped")
        self._publish()

    def _on_replica_change(self, replica: Replica) -> None:
        if replica.state in (ReplicaState.STOPPED, ReplicaState.FAILED, ReplicaState.RESTARTING):
            self._store.drop_engine(replica.id)  # its engine is gone (or being replaced)
        if replica.state in (ReplicaState.STOPPED, ReplicaState.FAILED) and replica.placement:
            self._events.emit(
                "released", replica.id,
                f"released {replica.placement.per_device / 2**30:.2f} GiB on"
                f" {'+'.join(replica.placement.device_ids)}",
            )  # fmt: skip
            if self._scheduling.release_triggers:
                self._replan.set()
        elif replica.state in (ReplicaState.READY, ReplicaState.RESTARTING):
            self._replan.set()  # a GPU's one-engine-starting gate may have opened
        self._publish()

    def _new_replica(self, entry: ModelEntry, replica_id: str) -> Replica:
        # A replica keeps the spec it was made for, restarts included: a rollout replaces it.
        spec, model_ref, need = entry.spec, entry.model_ref, entry.sized
        settings = self._settings

        def make_plan(placement: Placement | None) -> LaunchPlan:
            devices = {d.id: d for d in self._devices}
            gpu_ids: tuple[int, ...] = ()
            utilization = None
            on = devices[placement.device_ids[0]] if placement else Device("", "cpu", "", 0, 0)
            if placement is not None and all(
                devices[i].kind == "gpu" for i in placement.device_ids
            ):
                gpu_ids = tuple(devices[i].index or 0 for i in placement.device_ids)
                total = min(devices[i].total for i in placement.device_ids)
                utilization = min(0.98, placement.per_device / total)
            return LaunchPlan(
                replica_id=replica_id,
                served_name=spec.name,
                model=model_ref,
                port=free_port(),
                log_path=settings.state_dir / "logs" / f"{replica_id}.log",
                max_num_seqs=spec.max_num_seqs,
                max_model_len=spec.max_model_len,
                tensor_parallel=spec.tensor_parallel,
                gpu_ids=gpu_ids,
                gpu_memory_utilization=utilization,
                cpu_kv_cache_gib=None if gpu_ids else cpu_kv_cache_gib(need.kv_cache),
                engine_args=spec.engine_args,
                env=spec.env,
                host=on.host,
                node=on.node or None,
                # On a cluster an engine listens on its node's address: only the gateway may use it.
                api_key=secrets.token_urlsafe(24) if on.node else None,
            )

        async def launch(plan: LaunchPlan) -> EngineHandle:
            engine = await settings.spawn(
                settings.command, plan, settings.instance, settings.parent_env
            )
            placement = replica.placement
            self._store.put_engine(
                EngineRecord(
                    replica=replica_id, model=spec.name, pid=engine.pid,
                    create_time=start_time(engine.pid) or 0.0, port=plan.port,
                    spec_digest=replica.digest,
                    devices=placement.device_ids if placement else (),
                    reserved=placement.per_device if placement else 0, log_path=plan.log_path,
                )
            )  # fmt: skip
            return engine

        replica = Replica(
            replica_id=replica_id,
            model=spec.name,
            make_plan=make_plan,
            launch=launch,
            probe=self._probe,
            events=self._events,
            on_change=self._on_replica_change,
            policy=self._policy,
            timing=self._timing,
            reason="waiting for placement",
        )
        replica.seq = next(self._seq)
        replica.digest = spec_digest(spec)
        replica.max_num_seqs = spec.max_num_seqs
        return replica

    def _publish(self) -> None:
        """Rebuild the route table with a new version and wake the long-polls."""
        models = {
            name: ModelRoute(
                name=name,
                state=entry.state.value,
                reason=entry.reason,
                replicas=tuple(
                    ReplicaRoute(
                        id=r.id,
                        # A removed model's replicas take no new requests even while ready.
                        state=ReplicaState.DRAINING.value if entry.removing else r.state.value,
                        url=r.url,
                        max_num_seqs=r.max_num_seqs,
                        api_key=r.plan.api_key if r.plan else None,
                    )
                    for r in entry.replicas
                    if not r.done
                ),
            )
            for name, entry in self._models.items()
        }
        self._routes = RouteTable(version=self._routes.version + 1, models=models)
        changed, self._routes_changed = self._routes_changed, asyncio.Event()
        changed.set()
