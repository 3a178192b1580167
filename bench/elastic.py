"""More models than memory: sem's elastic policy against plain swap-on-request LRU, simulated.

A discrete-event simulation (steps of `TICK` s) of one device that holds fewer models than the
trace asks for. Why a simulation and not stand-in engines: an hour of bursty traffic with loads
of 15-40 s would take an hour per policy and per seed on real time; the simulation runs it in
seconds, deterministically, and it calls sem's real policy code (`elastic_policy.decide`, the
function the supervisor's elastic loop calls every gateway report) on the same snapshots the
supervisor builds. What it does not model: engine start-time noise, the gateway's HTTP, KV-cache
pressure inside an engine (a replica serves `SLOTS` requests at once, each `SERVICE` s).

The trace: Poisson arrivals whose rate switches between calm and bursts (on/off, exponential
durations), each request for a model drawn from a Zipf popularity. Every request may wait
`BOUND` s for a slot (the gateway's queue_timeout); past that it fails (503).

- sem: `decide()` every tick: loads a model with requests queued, evicts only idle, evictable
  models (least recently used, cheapest to reload first), never one with requests queued or in
  flight, keeps one resident less than `min_residency` or used within its reload time as long as
  the oldest waiting request can afford it; idle unload after `IDLE_UNLOAD`.
- lru (llama-swap-like): a request for a model that is not loaded evicts the least recently used
  loaded models at once until it fits, whatever they have queued (their in-flight requests
  finish first, their queue waits for a reload).

Figures: requests served (within the bound), failed, latency p50/p99 (arrival to answer, served
ones), loads (swaps in), evictions, and idle GPU-seconds (seconds x the share of the device held
by loaded models with nothing in flight).

    .venv/bin/python bench/elastic.py [--seeds 1,2,3] [--duration 3600] [--rate-scale 1]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections import deque
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from supervisor.elastic_policy import ElasticSettings, ModelView, decide
from supervisor.placement import DeviceView
from supervisor.units import GiB

TICK = 0.25  # s per simulation step
BOX = 16 * GiB  # the device
SIZES = [4, 4, 6, 6, 8, 8]  # GiB per model: K = 6 models, about 2-3 fit at once
LOAD_PER_GIB = 4.0  # s of start time per GiB: 16-32 s
SLOTS = 8  # requests one replica serves at once
SERVICE = 2.0  # s per request
BOUND = 60.0  # s a request may wait (queue_timeout)
IDLE_UNLOAD = 300.0  # s, sem's idle_unload for every model
ZIPF = 1.1
CALM_RATE, BURST_RATE = 0.2, 1.5  # requests/s
CALM_MEAN, BURST_MEAN = 90.0, 20.0  # s, mean length of each period


class Phase(StrEnum):
    UNLOADED = "unloaded"
    PENDING = "pending"  # loaded by decision, waiting for memory
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"  # unloading: memory held until its in-flight requests finish


@dataclass
class Model:
    name: str
    need: int
    load_seconds: float
    phase: Phase = Phase.UNLOADED
    queue: deque[float] = field(default_factory=deque)  # arrival times
    running: list[tuple[float, float]] = field(default_factory=list)  # (arrival, done at)
    ready_at: float = 0.0
    loaded_at: float = 0.0
    pending_since: float = 0.0
    last_request: float = 0.0
    measured: bool = False

    @property
    def holds(self) -> bool:
        return self.phase in (Phase.LOADING, Phase.READY, Phase.DRAINING)


@dataclass
class Tally:
    served: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)
    loads: int = 0
    evictions: int = 0
    idle_gpu_seconds: float = 0.0


def trace(
    seed: int, duration: float, models: int, rate_scale: float = 1.0
) -> list[tuple[float, int]]:
    """(arrival time, model index), bursty and Zipf-skewed; `rate_scale` x the request rates."""
    rng = random.Random(seed)
    weights = [1 / (rank + 1) ** ZIPF for rank in range(models)]
    order = list(range(models))
    rng.shuffle(order)  # which model is popular is not its size
    arrivals, now, burst = [], 0.0, False
    period_end = rng.expovariate(1 / CALM_MEAN)
    while now < duration:
        rate = (BURST_RATE if burst else CALM_RATE) * rate_scale
        now += rng.expovariate(rate)
        if now >= period_end:
            now, burst = period_end, not burst
            period_end = now + rng.expovariate(1 / (BURST_MEAN if burst else CALM_MEAN))
            continue
        arrivals.append((now, order[rng.choices(range(models), weights)[0]]))
    return arrivals


class Box:
    """The device, the models and the requests; `policy` says what loads and unloads."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.models = [Model(f"m{i}", gib * GiB, gib * LOAD_PER_GIB) for i, gib in enumerate(SIZES)]
        self.tally = Tally()
        self.settings = ElasticSettings(min_residency=30.0, wait_bound=BOUND)

    def free(self) -> int:
        return BOX - sum(m.need for m in self.models if m.holds)

    def arrive(self, now: float, index: int) -> None:
        model = self.models[index]
        model.queue.append(now)
        model.last_request = now
        if self.policy == "lru" and model.phase is Phase.UNLOADED:
            self._load(model, now)

    def step(self, now: float) -> None:
        for model in self.models:
            self._progress(model, now)
        if self.policy == "sem":
            self._sem(now)
        else:
            for model in self._pending():
                self._lru_make_room(model)
        for model in self._pending():
            if self.free() >= model.need:
                model.phase, model.ready_at = Phase.LOADING, now + model.load_seconds
                self.tally.loads += 1
        busy = sum(m.need for m in self.models if m.holds and not m.running)
        self.tally.idle_gpu_seconds += TICK * busy / BOX

    def _pending(self) -> list[Model]:
        return sorted((m for m in self.models if m.phase is Phase.PENDING),
                      key=lambda m: m.pending_since)  # fmt: skip

    def _progress(self, model: Model, now: float) -> None:
        """Finish requests, start queued ones, fail those past the bound, end loads/drains."""
        for arrival, done in [r for r in model.running if r[1] <= now]:
            model.running.remove((arrival, done))
            self.tally.served += 1
            self.tally.latencies.append(done - arrival)
        if model.phase is Phase.LOADING and now >= model.ready_at:
            model.phase, model.loaded_at, model.measured = Phase.READY, now, True
        if model.phase is Phase.DRAINING and not model.running:
            model.phase = Phase.UNLOADED
            if model.queue and self.policy == "lru":
                self._load(model, now)  # its queue asks for it again
        while model.phase is Phase.READY and model.queue and len(model.running) < SLOTS:
            model.running.append((model.queue.popleft(), now + SERVICE))
        while model.queue and now - model.queue[0] > BOUND:
            model.queue.popleft()
            self.tally.failed += 1

    def _load(self, model: Model, now: float) -> None:
        model.phase, model.pending_since, model.loaded_at = Phase.PENDING, now, now

    def _unload(self, model: Model) -> None:
        model.phase = Phase.DRAINING if model.running else Phase.UNLOADED

    def _lru_make_room(self, model: Model) -> None:
        """llama-swap-like: evict the least recently used until the new one fits."""
        draining = sum(m.need for m in self.models if m.phase is Phase.DRAINING)
        for victim in sorted((m for m in self.models if m.phase is Phase.READY),
                             key=lambda m: m.last_request):  # fmt: skip
            if self.free() + draining >= model.need:
                return
            self._unload(victim)
            draining += victim.need if victim.phase is Phase.DRAINING else 0
            self.tally.evictions += 1

    def _sem(self, now: float) -> None:
        """sem's real policy on the snapshot the supervisor would build."""
        views = [self._view(m, now) for m in self.models]
        reserved = BOX - self.free()
        device = DeviceView("0", "GPU0", BOX, BOX - reserved, reserved, kind="cpu")
        decision = decide(views, [device], now, self.settings)
        by_name = {m.name: m for m in self.models}
        for unload in decision.unloads:
            self._unload(by_name[unload.model])
            self.tally.evictions += unload.why == "evicted"
        for load in decision.loads:
            self._load(by_name[load.model], now)

    def _view(self, model: Model, now: float) -> ModelView:
        loaded = model.phase in (Phase.PENDING, Phase.LOADING, Phase.READY)
        return ModelView(
            name=model.name, loaded=loaded, need=model.need, evictable=True, on_demand=True,
            idle_unload=IDLE_UNLOAD, queued=len(model.queue), in_flight=len(model.running),
            last_used=max(model.last_request, model.loaded_at), loaded_at=model.loaded_at,
            load_seconds=model.load_seconds if model.measured else 30.0,
            waited=now - model.pending_since if model.phase is Phase.PENDING else 0.0,
            oldest_wait=now - model.queue[0] if model.queue else 0.0,
            pending=model.phase is Phase.PENDING,
            reserved={"0": model.need} if model.holds else {},
        )  # fmt: skip


