"""`sem plan`: where each replica of a models.yaml would go, and why, without starting anything.

Given the store of a state folder (`sem plan --state-dir`), a spec an earlier engine was
measured at is planned with its measured need (measure.py), as the supervisor would place it.
"""

from __future__ import annotations

from dataclasses import dataclass

from supervisor.config import SemConfig
from supervisor.errors import InvalidSpec
from supervisor.placement import DeviceView, Request, gib, plan
from supervisor.resources import Device
from supervisor.sizing import local_model_dir, size_up
from supervisor.store import Store


@dataclass(frozen=True)
class PlanRow:
    replica: str
    need: str  # per device, or "?" when it cannot be sized
    outcome: str  # "placed", "pending", "rejected"
    detail: str


def dry_run(config: SemConfig, devices: list[Device], store: Store | None = None) -> list[PlanRow]:
    rows: list[PlanRow] = []
    requests: list[Request] = []
    order: dict[str, int] = {}  # replica id -> position in the file
    needs_measured: dict[str, bool] = {}  # replica id -> its need was measured, not estimated
    for spec in config.models:
        ids = [f"{spec.name}-{i}" for i in range(spec.min_replicas)]
        order |= {r: len(order) + i for i, r in enumerate(ids)}
        try:
            model_dir = None if spec.memory != "auto" else local_model_dir(spec)
            need = size_up(spec, model_dir, devices, store)
        except InvalidSpec as exc:
            rows += [PlanRow(r, "?", "rejected", exc.message) for r in ids]
            continue
        requests += [
            Request(r, need.per_device, spec.tensor_parallel, spec.priority, order[r]) for r in ids
        ]
        needs_measured |= dict.fromkeys(ids, need.measured is not None)
    views = [DeviceView(d.id, d.label, d.total, d.free, 0, False, d.kind) for d in devices]
    decision = plan(requests, views)
    measured = {r.replica_id for r in requests if needs_measured.get(r.replica_id)}
    needs = {r.replica_id: gib(r.need) + ("*" if r.replica_id in measured else "")
             for r in requests}  # fmt: skip
    rows += [PlanRow(p.replica_id, needs[p.replica_id], "placed", p.reason)
             for p in decision.placements]  # fmt: skip
    rows += [PlanRow(w.replica_id, needs[w.replica_id], "pending", w.reason)
             for w in decision.waits]  # fmt: skip
    return sorted(rows, key=lambda row: order[row.replica])
