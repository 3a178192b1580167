"""The models sem runs, as the admin API and the daemon see them: one facade over the parts.

Each job has its own module: the models themselves (models.py) and the registry that makes and
removes them (registry.py), placement rounds (scheduler.py), reloads and rollouts (rollout.py),
restore at start (restore.py), the route table (route_table.py), launch plans (launch.py) and
sizing (sizing.py). The manager wires them together and keeps the public commands in one place.
"""

from __future__ import annotations

import random
from typing import Any

from contract.routes import KeyRoute, RouteTable
from supervisor.api_keys import KeyRing
from supervisor.cache import ModelCache
from supervisor.config import ModelSpec
from supervisor.demand import DemandBoard
from supervisor.elastic import Elastic
from supervisor.elastic_policy import ElasticSettings
from supervisor.events import EventLog
from supervisor.gateway_view import GatewayView
from supervisor.gpu_usage import ProcessMemory
from supervisor.launch import EngineSettings, ReplicaFactory
from supervisor.measure import Measurer
from supervisor.models import ModelEntry
from supervisor.probe import EngineProbe
from supervisor.reconcile import ConfigDiff
from supervisor.registry import Registry
from supervisor.replica import ReplicaTiming
from supervisor.reservations import resource_report
from supervisor.resources import Device, Inventory
from supervisor.restart import RestartPolicy
from supervisor.restore import Restorer
from supervisor.rollout import Rollouts
from supervisor.route_table import RoutePublisher
from supervisor.scheduler import Scheduler, SchedulerSettings
from supervisor.store import Origin, Store

__all__ = ["EngineSettings", "Manager", "ModelEntry", "SchedulerSettings"]


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
        demand: DemandBoard | None = None,
        elastic: ElasticSettings | None = None,
        rng: random.Random | None = None,  # the restarts' jitter (seeded in tests)
        gpu_memory: ProcessMemory | None = None,
    ) -> None:
        """`gpu_memory`: NVML's per-process figures, to measure what engines use on a GPU
        (measure.py); without it only CPU engines and start failures correct estimates."""
        self.events = events  # every decision and transition, for the API and the tests
        self.demand = demand or DemandBoard()  # what the gateway reports (contract.report)
        store = store or Store(None)
        timing = timing or ReplicaTiming()
        self._scheduler = Scheduler(inventory, events, scheduling or SchedulerSettings())
        self.keys = KeyRing(store, self._publish_keys)  # the gateway's API keys
        self._routes = RoutePublisher(self.keys.routes())
        factory = ReplicaFactory(
            settings=settings, probe=probe, events=events, policy=policy or RestartPolicy(),
            timing=timing, store=store, devices=lambda: self._scheduler.devices,
            gateway=GatewayView(self.demand, self._routes),
            start_turn=self._scheduler.gate.wait_turn, rng=rng,
        )  # fmt: skip
        self._registry = Registry(
            events=events, store=store, factory=factory, scheduler=self._scheduler,
            routes=self._routes, cache=cache, measurer=Measurer(store, events, gpu_memory),
        )  # fmt: skip
        self.elastic = Elastic(
            self._registry, self._scheduler, self.demand, events, store,
            elastic or ElasticSettings(),
        )  # fmt: skip
        self._registry.replica_watchers.append(self.elastic.note_replica)
        self._rollouts = Rollouts(self._registry, store, events)
        self._restorer = Restorer(
            self._registry, store, probe, events, timing.stop_grace, adopt=settings.adopt
        )

    @property
    def cache(self) -> ModelCache | None:
        """If set, hf:// sources not cached yet are downloaded first."""
        return self._registry.cache

    @cache.setter
    def cache(self, cache: ModelCache | None) -> None:
        self._registry.cache = cache

    # -- queries -----------------------------------------------------------------------------

    def entries(self) -> list[ModelEntry]:
        return self._registry.entries()

    def get(self, name: str) -> ModelEntry:
        """The model; ModelNotFound (404) naming the known ones if there is none."""
        return self._registry.get(name)

    @property
    def devices(self) -> list[Device]:
        """The inventory as last measured."""
        return self._scheduler.devices

    @property
    def routes(self) -> RouteTable:
        return self._routes.table

    def _publish_keys(self, keys: tuple[KeyRoute, ...]) -> None:
        self._routes.keys = keys
        self._registry.publish()

    async def wait_routes(self, after: int, timeout: float, gateway: bool = False) -> RouteTable:
        """The route table once its version is past `after`, or as it is after `timeout` s;
        `gateway`: the gateway asks, and holds table `after` (route_table.py)."""
        return await self._routes.wait(after, timeout, gateway)

    async def resources(self) -> list[dict[str, Any]]:
        """Devices measured now, with what sem's replicas reserve on each."""
        devices = await self._scheduler.measure()
        return resource_report(devices, self._registry.replicas())

    # -- commands ----------------------------------------------------------------------------

    def start(self) -> None:
        """Run the scheduler (placement of pending replicas) and the elastic loop (load on
        demand, idle unload, eviction) until shutdown."""
        self._scheduler.start(self._registry.entries, self._registry.publish)
        self.elastic.start()

    async def schedule(self) -> None:
        """One planning round: place what fits now, say why the rest waits."""
        if await self._scheduler.schedule(self._registry.entries()):
            self._registry.publish()

    def nodes_changed(self, lost: set[str]) -> None:
        """Cluster nodes joined or left (supervisor/cluster/): the lost nodes' replicas are
        replaced on the nodes left, and a joined node's room counts at once."""
        self._registry.replace_lost(lost)

    async def add(self, spec: ModelSpec, origin: Origin = "api") -> ModelEntry:
        """A new model (replicas pending); kept in the desired state across restarts."""
        return await self._registry.add(spec, origin)

    def remove(self, name: str, drain_timeout: float) -> ModelEntry:
        """Begin draining the model; it disappears once every replica has stopped."""
        return self._registry.remove(name, drain_timeout)

    async def restore(self, config: list[ModelSpec], drain_timeout: float) -> ConfigDiff:
        """At start: the stored models, their live engines re-adopted, then models.yaml applied
        (invalid models skipped with an event).

        Call before `start()` and before the route table is served, so the first table a
        gateway sees already has the re-adopted engines.
        """
        await self._restorer.restore()
        return await self._rollouts.reload(config, drain_timeout, strict=False)

    async def reload(
        self, config: list[ModelSpec], drain_timeout: float, strict: bool = True
    ) -> ConfigDiff:
        """Apply models.yaml's changes since it was last applied (rollout.py); `strict`: all or
        nothing, InvalidSpec naming the invalid model."""
        return await self._rollouts.reload(config, drain_timeout, strict)

    async def shutdown(self, drain_timeout: float) -> None:
        """Stop every model (drained up to the deadline) and wait until all engines are gone."""
        await self.elastic.stop()  # no more loads or unloads
        await self._scheduler.stop()  # no more placements
        await self._registry.close(drain_timeout)
        self._routes.close()  # long-polls answer at once from now on
        self._registry.publish()