def simulate(policy: str, seed: int, duration: float, rate_scale: float = 1.0) -> Tally:
    box = Box(policy)
    arrivals = deque(trace(seed, duration, len(SIZES), rate_scale))
    now = 0.0
    while now < duration + BOUND + 60 or any(m.queue or m.running for m in box.models):
        while arrivals and arrivals[0][0] <= now:
            box.arrive(*arrivals.popleft())
        box.step(now)
        now += TICK
    return box.tally


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)] if values else 0


def row(policy: str, seed: int, tally: Tally) -> dict[str, object]:
    total = tally.served + tally.failed
    return {
        "policy": policy, "seed": seed, "requests": total, "served": tally.served,
        "failed": tally.failed, "success": tally.served / total if total else 1.0,
        "p50": percentile(tally.latencies, 50), "p99": percentile(tally.latencies, 99),
        "loads": tally.loads, "evictions": tally.evictions,
        "idle_gpu_seconds": tally.idle_gpu_seconds,
    }  # fmt: skip


def markdown(rows: list[dict[str, object]]) -> str:
    lines = [
        "| policy | seed | requests | served | failed | p50 s | p99 s | loads | evictions |"
        " idle GPU-s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['policy']} | {r['seed']} | {r['requests']} | {r['served']} | {r['failed']} |"
            f" {r['p50']:.1f} | {r['p99']:.1f} | {r['loads']} | {r['evictions']} |"
            f" {r['idle_gpu_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--duration", type=float, default=3600.0, help="simulated seconds")
    parser.add_argument("--rate-scale", type=float, default=1.0,
                        help="x the request rates (0.5: a box less overloaded)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the rows here too")
    args = parser.parse_args(argv)
    rows = [
        row(policy, seed, simulate(policy, seed, args.duration, args.rate_scale))
        for seed in (int(s) for s in args.seeds.split(","))
        for policy in ("sem", "lru")
    ]
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

__all__ = ["Tally", "asdict", "simulate"]
