"""`sem plan`: where each replica of a models.yaml would go, and why, without starting anything."""

from __future__ import annotations

from dataclasses import dataclass

from supervisor.config import SemConfig
from supervisor.errors import InvalidSpec
from supervisor.estimate import EstimateError, estimate
from supervisor.manager import local_model_dir
from supervisor.placement import DeviceView, Request, gib, never_fits, plan
from supervisor.resources import Device


@dataclass(frozen=True)
class PlanRow:
    replica: str
    need: str  # per device, or "?" when it cannot be estimated
    outcome: str  # "placed", "pending", "rejected"
    detail: str


def dry_run(config: SemConfig, devices: list[Device]) -> list[PlanRow]:
    on_gpu = any(d.kind == "gpu" for d in devices)
    eligible = [(d.label, d.total) for d in devices if on_gpu == (d.kind == "gpu")]
    rows: list[PlanRow] = []
    requests: list[Request] = []
    for spec in config.models:
        ids = [f"{spec.name}-{i}" for i in range(spec.replicas)]
        try:
            model_dir = None if spec.memory != "auto" else local_model_dir(spec)
            need = estimate(spec, model_dir, on_gpu=on_gpu)
        except (InvalidSpec, EstimateError) as exc:
            rows += [PlanRow(r, "?", "rejected", str(exc)) for r in ids]
            continue
        if problem := never_fits(need.per_device, spec.tensor_parallel, eligible):
            rows += [PlanRow(r, gib(need.per_device), "rejected", problem) for r in ids]
            continue
        requests += [
            Request(r, need.per_device, spec.tensor_parallel, spec.priority, len(requests) + i)
            for i, r in enumerate(ids)
        ]
    views = [DeviceView(d.id, d.label, d.total, d.free, 0, False, d.kind) for d in devices]
    decision = plan(requests, views)
    needs = {r.replica_id: gib(r.need) for r in requests}
    rows += [PlanRow(p.replica_id, needs[p.replica_id], "placed", p.reason)
             for p in decision.placements]  # fmt: skip
    rows += [PlanRow(w.replica_id, needs[w.replica_id], "pending", w.reason)
             for w in decision.waits]  # fmt: skip
    order = {f"{s.name}-{i}": n for n, s in enumerate(config.models) for i in range(s.replicas)}
    return sorted(rows, key=lambda row: (order.get(row.replica.rsplit("-", 1)[0] + "-0", 0),
                                         row.replica))  # fmt: skip
