"""Elastic policy: which models to load, unload when idle, and evict to make room, and why.

A pure decision over snapshots, like placement.plan: no I/O, no logging, no clock (the caller
passes `now`), no mutation of its inputs. elastic.py takes the snapshots and carries the
decisions out; bench/elastic.py drives the same function in a simulation.

- Load: an unloaded model with requests queued for it is loaded; every request queued meanwhile
  rides on the one load (a swap is paid once per batch, not per request).
- Unwanted: a model loaded on demand that still waits for memory when no request waits for it
  any more goes back to unloaded: it would only take room from the next.
- Idle unload: a loaded model with `idle_unload` and nothing queued or in flight for that long
  (counted from its last request, or from its load) is unloaded. Without a fresh gateway report
  nothing counts as idle: the supervisor cannot see requests itself.
- Eviction: a model that wants memory (being loaded, or with a replica pending) and does not fit
  may unload loaded models that are evictable, of lower or equal priority, and with nothing
  queued (a loaded model's queue is served before it is swapped out). Without a fresh report
  nothing is evicted either. Least recently used go first, then the cheapest to reload.
  One with requests in flight goes only for a model of higher priority that has waited past
  `wait_bound`. Victims are chosen only if they make room: no eviction that would not help.
- Holds, weighed against the wait bound: a victim is kept (a `Hold`) while it is resident less
  than `min_residency` (two models cannot thrash), and, for a model of equal priority, while it
  was used more recently than its own reload time (rent or buy: a model kept at least as long as
  its reload costs, then let go, never costs more than twice the swap time of the best choice
  made knowing the future). A hold lasts only while the requests waiting can afford it: once
  the oldest one's wait so far + the rest of the hold + the waiting model's own load would pass
  `wait_bound`, the victim goes at once: a swap never costs a request its answer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from contract import defaults
from supervisor.autoscale_policy import ScaleSettings, Waiting
from supervisor.placement import DeviceView


@dataclass(frozen=True)
class ModelView:
    """One model as the policy sees it."""

    name: str
    loaded: bool  # active (its replicas run or are being placed); False: unloaded
    need: int  # bytes per device of one replica
    tensor_parallel: int = 1
    priority: int = 0
    evictable: bool = True
    on_demand: bool = False  # `load: on_demand`: loaded for requests, not for its own sake
    idle_unload: float | None = None  # seconds; None: never unloaded for idleness
    queued: int = 0  # requests waiting in the gateway
    in_flight: int = 0
    last_used: float = 0.0  # unix time of its last request, or of its load if later
    loaded_at: float = 0.0  # unix time it was last loaded
    load_seconds: float = 0.0  # measured (or assumed) start-to-ready time: its swap cost
    waited: float = 0.0  # seconds its oldest pending replica has waited (0: none pending)
    oldest_wait: float = 0.0  # seconds its longest-queued request has waited (gateway report)
    pending: bool = False  # a replica of it waits for memory
    reserved: dict[str, int] = field(default_factory=dict)  # device id -> bytes its replicas hold


@dataclass(frozen=True)
class ElasticSettings:
    min_residency: float = 30.0  # seconds a loaded model is safe from eviction
    wait_bound: float = defaults.QUEUE_TIMEOUT  # a request's longest wait in the gateway
    scale: ScaleSettings = field(default_factory=ScaleSettings)  # replica autoscaling


class UnloadWhy(StrEnum):
    IDLE = "idle"
    EVICTED = "evicted"
    UNWANTED = "unwanted"  # loaded on demand, still waiting for memory, and nobody waits now


@dataclass(frozen=True)
class Load:
    model: str
    reason: str


@dataclass(frozen=True)
class Unload:
    model: str
    why: UnloadWhy
    reason: str
    for_model: str | None = None  # evicted to make room for this one
    freed: int = 0  # bytes its replicas held


@dataclass(frozen=True)
class Hold:
    """`victim` would make room for `model` but is kept a while (swap cost, weighed)."""

    model: str
    victim: str
    seconds: float  # how much longer it is kept, at most
    reason: str


@dataclass(frozen=True)
class Decision:
    loads: list[Load] = field(default_factory=list)
    unloads: list[Unload] = field(default_factory=list)
    holds: list[Hold] = field(default_factory=list)


def decide(
    models: list[ModelView],
    devices: list[DeviceView],
    now: float,
    settings: ElasticSettings,
    demand_known: bool = True,
) -> Decision:
    """What to load, unload and evict now; see the module docstring for the rules."""
    loads = [
        Load(m.name, f"{m.queued} request(s) queued; loading takes ~{m.load_seconds:.0f}s")
        for m in models
        if not m.loaded and m.queued > 0
    ]
    unloads = [
        unload for m in models
        if demand_known and (unload := _idle(m, now) or _unwanted(m)) is not None
    ]  # fmt: skip
    loading = {load.model for load in loads}
    gone = {u.model for u in unloads}
    wanting = sorted(
        (m for m in models
         if m.name not in gone and (m.name in loading or (m.loaded and m.pending))),
        key=lambda m: (-m.priority, -m.waited),
    )  # fmt: skip
    free = _free_after(devices, models, gone)
    holds: list[Hold] = []
    for want in wanting if demand_known else ():
        candidates = [
            m for m in models
            if m.name not in gone and m.name != want.name and _may_evict(m, want, now, settings)
        ]  # fmt: skip
        victims = _victims(want, candidates, free)
        if victims is None:
            continue  # fits now, or no eviction would make it fit: take nothing
        kept = [h for v in victims if (h := _hold(v, want, now, settings)) is not None]
        if kept:
            holds.extend(kept)  # the swap waits until it pays, or until the bound says go
            continue
        for victim in victims:
            gone.add(victim.name)
            for device_id, held in victim.reserved.items():
                free[device_id] = free.get(device_id, 0) + held
            unloads.append(_eviction(victim, want, now))
        for device_id in _fitting(want, free)[: want.tensor_parallel]:
            free[device_id] -= want.need  # spoken for: not counted again for the next one
    return Decision(loads, unloads, holds)


def waiting_for_memory(models: list[ModelView]) -> list[Waiting]:
    """The models that wait for memory: unloaded with requests queued, or a replica pending
    (the autoscaler leaves them the room)."""
    return [
        Waiting(m.name, m.priority, m.need)
        for m in models
        if (not m.loaded and m.queued > 0) or (m.loaded and m.pending)
    ]


def _idle(model: ModelView, now: float) -> Unload | None:
    if not model.loaded or model.idle_unload is None or model.queued or model.in_flight:
        return None
    idle_for = now - model.last_used
    if idle_for < model.idle_unload:
        return None
    return Unload(
        model.name, UnloadWhy.IDLE,
        f"idle for {idle_for:.0f}s (idle_unload {model.idle_unload:g}s)",
        freed=sum(model.reserved.values()),
    )  # fmt: skip


def _unwanted(model: ModelView) -> Unload | None:
    """A model loaded on demand whose replica still waits for memory while nobody waits for
    it any more (its requests timed out or left): it would only take room from the next."""
    if not (model.on_demand and model.loaded and model.pending and not model.reserved):
        return None
    if model.queued or model.in_flight:
        return None
    why = f"no request waits for it any more after {model.waited:.0f}s without memory"
    return Unload(model.name, UnloadWhy.UNWANTED, why)


def _may_evict(model: ModelView, want: ModelView, now: float, settings: ElasticSettings) -> bool:
    if not model.loaded or not model.evictable or model.priority > want.priority:
        return False
    if not model.reserved:
        return False
    if model.queued:
        return False  # its own queue is served before it is swapped out
    if model.in_flight:
        return want.priority > model.priority and want.waited > settings.wait_bound
    return True


def _hold(victim: ModelView, want: ModelView, now: float, settings: ElasticSettings) -> Hold | None:
    """Keep `victim` a while (its minimum residency; its reuse, weighed: see the module
    docstring), or None: it may go now."""
    residency = settings.min_residency - (now - victim.loaded_at)
    # Priority is the operator's word: a higher one is not weighed against a reload.
    reuse = (
        victim.load_seconds - (now - victim.last_used) if want.priority == victim.priority else 0
    )
    left = max(residency, reuse)
    if left <= 0:
        return None
    if want.oldest_wait + left + want.load_seconds >= settings.wait_bound:
        return None  # the oldest waiting request cannot afford the hold
    why = (
        f"loaded {now - victim.loaded_at:.0f}s ago (min_residency {settings.min_residency:g}s)"
        if residency >= reuse
        else f"used {now - victim.last_used:.0f}s ago, reloads in ~{victim.load_seconds:.0f}s"
    )
    return Hold(
        want.name, victim.name, left,
        f"{victim.name} kept {left:.0f}s more for {want.name}: {why}; {want.queued} request(s)"
        f" waiting, the oldest {want.oldest_wait:.0f}s of {settings.wait_bound:g}s",
    )  # fmt: skip


def _free_after(
    devices: Iterable[DeviceView], models: list[ModelView], unloading: set[str]
) -> dict[str, int]:
    """Memory per device once what is already on its way out is released: unloaded models
    whose replicas still drain, and the ones this round unloads."""
    free = {d.id: d.available for d in devices}
    for m in models:
        if not m.loaded or m.name in unloading:
            for device_id, held in m.reserved.items():
                free[device_id] = free.get(device_id, 0) + held
    return free


def _fitting(want: ModelView, free: dict[str, int]) -> list[str]:
    return sorted((d for d, room in free.items() if room >= want.need), key=lambda d: free[d])


def _victims(
    want: ModelView, candidates: list[ModelView], free: dict[str, int]
) -> list[ModelView] | None:
    """The fewest least-recently-used candidates whose memory makes `want` fit; None if it
    fits already or cannot be made to fit."""
    if len(_fitting(want, free)) >= want.tensor_parallel:
        return None
    order = sorted(candidates, key=lambda m: (m.last_used, m.load_seconds))
    if want.tensor_parallel == 1:
        best: list[ModelView] | None = None
        for device_id in free:
            chosen = _fill(want, [m for m in order if device_id in m.reserved], free, device_id)
            if chosen is not None and (best is None or len(chosen) < len(best)):
                best = chosen
        return best
    trial = dict(free)
    chosen = []
    for victim in order:
        chosen.append(victim)
        for device_id, held in victim.reserved.items():
            trial[device_id] = trial.get(device_id, 0) + held
        if len(_fitting(want, trial)) >= want.tensor_parallel:
            return chosen
    return None


def _fill(
    want: ModelView, order: list[ModelView], free: dict[str, int], device_id: str
) -> list[ModelView] | None:
    """Victims on one device, least recently used first, until `want` fits there."""
    room, chosen = free[device_id], []
    for victim in order:
        if room >= want.need:
            break
        chosen.append(victim)
        room += victim.reserved[device_id]
    return chosen if room >= want.need else None


def _eviction(victim: ModelView, want: ModelView, now: float) -> Unload:
    busy = f", {victim.in_flight} in flight" if victim.in_flight else ""
    return Unload(
        victim.name, UnloadWhy.EVICTED,
        f"evicted for {want.name} (priority {want.priority} >= {victim.priority}): least"
        f" recently used ({now - victim.last_used:.0f}s ago{busy}), reloads in"
        f" ~{victim.load_seconds:.0f}s",
        for_model=want.name, freed=sum(victim.reserved.values()),
    )  # fmt: skip
