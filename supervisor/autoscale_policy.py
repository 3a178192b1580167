"""Replica autoscaling: when a model with a replica range gets one more replica, or one fewer.

A pure decision over snapshots (no I/O, no clock: the caller passes `now`). What must hold for a
while (a queue above target, a calm) is remembered between rounds in `ScaleMemory`, which the
caller keeps and passes back: the function returns the new one.

- Up: requests queued per replica above `target_queue_per_replica` for `window` seconds, below
  `max`, no replica of it still coming up (one at a time), room for one more now, and no other
  model of higher or equal priority, or larger, waiting for memory (scaling up must not take
  the room a waiting model needs).
- Down: nothing queued and what is in flight fits on one replica fewer, for `calm` seconds,
  above `min`.
- Either way, `cooldown` seconds since the model's last scaling.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from supervisor.placement import DeviceView, has_room


@dataclass(frozen=True)
class ScaleView:
    name: str
    replicas: int  # live ones, not draining
    min: int
    max: int
    target: float  # requests queued per replica
    slots: int = 1  # requests one replica serves at once (max_num_seqs)
    queued: int = 0
    in_flight: int = 0
    coming_up: bool = False  # a replica of it is pending or starting
    priority: int = 0
    need: int = 0  # bytes per device of one replica
    tensor_parallel: int = 1


@dataclass(frozen=True)
class Waiting:
    """A model waiting for memory: being loaded, or with a replica pending."""

    name: str
    priority: int
    need: int


@dataclass(frozen=True)
class ScaleMemory:
    over_since: float | None = None  # the queue has been above target since
    calm_since: float | None = None  # one replica fewer would have done since
    changed_at: float = float("-inf")  # last scaling


@dataclass(frozen=True)
class ScaleSettings:
    window: float = 10.0
    calm: float = 60.0
    cooldown: float = 30.0


@dataclass(frozen=True)
class Scale:
    model: str
    delta: int  # +1 or -1
    reason: str


@dataclass(frozen=True)
class ScaleDecision:
    scales: list[Scale] = field(default_factory=list)
    memory: dict[str, ScaleMemory] = field(default_factory=dict)


def decide_scale(
    models: list[ScaleView],
    devices: list[DeviceView],
    waiting: list[Waiting],
    memory: dict[str, ScaleMemory],
    now: float,
    settings: ScaleSettings,
) -> ScaleDecision:
    result = ScaleDecision()
    for model in models:
        mem = _observe(model, memory.get(model.name, ScaleMemory()), now)
        scale = _scale(model, mem, devices, waiting, now, settings)
        if scale is not None:
            mem = ScaleMemory(changed_at=now)
            result.scales.append(scale)
        result.memory[model.name] = mem
    return result


def _observe(model: ScaleView, mem: ScaleMemory, now: float) -> ScaleMemory:
    """The memory updated with what the model shows now."""
    per_replica = model.queued / max(1, model.replicas)
    over = per_replica > model.target
    calm = model.queued == 0 and model.in_flight <= (model.replicas - 1) * model.slots
    return replace(
        mem,
        over_since=(mem.over_since if mem.over_since is not None else now) if over else None,
        calm_since=(mem.calm_since if mem.calm_since is not None else now) if calm else None,
    )


def _scale(
    model: ScaleView,
    mem: ScaleMemory,
    devices: list[DeviceView],
    waiting: list[Waiting],
    now: float,
    settings: ScaleSettings,
) -> Scale | None:
    if now - mem.changed_at < settings.cooldown:
        return None
    if mem.over_since is not None and now - mem.over_since >= settings.window:
        return _up(model, devices, waiting, now - mem.over_since)
    calm_for = 0.0 if mem.calm_since is None else now - mem.calm_since
    if mem.calm_since is None or calm_for < settings.calm or model.replicas <= model.min:
        return None
    fewer = model.replicas - 1
    return Scale(model.name, -1, f"calm for {calm_for:.0f}s: nothing queued,"
                 f" {model.in_flight} in flight fit on {fewer} replica(s)")  # fmt: skip


def _up(
    model: ScaleView, devices: list[DeviceView], waiting: list[Waiting], over: float
) -> Scale | None:
    if model.replicas >= model.max or model.coming_up:
        return None
    blocking = [
        w for w in waiting
        if w.name != model.name and (w.priority >= model.priority or w.need > model.need)
    ]  # fmt: skip
    if blocking:
        return None
    room = [d for d in devices if has_room(d, model.need, model.tensor_parallel)]
    if len(room) < model.tensor_parallel:
        return None
    return Scale(model.name, +1, f"{model.queued} queued on {model.replicas} replica(s) for"
                 f" {over:.0f}s (target {model.target:g} per replica)")  # fmt: skip
