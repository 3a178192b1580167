"""The models sem runs: add, remove, look up, and the route table built from them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sem.routes import ModelRoute, ReplicaRoute, RouteTable
from supervisor.config import ModelSpec, Source
from supervisor.engine import EngineCommand, EngineProcess, LaunchPlan, free_port, spawn_engine
from supervisor.errors import InvalidSpec, ModelExists, ModelNotFound
from supervisor.events import EventLog
from supervisor.probe import EngineProbe
from supervisor.replica import Replica, ReplicaTiming
from supervisor.restart import RestartPolicy
from supervisor.states import ModelState, ReplicaState, aggregate

log = logging.getLogger("sem.manager")


@dataclass
class ModelEntry:
    spec: ModelSpec
    model_ref: str  # what the engine's --model gets: a folder or a cached hub repo id
    replicas: list[Replica] = field(default_factory=list)
    removing: bool = False

    @property
    def state(self) -> ModelState:
        if self.removing:
            return ModelState.DRAINING
        return aggregate([r.state for r in self.replicas])

    @property
    def reason(self) -> str:
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
            "replicas": [r.snapshot() for r in self.replicas],
        }


@dataclass(frozen=True)
class EngineSettings:
    """How engines are started: shared by every replica."""

    command: EngineCommand
    state_dir: Path
    instance: str
    parent_env: Mapping[str, str]
    cpu_kv_cache_gib: float = 1.0


def resolve_model_ref(spec: ModelSpec) -> str:
    source = Source.parse(spec.source)
    if source.kind == "path":
        assert source.path is not None
        if not (source.path / "config.json").is_file():
            raise InvalidSpec(
                f"source {spec.source}: no config.json in {source.path}"
                " (expected a Hugging Face model folder; run `make models` for the demo models)"
            )
        return str(source.path)
    return source.repo  # served from the local HF cache (engines run with HF_HUB_OFFLINE=1)


class Manager:
    def __init__(
        self,
        *,
        settings: EngineSettings,
        probe: EngineProbe,
        events: EventLog,
        policy: RestartPolicy | None = None,
        timing: ReplicaTiming | None = None,
    ) -> None:
        self._settings = settings
        self._probe = probe
        self._events = events
        self._policy = policy or RestartPolicy()
        self._timing = timing or ReplicaTiming()
        self._models: dict[str, ModelEntry] = {}
        self._removals: set[asyncio.Task[None]] = set()
        self._routes = RouteTable()
        self._routes_changed = asyncio.Event()  # replaced by a fresh one at every publish
        self._closed = False  # shutting down: long-polls answer at once

    # -- queries -----------------------------------------------------------------------------

    def list(self) -> list[ModelEntry]:
        return list(self._models.values())

    def get(self, name: str) -> ModelEntry:
        try:
            return self._models[name]
        except KeyError:
            known = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFound(f"model {name!r} is not known (known: {known})") from None

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
                await asyncio.wait_for(self._routes_changed.wait(), remaining)
        return self._routes

    # -- commands ----------------------------------------------------------------------------

    def add(self, spec: ModelSpec) -> ModelEntry:
        if spec.name in self._models:
            raise ModelExists(f"model {spec.name!r} already exists; remove it first")
        entry = ModelEntry(spec=spec, model_ref=resolve_model_ref(spec))
        self._models[spec.name] = entry
        self._events.emit("model_added", spec.name, f"added from {spec.source}")
        for index in range(spec.replicas):
            replica = self._new_replica(entry, index)
            entry.replicas.append(replica)
            replica.start()
        self._publish()
        return entry

    def remove(self, name: str, drain_timeout: float) -> ModelEntry:
        """Begin draining the model; it disappears once every replica has stopped."""
        entry = self.get(name)
        if entry.removing:
            return entry
        entry.removing = True
        self._events.emit("model_removing", name, f"draining (deadline {drain_timeout:g}s)")
        task = asyncio.create_task(self._remove(entry, drain_timeout), name=f"remove-{name}")
        self._removals.add(task)
        task.add_done_callback(self._removals.discard)
        self._publish()
        return entry

    async def shutdown(self, drain_timeout: float) -> None:
        """Stop every model (drained up to the deadline) and wait until all engines are gone."""
        for name in list(self._models):
            self.remove(name, drain_timeout)
        if self._removals:
            await asyncio.gather(*self._removals, return_exceptions=True)
        self._closed = True
        self._publish()

    # -- internals ---------------------------------------------------------------------------

    async def _remove(self, entry: ModelEntry, drain_timeout: float) -> None:
        await asyncio.gather(*(r.stop(drain_timeout) for r in entry.replicas))
        self._models.pop(entry.spec.name, None)
        self._events.emit("model_removed", entry.spec.name, "all replicas stopped")
        self._publish()

    def _new_replica(self, entry: ModelEntry, index: int) -> Replica:
        spec = entry.spec
        replica_id = f"{spec.name}-{index}"
        settings = self._settings

        def make_plan() -> LaunchPlan:
            return LaunchPlan(
                replica_id=replica_id,
                served_name=spec.name,
                model=entry.model_ref,
                port=free_port(),
                log_path=settings.state_dir / "logs" / f"{replica_id}.log",
                max_num_seqs=spec.max_num_seqs,
                max_model_len=spec.max_model_len,
                tensor_parallel=spec.tensor_parallel,
                cpu_kv_cache_gib=settings.cpu_kv_cache_gib,
                engine_args=spec.engine_args,
                env=spec.env,
            )

        async def launch(plan: LaunchPlan) -> EngineProcess:
            return await spawn_engine(
                settings.command, plan, settings.instance, settings.parent_env
            )

        return Replica(
            replica_id=replica_id,
            model=spec.name,
            make_plan=make_plan,
            launch=launch,
            probe=self._probe,
            events=self._events,
            on_change=lambda _replica: self._publish(),
            policy=self._policy,
            timing=self._timing,
        )

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
                        max_num_seqs=entry.spec.max_num_seqs,
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
