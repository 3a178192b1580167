"""Turning a placed replica into an engine launch: the launch plan, and the replicas that use it.

`launch_plan` is pure: the model, its placement and the devices in, the engine's command-line
settings out. `ReplicaFactory` makes a model's replicas, each with the plan it launches from and
a launch that records the engine in the store (so a later supervisor can re-adopt it).
"""

from __future__ import annotations

import itertools
import random
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from supervisor.config import ModelSpec, Source
from supervisor.engine import (
    Adopt,
    EngineCommand,
    EngineHandle,
    HubFetch,
    LaunchPlan,
    Prepare,
    Spawn,
    free_port,
    spawn_engine,
)
from supervisor.estimate import MemoryEstimate, cpu_kv_cache_gib
from supervisor.events import EventLog
from supervisor.gateway_view import GatewayView
from supervisor.gpu_budget import tp_utilization
from supervisor.placement import Placement
from supervisor.probe import EngineProbe
from supervisor.process_start import NOT_RUNNING, start_of
from supervisor.replica import Replica, ReplicaTiming, StartTurn
from supervisor.resources import Device
from supervisor.restart import RestartPolicy
from supervisor.store import EngineRecord, Store, spec_digest

# Never hand vLLM the whole GPU: CUDA and the driver keep some for themselves.
MAX_GPU_UTILIZATION = 0.98


@dataclass(frozen=True)
class EngineSettings:
    """How engines are started: shared by every replica."""

    command: EngineCommand
    state_dir: Path
    instance: str
    parent_env: Mapping[str, str]
    spawn: Spawn = spawn_engine  # a Ray cluster's node agents: supervisor/cluster/
    adopt: Adopt | None = None  # a cluster's engines after a restart (None: this machine's pids)
    prepare: Prepare | None = None  # before each spawn: a cluster node caches the model
    hub_endpoint: str | None = None  # where hf:// models come from (cluster nodes fetch there too)


def gpu_ids(placement: Placement | None, devices: Mapping[str, Device]) -> tuple[int, ...]:
    """The GPUs a placement is on; empty when it is on the CPU (or not placed)."""
    if placement is None or not all(devices[i].kind == "gpu" for i in placement.device_ids):
        return ()
    return tuple(devices[i].index or 0 for i in placement.device_ids)


def gpu_memory_utilization(placement: Placement, devices: Mapping[str, Device]) -> float:
    """vLLM's --gpu-memory-utilization for a GPU placement: the share of each GPU the replica
    reserved, rounded up (gpu_budget.utilization). vLLM applies one figure to every rank's own
    total, so the smallest GPU's share is given; the placement reserved that share of the
    larger ones (gpu_budget.tp_reservations)."""
    totals = [devices[i].total for i in placement.device_ids]
    return min(MAX_GPU_UTILIZATION, tp_utilization(placement.per_device, totals))


def launch_plan(
    *,
    replica_id: str,
    spec: ModelSpec,
    model_ref: str,
    need: MemoryEstimate,
    placement: Placement | None,
    devices: Mapping[str, Device],
    port: int,
    state_dir: Path,
    hub_endpoint: str | None = None,
) -> LaunchPlan:
    """What one replica's engine is started with, on these devices (pure but for a cluster
    engine's fresh key)."""
    gpus = gpu_ids(placement, devices)
    on = devices[placement.device_ids[0]] if placement else Device("", "cpu", "", 0, 0)
    return LaunchPlan(
        replica_id=replica_id,
        served_name=spec.name,
        model=model_ref,
        port=port,
        log_path=state_dir / "logs" / f"{replica_id}.log",
        max_num_seqs=spec.max_num_seqs,
        max_model_len=spec.max_model_len,
        tensor_parallel=spec.tensor_parallel,
        gpu_ids=gpus,
        gpu_memory_utilization=(
            gpu_memory_utilization(placement, devices) if gpus and placement else None
        ),
        cpu_kv_cache_gib=None if gpus else cpu_kv_cache_gib(need.kv_cache),
        engine_args=spec.engine_args,
        env=spec.env,
        host=on.host,
        node=on.node or None,
        # Every engine demands a secret of its own on /v1 that only the gateway knows, so no
        # other process (on this machine, or a cluster node's network) can bypass the gateway.
        api_key=secrets.token_urlsafe(24),
        fetch=hub_fetch(spec.source, model_ref, hub_endpoint),
    )


def hub_fetch(source: str, model_ref: str, endpoint: str | None) -> HubFetch | None:
    """For an hf:// model, what a cluster node needs to cache it as this machine did: the
    commit is the snapshot folder's name, the cache folder three levels up
    (<cache>/models--org--name/snapshots/<commit>, the Hugging Face cache's layout)."""
    if not source.startswith("hf://"):
        return None
    snapshot = Path(model_ref)
    pinned = replace(Source.parse(source), revision=snapshot.name)
    return HubFetch(str(pinned), str(snapshot.parents[2]), endpoint)


class ReplicaFactory:
    """Makes replicas: each launches from its model's spec as it was when it was made."""

    def __init__(
        self,
        *,
        settings: EngineSettings,
        probe: EngineProbe,
        events: EventLog,
        policy: RestartPolicy,
        timing: ReplicaTiming,
        store: Store,
        devices: Callable[[], list[Device]],
        gateway: GatewayView | None = None,
        start_turn: StartTurn | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._settings = settings
        self._gateway = gateway
        self._probe = probe
        self._events = events
        self._policy = policy
        self.timing = timing
        self._store = store
        self._devices = devices
        self._start_turn = start_turn  # restarts wait for their GPU here (start_gate.py)
        self._rng = rng or random.Random()  # one generator for every replica's backoff jitter
        self._seq = itertools.count()

    def new(
        self,
        *,
        replica_id: str,
        spec: ModelSpec,
        model_ref: str,
        need: MemoryEstimate,
        on_change: Callable[[Replica], None],
    ) -> Replica:
        # A replica keeps the spec it was made for, restarts included: a rollout replaces it.
        settings = self._settings

        def make_plan(placement: Placement | None) -> LaunchPlan:
            return launch_plan(
                replica_id=replica_id, spec=spec, model_ref=model_ref, need=need,
                placement=placement, devices={d.id: d for d in self._devices()},
                port=free_port(), state_dir=settings.state_dir,
                hub_endpoint=settings.hub_endpoint,
            )  # fmt: skip

        async def launch(plan: LaunchPlan) -> EngineHandle:
            engine = await settings.spawn(
                settings.command, plan, settings.instance, settings.parent_env
            )
            self._store.put_engine(engine_record(replica, plan, engine.pid))
            return engine

        replica = Replica(
            replica_id=replica_id,
            model=spec.name,
            make_plan=make_plan,
            launch=launch,
            prepare=settings.prepare,
            probe=self._probe,
            events=self._events,
            on_change=on_change,
            policy=self._policy,
            timing=self.timing,
            reason="waiting for placement",
            gateway=self._gateway,
            start_turn=self._start_turn,
            rng=self._rng,
        )
        replica.seq = next(self._seq)
        replica.digest = spec_digest(spec)
        replica.max_num_seqs = spec.max_num_seqs
        return replica


def engine_record(replica: Replica, plan: LaunchPlan, pid: int) -> EngineRecord:
    """What the store keeps of a replica's engine: enough to find and re-adopt it later."""
    placement = replica.placement
    return EngineRecord(
        replica=replica.id, model=replica.model, pid=pid,
        started=start_of(pid) or NOT_RUNNING, port=plan.port, spec_digest=replica.digest,
        devices=placement.device_ids if placement else (),
        reserved=placement.per_device if placement else 0, log_path=plan.log_path,
        reservations=tuple(placement.reserved().values()) if placement else (),
        api_key=plan.api_key,
    )  # fmt: skip
